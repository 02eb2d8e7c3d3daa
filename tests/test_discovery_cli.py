"""`agmae-discover`: shards + merge equal one run, resume, no silent clobbering, bad files, defaults,
inspect, the SLURM script."""
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import agmae.discovery.tokencut
from agmae.data.folder import scan
from agmae import preemption, store
from agmae.data.folder import load_rgb
from agmae.cli import discover as discover_cli
from agmae.discovery import inspect as store_inspect
from agmae.discovery import run as discovery_run
from agmae.cli.train import main as train_cli

pytestmark = pytest.mark.filterwarnings("ignore::agmae.discovery.backbones.RandomInitWarning")
REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--method", "tokencut", "--backbone", "test_vit", "--random-init", "--image-size", "32", "--workers", "0"]


@pytest.fixture(scope="module")
def small_dataset(demo_root, tmp_path_factory):
    """24 demo training images (every 10th: all ten classes) and their masks, laid out like the demo."""
    root = tmp_path_factory.mktemp("small")
    for key in scan(demo_root / "train").keys[::10]:
        for sub in ("train", "masks/train"):
            (root / sub / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_root / sub / key, root / sub / key)
    return root


def run(*args):
    return CliRunner().invoke(discover_cli.main, [str(a) for a in args])


def contents(path):
    """Everything a store holds except the attrs that say when/how it was made."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()
                 if k not in ("created", "shard", "index_range")}
        return {name: f[name][:] for name in ("maps", "status", "keys", "errors")}, attrs


def assert_same_store(a, b):
    (arrays_a, attrs_a), (arrays_b, attrs_b) = contents(a), contents(b)
    assert attrs_a == attrs_b
    for name in arrays_a:
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name])


def test_shards_run_concurrently_and_merge_into_the_single_run(small_dataset, tmp_path):
    out = tmp_path / "maps.h5"
    shards = [subprocess.Popen([sys.executable, "-m", "agmae.cli.discover", *SMOKE, "--data", str(small_dataset),
                                "--out", str(out), "--batch-size", "5", "--shard", f"{k}/2"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for k in range(2)]
    single = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "single.h5", "--batch-size", "7")
    assert single.exit_code == 0, single.output
    for shard in shards:
        output, _ = shard.communicate(timeout=300)
        assert shard.returncode == 0, output
        assert "12 done, 0 failed" in output
    shard_files = [tmp_path / f"maps.shard-{k}-of-2.h5" for k in range(2)]
    assert [store.open_maps(p).attrs["index_range"] for p in shard_files] == [(0, 12), (12, 24)]
    merged = run("merge", *shard_files, "--out", out)
    assert merged.exit_code == 0, merged.output
    assert_same_store(out, tmp_path / "single.h5")
    assert store.validate(out, scan(small_dataset / "train").keys).status.min() == store.STATUS_DONE


def test_an_interrupted_run_resumes_where_it_stopped(small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "maps.h5"
    original = agmae.discovery.tokencut.TokenCut.compute
    calls = []

    def dies_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(agmae.discovery.tokencut.TokenCut, "compute", dies_on_third_batch)
    assert isinstance(run(*SMOKE, "--data", small_dataset, "--out", out, "--batch-size", "5").exception, RuntimeError)
    assert store.open_maps(out).status.tolist() == [1] * 10 + [0] * 14
    monkeypatch.setattr(agmae.discovery.tokencut.TokenCut, "compute", original)
    resumed = run(*SMOKE, "--data", small_dataset, "--out", out, "--batch-size", "5")
    assert resumed.exit_code == 0 and "resuming" in resumed.output and "image 10 of 24" in resumed.output
    fresh = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "fresh.h5", "--batch-size", "5")
    assert fresh.exit_code == 0
    assert_same_store(out, tmp_path / "fresh.h5")


def test_a_complete_store_is_kept_unless_overwrite(small_dataset, tmp_path):
    out = tmp_path / "maps.h5"
    assert run(*SMOKE, "--data", small_dataset, "--out", out).exit_code == 0
    before = contents(out)
    again = run(*SMOKE, "--data", small_dataset, "--out", out)
    assert again.exit_code == 0 and "already complete" in again.output and "24 done" in again.output
    np.testing.assert_array_equal(contents(out)[0]["maps"], before[0]["maps"])
    different = run(*SMOKE, "--data", small_dataset, "--out", out, "--tau", "0.5")
    assert different.exit_code != 0 and "tau" in different.output and "--overwrite" in different.output
    redone = run(*SMOKE, "--data", small_dataset, "--out", out, "--tau", "0.5", "--overwrite")
    assert redone.exit_code == 0 and store.open_maps(out).attrs["method_options"]["tau"] == 0.5


def test_unreadable_files_fail_alone_and_the_failure_budget_decides_the_exit(small_dataset, tmp_path):
    data = tmp_path / "data" / "train"
    shutil.copytree(small_dataset / "train", data)
    first = sorted(data.glob("*/*.png"))[0]
    (data / "bad").mkdir()
    (data / "bad" / "empty.png").write_bytes(b"")
    (data / "bad" / "text.png").write_text("not an image")
    (data / "bad" / "truncated.png").write_bytes(first.read_bytes()[:200])
    lenient = run(*SMOKE, "--data", data.parent, "--out", tmp_path / "a.h5", "--max-failures", "0.2")
    assert lenient.exit_code == 0, lenient.output
    assert "24 done, 3 failed" in lenient.output
    maps = store.open_maps(tmp_path / "a.h5")
    failed = {key: err for key, err, s in zip(maps.keys, maps.errors, maps.status) if s == store.STATUS_FAILED}
    assert sorted(failed) == ["bad/empty.png", "bad/text.png", "bad/truncated.png"]
    assert all(key in err for key, err in failed.items())
    strict = run(*SMOKE, "--data", data.parent, "--out", tmp_path / "b.h5")
    assert strict.exit_code == 1 and "3 of 27 images failed" in strict.output


def test_a_preemption_signal_saves_the_batch_in_flight_exits_75_and_the_rerun_finishes_the_same_store(
        small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "maps.h5"
    original = agmae.discovery.tokencut.TokenCut.compute
    calls = []

    def signalled_during_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends before it preempts the job
        return original(self, *args, **kwargs)

    monkeypatch.setattr(agmae.discovery.tokencut.TokenCut, "compute", signalled_during_second_batch)
    stopped = run(*SMOKE, "--data", small_dataset, "--out", out, "--batch-size", "5")
    assert stopped.exit_code == preemption.PREEMPTED == 75
    assert "SIGTERM: stopped at image 10 of 24" in stopped.output
    assert store.open_maps(out).status.tolist() == [1] * 10 + [0] * 14
    monkeypatch.setattr(agmae.discovery.tokencut.TokenCut, "compute", original)
    assert run(*SMOKE, "--data", small_dataset, "--out", out, "--batch-size", "5").exit_code == 0
    assert run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "fresh.h5", "--batch-size", "5").exit_code == 0
    assert_same_store(out, tmp_path / "fresh.h5")


def test_an_internal_error_keeps_its_traceback_and_a_user_error_is_one_line(small_dataset, tmp_path, monkeypatch):
    def broadcasting_bug(self, *args, **kwargs):
        return np.zeros((2, 3)) + np.zeros((4, 5))  # a numpy ValueError: a bug, not bad input

    monkeypatch.setattr(agmae.discovery.tokencut.TokenCut, "compute", broadcasting_bug)
    bug = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "a.h5")
    assert isinstance(bug.exception, ValueError) and "broadcast" in str(bug.exception) and bug.exit_code == 1
    assert not bug.output.startswith("Error:")  # not dressed up as a one-line user error
    bad = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "b.h5", "--shard", "4/4")
    assert bad.exit_code == 1 and bad.output.strip().splitlines() == ["Error: --shard 4/4: need 0 <= K < N"]


def test_defaults_find_masks_and_run_dir_and_a_missing_mask_fails_by_name(small_dataset, tmp_path, monkeypatch):
    data = tmp_path / "demo"
    shutil.copytree(small_dataset, data)
    missing = sorted((data / "masks" / "train").glob("*/*.png"))[0]
    missing.unlink()
    monkeypatch.setenv("AGMAE_RUN_DIR", str(tmp_path / "run"))
    result = run("--method", "oracle", "--data", data, "--workers", "0", "--max-failures", "0.1")
    assert result.exit_code == 0, result.output
    maps = store.open_maps(tmp_path / "run" / "maps-oracle.h5")
    assert maps.attrs["method_options"]["masks"] == str(data / "masks" / "train")
    failed = np.flatnonzero(maps.status == store.STATUS_FAILED)
    assert [maps.keys[i] for i in failed] == [missing.relative_to(missing.parents[1]).as_posix()]
    assert maps.errors[failed[0]] == f"missing mask file {missing}"


def test_options_of_another_method_and_a_missing_method_are_usage_errors():
    wrong = run("--method", "dino", "--tau", "0.3")
    assert wrong.exit_code == 2 and "--tau does not apply to --method dino" in wrong.output
    assert run().exit_code == 2


def test_backbone_without_weights_fails_in_one_line_before_touching_data(tmp_path):
    result = run("--method", "tokencut", "--backbone", "test_vit", "--out", tmp_path / "x.h5")
    assert result.exit_code == 1 and "--weights" in result.output and "--random-init" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_inspect_summarises_and_draws_overlays(small_dataset, tmp_path):
    out = tmp_path / "maps.h5"
    assert run(*SMOKE, "--data", small_dataset, "--out", out).exit_code == 0
    result = run("inspect", out, "--png", tmp_path / "grid.png", "--count", "10", "--data", small_dataset)
    assert result.exit_code == 0, result.output
    assert "24 done, 0 failed, 0 pending" in result.output and '"fg_rule": "seed"' in result.output
    histogram = [line for line in result.output.splitlines() if line.startswith("  0.") or line.startswith("  1.")]
    assert len(histogram) == 10 and sum(int(line.split()[1]) for line in histogram) == 24 * 2 * 2
    with Image.open(tmp_path / "grid.png") as png:
        assert png.width > png.height > 0


def test_inspect_finds_the_store_s_own_images_and_refuses_others(small_dataset, tmp_path, monkeypatch):
    out = tmp_path / "maps.h5"
    assert run(*SMOKE, "--data", small_dataset, "--out", out).exit_code == 0
    assert store.open_maps(out).attrs["image_root"] == str((small_dataset / "train").resolve())
    drawn = []
    monkeypatch.setattr(store_inspect, "draw", lambda maps, images, path, columns: drawn.append(images))
    result = run("inspect", out, "--png", tmp_path / "grid.png", "--count", "4")  # no --data: the recorded root
    assert result.exit_code == 0, result.output
    keys = store.open_maps(out).keys
    shown = [keys[i] for i in (0, 8, 15, 23)]  # spread over the store, so over its classes
    assert len({key.split("/")[0] for key in shown}) > 1
    assert [np.asarray(image).tolist() for image in drawn[0]] == [
        np.asarray(load_rgb(small_dataset / "train" / key)).tolist() for key in shown]
    other = tmp_path / "other"
    shutil.copytree(small_dataset, other)
    next(other.glob("train/*/*.png")).unlink()
    refused = run("inspect", out, "--png", tmp_path / "grid.png", "--data", other)
    assert refused.exit_code == 1 and "holds other images than" in refused.output


def test_every_stage_takes_the_dataset_root_and_names_the_fix_for_a_split_folder(small_dataset, tmp_path):
    split = run(*SMOKE, "--data", small_dataset / "train", "--out", tmp_path / "maps.h5")
    assert split.exit_code == 1 and len(split.output.strip().splitlines()) == 1
    assert f"pass --data {small_dataset} --train-split train" in split.output
    unknown = run(*SMOKE, "--data", small_dataset, "--train-split", "val", "--out", tmp_path / "maps.h5")
    assert unknown.exit_code == 1 and "no split folder 'val' (it has: masks, train)" in unknown.output
    assert not (tmp_path / "maps.h5").exists()
    train_result = CliRunner().invoke(train_cli, ["--no-guidance", "--data", str(small_dataset / "train"),
                                                  "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert train_result.exit_code == 1 and f"pass --data {small_dataset} --train-split train" in train_result.output


def test_shard_comes_from_the_flag_or_slurm(monkeypatch):
    assert discovery_run.parse_shard("1/4") == (1, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert discovery_run.parse_shard(None) == (2, 3)
    ranges = [discovery_run.shard_range(k, 3, 10) for k in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(Exception, match="0 <= K < N"):
        discovery_run.parse_shard("4/4")


def test_sbatch_submits_one_array_and_a_dependent_merge(tmp_path):
    log = tmp_path / "sbatch.log"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho 42\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    env.pop("SLURM_ARRAY_TASK_ID", None)
    result = subprocess.run(["bash", str(REPO / "pipeline" / "discover.sbatch"), "3", "--method", "dino",
                             "--out", "/run/maps-dino.h5"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    array, merge = log.read_text().splitlines()
    assert array.startswith("--parsable --array=0-2 ") and array.endswith("--method dino --out /run/maps-dino.h5")
    assert "--dependency=afterok:42" in merge
    assert ("agmae-discover merge '/run/maps-dino.shard-0-of-3.h5' '/run/maps-dino.shard-1-of-3.h5' "
            "'/run/maps-dino.shard-2-of-3.h5' --out '/run/maps-dino.h5'") in merge


def test_a_store_another_job_is_writing_is_not_taken_over(small_dataset, tmp_path):
    out = tmp_path / "maps.h5"
    assert run(*SMOKE, "--data", small_dataset, "--out", out).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('locked', flush=True); time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run(*SMOKE, "--data", small_dataset, "--out", out)
    finally:
        holder.kill()
    assert second.exit_code == 1 and "another job is writing this store" in second.output
    assert "--overwrite would leave" in second.output and second.output.count("Error") == 1


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing_that_looks_complete(small_dataset, tmp_path,
                                                                                       monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "maps.h5"))

    monkeypatch.setattr(store.StoreWriter, "write", full)
    result = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "maps.h5")
    assert result.exit_code == 1 and "No space left on device; free space there" in result.output
    assert "Traceback" not in result.output
    assert store.open_maps(tmp_path / "maps.h5").counts()["done"] == 0  # resumable, not complete


def test_a_read_only_file_system_reports_a_complete_store_and_refuses_the_rest_in_one_line(small_dataset,
                                                                                           tmp_path, monkeypatch):
    complete, unfinished = tmp_path / "complete.h5", tmp_path / "unfinished.h5"
    assert run(*SMOKE, "--data", small_dataset, "--out", complete).exit_code == 0
    shutil.copy(complete, unfinished)
    with h5py.File(unfinished, "r+") as f:
        f["status"][-3:] = store.STATUS_PENDING
    opened = h5py.File

    def read_only(path, mode="r", **kwargs):
        if mode != "r":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return opened(path, mode, **kwargs)

    monkeypatch.setattr(h5py, "File", read_only)
    again = run(*SMOKE, "--data", small_dataset, "--out", complete)
    assert again.exit_code == 0 and "is already complete; nothing recomputed" in again.output
    refused = run(*SMOKE, "--data", small_dataset, "--out", unfinished)
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "cannot be opened for writing (Read-only file system)" in refused.output
    assert "an unfinished one needs a writable --out" in refused.output
    fresh = run(*SMOKE, "--data", small_dataset, "--out", tmp_path / "new" / "maps.h5")
    assert fresh.exit_code == 1 and fresh.output.count("\n") == 1
    assert "Read-only file system; the file system is read-only; write to another --out" in fresh.output
    assert not (tmp_path / "new" / "maps.h5").exists()


def test_oracle_reads_only_the_masks(small_dataset, tmp_path, monkeypatch):
    def no_image_may_be_opened(path):
        raise AssertionError(f"oracle opened image {path}")

    monkeypatch.setattr(discovery_run, "load_rgb", no_image_may_be_opened)
    result = run("--method", "oracle", "--patch", "8", "--data", small_dataset, "--out", tmp_path / "maps.h5",
                 "--workers", "0", "--image-size", "64")
    assert result.exit_code == 0, result.output
    maps = store.open_maps(tmp_path / "maps.h5")
    assert maps.counts()["done"] == len(maps) == 24
    assert np.asarray(maps.maps).max() == 1.0
