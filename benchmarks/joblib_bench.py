"""Serial against joblib-parallel CPU work, measured in one run: the image check (`unreadable_images`,
joblib threads) and the demo dataset build (`ensure_demo`, joblib processes). Each is timed with
workers=1 (in this process) and with --workers, from a cold start (a fresh AGMAE_HOME, so no cached decode
check and no cached build), --repeats times; the best time of each counts. It prints both times and the
speed-up ratio, and checks that both paths produced the same result. Each is also timed on the other backend
(`parallel_config`): the image check on joblib's worker processes, which pay a start-up but no GIL, the build on
threads, which share its canvases but hold the GIL through most of a small PNG's encoding.

    python benchmarks/joblib_bench.py [--workers N] [--n-train 10000] [--n-test 10000] [--repeats 3]
"""
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import click
from joblib import parallel_config

from agmae.data import demo, folder


def _best_times(works: dict, repeats: int, workdir: Path) -> dict:
    """{name: (best seconds, result of the last run)} of each `work(home)` of `works` ({name: (work, backend)}), each
    run in a fresh AGMAE_HOME under that joblib backend (None: joblib's default), the variants taking turns so that a
    slow spell of the machine falls on all of them. The homes are deleted at the end, not between runs: deleting
    100,000 files keeps a disk busy (with `discard`, trimming) for a while."""
    best = {name: (float("inf"), None) for name in works}
    for repeat in range(repeats):
        for name, (work, backend) in works.items():
            home = workdir / f"{name}-{repeat}"
            os.environ["AGMAE_HOME"] = str(home)
            with parallel_config(backend=backend) if backend else contextlib.nullcontext():
                started = time.perf_counter()
                result = work(home)
                seconds = time.perf_counter() - started
            best[name] = (min(best[name][0], seconds), result)
    return best


def _digest(root: Path) -> str:
    """SHA-256 over every file of a demo build (relative path and bytes), in path order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _row(name: str, serial: float, parallel: float, workers: int, same: bool) -> str:
    return (f"{name:<13} serial {serial:8.2f} s   joblib x{workers} {parallel:8.2f} s   "
            f"speed-up {serial / parallel:5.2f}x   same result: {same}")


@click.command()
@click.option("--workers", type=click.IntRange(min=2), default=len(os.sched_getaffinity(0)), show_default=True,
              help="Workers of the parallel runs (the serial runs use 1).")
@click.option("--n-train", type=click.IntRange(min=10), default=10000, show_default=True,
              help="Training images of the demo build (each test split holds --n-test).")
@click.option("--n-test", type=click.IntRange(min=10), default=10000, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Cold runs of each path; the fastest counts.")
def main(workers, n_train, n_test, repeats):
    workdir = Path(tempfile.mkdtemp(prefix="joblib_bench-"))
    saved_home = os.environ.get("AGMAE_HOME")
    try:
        def build(n_jobs):
            return lambda home: _digest(demo.ensure_demo(n_train=n_train, n_test=n_test, workers=n_jobs))

        builds = _best_times({"serial": (build(1), None), "parallel": (build(workers), None),
                              "threads": (build(workers), "threading")}, repeats, workdir)

        os.environ["AGMAE_HOME"] = str(workdir / "images")
        index = folder.scan(demo.ensure_demo(n_train=n_train, n_test=n_test, workers=workers) / "train")

        def check(n_jobs):
            return lambda home: folder.unreadable_images(index, workers=n_jobs, progress=False)

        checks = _best_times({"serial": (check(1), None), "parallel": (check(workers), None),
                              "processes": (check(workers), "loky")}, repeats, workdir)
    finally:
        if saved_home is None:
            os.environ.pop("AGMAE_HOME", None)
        else:
            os.environ["AGMAE_HOME"] = saved_home
        shutil.rmtree(workdir)
    print(f"{len(os.sched_getaffinity(0))} CPUs; demo build of 2 x {n_train} + 3 x {n_test} images and their masks; "
          f"image check of its {len(index)} train images in tasks of {folder.DECODE_CHUNK}; best of {repeats}")
    for name, times, other in (("image check", checks, "processes"), ("demo build", builds, "threads")):
        serial, serial_result = times["serial"]
        for label, variant in ((name, "parallel"), (f"  {other}", other)):
            seconds, result = times[variant]
            print(_row(label, serial, seconds, workers, result == serial_result))


if __name__ == "__main__":
    main()
