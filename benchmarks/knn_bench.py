"""k-NN at ImageNet scale on this machine: time and peak memory over the bank's own size.

A synthetic float16 bank of 1,281,167 x 768 (ImageNet-1k train, ViT-B features) is queried
by 10,000 float16 features with eval.knn.knn_evaluate (k = 10, 20, 100, 200 from one search).
The bank lives in RAM; the interesting figure is how much memory the search adds on top of
it (target <= 1 GiB): eval.knn streams the bank in blocks, so no float32 copy of it is made.

Usage: .venv/bin/python benchmarks/knn_bench.py [--bank-size N] [--queries M] [--dim D]
"""
import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch

from agmae.eval.knn import KS, knn_evaluate

GIB = 2**30


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def synthetic_features(rows: int, dim: int, rng: np.random.Generator, block: int = 65536) -> np.ndarray:
    """[rows, dim] float16 standard normals, filled block by block so no float32 copy is made."""
    out = np.empty((rows, dim), dtype=np.float16)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        out[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-size", type=int, default=1_281_167)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    bank = synthetic_features(args.bank_size, args.dim, rng)
    bank_labels = rng.integers(0, args.classes, size=args.bank_size)
    queries = synthetic_features(args.queries, args.dim, rng)
    query_labels = rng.integers(0, args.classes, size=args.queries)

    rss_before = current_rss_bytes()
    peak_was_reset = reset_peak_rss()
    started = time.perf_counter()
    results = knn_evaluate(bank, bank_labels, queries, query_labels, args.classes, ks=KS, progress=True)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()

    print(f"torch threads: {torch.get_num_threads()} (CPU shared with other jobs: timings are upper bounds)")
    print(f"bank {args.bank_size} x {args.dim} float16 = {bank.nbytes / GIB:.2f} GiB in RAM; "
          f"{args.queries} queries; k in {KS}")
    print(f"time: {seconds:.1f} s  ({args.queries / seconds:.0f} queries/s)")
    print(f"RSS before search: {rss_before / GIB:.2f} GiB")
    if peak_was_reset:
        print(f"peak RSS during search: {peak / GIB:.2f} GiB = bank + {(peak - bank.nbytes) / GIB:.2f} GiB "
              f"(search itself added {(peak - rss_before) / GIB:.2f} GiB)")
    else:
        print(f"peak RSS over the whole process (could not reset the high-water mark): {peak / GIB:.2f} GiB "
              f"= bank + {(peak - bank.nbytes) / GIB:.2f} GiB")
    print("random features, so accuracies are chance level:",
          {k: round(v["top1"], 2) for k, v in results.items()})


if __name__ == "__main__":
    main()
