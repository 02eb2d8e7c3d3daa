"""Attention-store benchmark at ImageNet-1k train size: size on disk, write throughput through
the real StoreWriter, and the latency of a random single-map read through open_maps.

    python benchmarks/store_bench.py [--n 1281167] [--out DIR]
"""
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from agmae import store

GRID = (14, 14)
BATCH = 1024
READS = 100_000


@click.command()
@click.option("--n", "n_maps", default=1_281_167, show_default=True,
              help="Number of maps to write (default: the ImageNet-1k train set).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for the store; default a temporary directory removed afterwards.")
def main(n_maps, out):
    workdir = out or Path(tempfile.mkdtemp(prefix="store_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(workdir / "maps-bench.h5", n_maps)
    finally:
        if out is None:
            shutil.rmtree(workdir)


def run(path, n_maps):
    keys = [f"n01440764/n01440764_{i}.JPEG" for i in range(n_maps)]
    rng = np.random.default_rng(0)
    batch_maps = rng.random((BATCH, *GRID), dtype=np.float32)
    done = np.full(BATCH, store.STATUS_DONE, dtype=np.uint8)

    started = time.perf_counter()
    writer = store.create(path, keys, GRID, method="tokencut", backbone="vit_small_patch16_224",
                          weights_sha256=None, image_size=224, method_options={}, overwrite=True)
    created = time.perf_counter()
    with writer:
        for start in range(0, n_maps, BATCH):
            size = min(BATCH, n_maps - start)
            writer.write(start, batch_maps[:size], done[:size], [""] * size)
    written = time.perf_counter()

    maps_store = store.open_maps(path)
    opened = time.perf_counter()
    float(maps_store.maps.sum(dtype=np.float32))  # pull every page into the page cache
    indices = rng.integers(0, n_maps, READS)
    latencies = np.empty(READS, dtype=np.int64)
    for j, i in enumerate(indices):
        t0 = time.perf_counter_ns()
        np.array(maps_store.maps[i], dtype=np.float32)
        latencies[j] = time.perf_counter_ns() - t0

    size_mb = path.stat().st_size / 2**20
    print(f"maps: {n_maps} x {GRID[0]}x{GRID[1]} float16, batches of {BATCH}")
    print(f"size on disk: {size_mb:.1f} MiB (raw maps {n_maps * np.prod(GRID) * 2 / 2**20:.1f} MiB)")
    print(f"create (keys + allocation): {created - started:.2f} s")
    print(f"write: {written - created:.2f} s = {n_maps / (written - created):,.0f} maps/s "
          f"(maps and status fsynced per batch)")
    print(f"open_maps (keys read once): {opened - written:.2f} s")
    print(f"random single-map read, page-cached, float32 copy ({READS} reads): "
          f"median {np.median(latencies) / 1e3:.2f} us, p99 {np.percentile(latencies, 99) / 1e3:.2f} us")


if __name__ == "__main__":
    main()
