"""OpenMP's wait policy for a CPU training whose loader workers share its cores, measured in one run.

`agmae-train` on the demo dataset (vanilla, the demo MAE, `--epochs` epochs, all this process's CPUs as threads)
with OMP_WAIT_POLICY=PASSIVE (threads sleep at a barrier) and with OpenMP's default (they spin a while first), each
with 1 loader worker (the CPU default on 2 cores: the worker shares the cores with the compute threads) and with
none, the variants taking turns, --repeats times; the best images per second of each counts. It prints the ratios
and checks that the policy leaves the weights as they were. The demo's step runner sets PASSIVE for the steps it
pins (experiments/steps.py).

    python benchmarks/wait_policy_bench.py [--epochs 2] [--repeats 2] [--precision native]
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch

from agmae.data.demo import ensure_demo
from agmae.hardware import resolve_precision

POLICIES = ("PASSIVE", None)  # None: OpenMP's default


def train(root: Path, out: Path, policy: str | None, workers: int, epochs: int, precision: str) -> float:
    """Images per second of the last epoch of one agmae-train run in a fresh process."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    subprocess.run([str(Path(sys.executable).parent / "agmae-train"), "--no-guidance", "--model", "mae_vit_demo_patch8",
                    "--epochs", str(epochs), "--warmup-epochs", "1", "--batch-size", "256", "--precision", precision,
                    "--seed", "0", "--data", str(root), "--out", str(out), "--workers", str(workers)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["imgs_per_s"]


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoint-last.pth", map_location="cpu", weights_only=True)["model"]


@click.command()
@click.option("--epochs", default=2, show_default=True, help="Epochs of each run (10,000 images each).")
@click.option("--repeats", default=2, show_default=True, help="Runs of each variant; the best counts.")
@click.option("--precision", type=click.Choice(["native", "fp32"]), default="native", show_default=True,
              help="agmae-train's --precision: native is bf16 where the CPU computes it natively, as the demo.")
def main(epochs, repeats, precision):
    root = ensure_demo()
    variants = [(policy, workers) for workers in (1, 0) for policy in POLICIES]
    best = dict.fromkeys(variants, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for policy, workers in variants:
                out = Path(tmp) / f"{policy}-{workers}-{repeat}"
                best[policy, workers] = max(best[policy, workers],
                                            train(root, out, policy, workers, epochs, precision))
        same = all(torch.equal(a, b) for a, b in zip(weights(Path(tmp) / "PASSIVE-1-0").values(),
                                                      weights(Path(tmp) / "None-1-0").values()))
    resolved = resolve_precision(precision, torch.device("cpu"))
    print(f"agmae-train, demo MAE, {resolved}, {torch.get_num_threads()} threads, best of {repeats}, images/s:")
    for workers in (1, 0):
        passive, default = best["PASSIVE", workers], best[None, workers]
        print(f"  {workers} loader worker{'s' * (workers != 1)}: PASSIVE {passive:.0f}, default {default:.0f}, "
              f"PASSIVE / default {passive / default:.3f}")
    print(f"  weights after {epochs} epochs, PASSIVE against default (1 worker): "
          f"{'bit-identical' if same else 'differ'}")


if __name__ == "__main__":
    main()
