"""The attention store: round trip, fork-safe reading, resume after a kill, merge, validation."""
import multiprocessing
import os
import shutil
import signal
import time

import h5py
import numpy as np
import pytest
import torch

import agmae
from agmae.store import keys_fingerprint
from agmae import store
from agmae.store import STATUS_DONE, STATUS_FAILED, STATUS_PENDING

GRID = (4, 5)
N = 30
KEYS = [f"class{i % 3}/img_{i:03d}.png" for i in range(N)]
FLOAT16_STEP = 2.0 ** -11  # half the float16 spacing just below 1.0
FAILED_INDEX = 7


def expected_maps(n=N, grid=GRID):
    """Deterministic maps every writer in this file stores (also in forked children)."""
    return np.random.default_rng(0).random((n, *grid), dtype=np.float32)


def expected_status(lo, hi):
    return np.array([STATUS_FAILED if i == FAILED_INDEX else STATUS_DONE for i in range(lo, hi)],
                    dtype=np.uint8)


def make_store(path, keys=KEYS, grid=GRID, **overrides):
    options = dict(method="tokencut", backbone="vit_small_patch16_224", weights_sha256="ab" * 32,
                   image_size=64, method_options={"tau": 0.2, "output": "soft"})
    options.update(overrides)
    return store.create(path, keys, grid, **options)


def write_range(writer, lo, hi, offset=0, batch=4, pause=0.0, grid=GRID, written=None):
    """Write global indices [lo, hi) to a writer whose local index 0 is global `offset`;
    `written` (a shared multiprocessing Value), when given, counts the entries written so far."""
    maps = expected_maps(grid=grid)
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        status = expected_status(start, stop)
        errors = ["unreadable image" if s == STATUS_FAILED else "" for s in status]
        writer.write(start - offset, maps[start:stop], status, errors)
        if written is not None:
            written.value = stop
        time.sleep(pause)


def full_store(path):
    with make_store(path) as writer:
        write_range(writer, 0, N)
    return path


def raw(path):
    """Everything a reader sees in a store, for byte-for-byte comparisons."""
    with h5py.File(path, "r") as f:
        return {name: f[name][:] for name in ("maps", "keys", "status", "errors")}


def assert_same_content(path_a, path_b):
    a, b = raw(path_a), raw(path_b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["maps"].tobytes() == b["maps"].tobytes()


def test_round_trip(tmp_path):
    path = tmp_path / "maps.h5"
    maps = expected_maps()
    maps[0, 0, 0], maps[0, 0, 1] = 1.3, -0.2
    maps[3, 1, 1] = np.nan
    with make_store(path) as writer:
        assert writer.first_pending() == 0
        writer.write(0, maps[:10], expected_status(0, 10),
                     ["" if i != FAILED_INDEX else "unreadable image" for i in range(10)])
        assert writer.counts() == {"done": 8, "failed": 2, "pending": 20}
    read = store.open_maps(path)
    assert isinstance(read.maps, np.memmap) and read.maps.dtype == np.float16
    assert read.maps.shape == (N, *GRID) and len(read) == N
    assert read.keys == KEYS
    done = [i for i in range(10) if i not in (3, FAILED_INDEX)]
    clipped = np.clip(maps, 0, 1)
    np.testing.assert_allclose(read.maps[done].astype(np.float32), clipped[done], atol=FLOAT16_STEP, rtol=0)
    assert read.maps[0, 0, 0] == 1.0 and read.maps[0, 0, 1] == 0.0
    assert not read.maps[[3, FAILED_INDEX]].any(), "failed entries are stored as zero maps"
    assert read.status.tolist() == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1] + [STATUS_PENDING] * 20
    assert read.errors[3] == "non-finite map" and read.errors[FAILED_INDEX] == "unreadable image"
    assert read.errors[0] == "" and read.errors[20] == ""
    attrs = read.attrs
    assert attrs["format_version"] == 1 and attrs["method"] == "tokencut"
    assert attrs["backbone"] == "vit_small_patch16_224" and attrs["weights_sha256"] == "ab" * 32
    assert attrs["image_size"] == 64 and attrs["grid"] == GRID
    assert attrs["method_options"] == {"tau": 0.2, "output": "soft"}
    assert attrs["keys_sha256"] == keys_fingerprint(KEYS)
    assert attrs["shard"] is None and attrs["index_range"] is None
    assert attrs["agmae_version"] == agmae.__version__ and attrs["created"][:2] == "20"
    with h5py.File(path, "r") as f:
        assert f["maps"].chunks is None and f["maps"].compression is None


def test_failed_creation_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(OSError):
        make_store(tmp_path / "maps.h5")
    assert list(tmp_path.iterdir()) == []


class StoreDataset(torch.utils.data.Dataset):
    def __init__(self, path):
        self.store = store.open_maps(path)

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return i, torch.from_numpy(np.array(self.store.maps[i], dtype=np.float32))


def test_forked_dataloader_workers_read_right_maps(tmp_path):
    path = full_store(tmp_path / "maps.h5")
    loader = torch.utils.data.DataLoader(StoreDataset(path), batch_size=4, shuffle=True,
                                         num_workers=2, multiprocessing_context="fork",
                                         generator=torch.Generator().manual_seed(0))
    reference = expected_maps().astype(np.float16).astype(np.float32)
    reference[FAILED_INDEX] = 0
    seen = []
    for indices, maps in loader:
        np.testing.assert_array_equal(maps.numpy(), reference[indices.numpy()])
        seen += indices.tolist()
    assert sorted(seen) == list(range(N)) and seen != sorted(seen)


def test_reopen_resumes_at_first_pending(tmp_path):
    path = tmp_path / "maps.h5"
    with make_store(path) as writer:
        write_range(writer, 0, 12)
    with make_store(path) as writer:
        assert writer.first_pending() == 12
        assert writer.counts() == {"done": 11, "failed": 1, "pending": 18}
        with pytest.raises(ValueError, match="next index to write is 12"):
            writer.write(8, expected_maps()[8:12], expected_status(8, 12), [""] * 4)
        write_range(writer, 12, N)
        assert writer.first_pending() == N
    assert_same_content(path, full_store(tmp_path / "uninterrupted.h5"))


@pytest.mark.parametrize("change, attr", [
    ({"method": "dino"}, "method"),
    ({"grid": (2, 2)}, "grid"),
    ({"method_options": {"tau": 0.3}}, "method_options"),
    ({"keys": KEYS[::-1]}, "keys_sha256"),
])
def test_incompatible_existing_store_needs_overwrite(tmp_path, change, attr):
    path = tmp_path / "maps.h5"
    with make_store(path) as writer:
        write_range(writer, 0, 8)
    with pytest.raises(ValueError) as err:
        make_store(path, **change)
    assert str(path) in str(err.value) and attr in str(err.value) and "overwrite" in str(err.value)
    with make_store(path, overwrite=True, **change) as writer:
        assert writer.first_pending() == 0


def _slow_writer(path, written):
    with make_store(path) as writer:
        write_range(writer, 0, N, batch=2, pause=0.005, written=written)


def test_killed_writer_leaves_correct_done_entries_and_resumes(tmp_path):
    path = tmp_path / "maps.h5"
    context = multiprocessing.get_context("fork")
    # The writer reports its progress through shared memory: opening the HDF5 file while the writer
    # appends its variable-length error strings can read a half-updated heap (no SWMR).
    written = context.Value("i", 0)
    child = context.Process(target=_slow_writer, args=(path, written))
    child.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and written.value < 8:
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    killed = store.validate(path)
    done = np.flatnonzero(killed.status != STATUS_PENDING)
    assert 8 <= len(done) < N, "the kill should land part-way through the write"
    assert done.tolist() == list(range(len(done))), "written entries form a prefix"
    reference = expected_maps().astype(np.float16)
    reference[FAILED_INDEX] = 0
    np.testing.assert_array_equal(killed.maps[done], reference[done])
    np.testing.assert_array_equal(killed.status[done], expected_status(0, len(done)))

    with make_store(path) as writer:
        resume_at = writer.first_pending()
        assert resume_at == len(done)
        write_range(writer, resume_at, N)
        assert writer.counts() == {"done": N - 1, "failed": 1, "pending": 0}
    assert_same_content(path, full_store(tmp_path / "uninterrupted.h5"))


SHARD_RANGES = [(0, 10), (10, 20), (20, N)]


def make_shard(directory, k, lo, hi, n=3, keys=KEYS, finish=True, **overrides):
    path = directory / f"shard-{k}-{lo}-{hi}.h5"
    with make_store(path, keys=keys[lo:hi], keys_sha256=keys_fingerprint(keys),
                    shard=(k, n), index_range=(lo, hi), **overrides) as writer:
        write_range(writer, lo, hi if finish else lo + 2, offset=lo, grid=overrides.get("grid", GRID))
    return path


def test_merge_equals_single_file_write(tmp_path):
    shards = [make_shard(tmp_path, k, lo, hi) for k, (lo, hi) in enumerate(SHARD_RANGES)]
    assert store.open_maps(shards[1]).attrs["index_range"] == (10, 20)
    merged = store.merge(shards[::-1], tmp_path / "merged.h5")
    assert_same_content(merged, full_store(tmp_path / "single.h5"))
    read = store.validate(merged, dataset_keys=KEYS)
    assert read.keys == KEYS and read.attrs["shard"] is None and read.attrs["index_range"] is None
    assert read.attrs["keys_sha256"] == keys_fingerprint(KEYS)
    assert read.errors[FAILED_INDEX] == "unreadable image"


@pytest.mark.parametrize("case, problem", [
    ("gap", "gap"),
    ("overlap", "overlap"),
    ("method", "method"),
    ("grid", "grid"),
    ("method_options", "method_options"),
    ("fingerprint", "keys_sha256"),
    ("missing_last", "fingerprint"),
    ("pending", "pending"),
])
def test_merge_refuses_bad_shards(tmp_path, case, problem):
    good = [make_shard(tmp_path, k, lo, hi) for k, (lo, hi) in enumerate(SHARD_RANGES[:2])]
    other_keys = KEYS[:-1] + ["class9/other.png"]
    last = {
        "gap": lambda: [make_shard(tmp_path, 2, 22, N)],
        "overlap": lambda: [make_shard(tmp_path, 2, 15, N)],
        "method": lambda: [make_shard(tmp_path, 2, 20, N, method="dino")],
        "grid": lambda: [make_shard(tmp_path, 2, 20, N, grid=(2, 2))],
        "method_options": lambda: [make_shard(tmp_path, 2, 20, N, method_options={"tau": 0.3})],
        "fingerprint": lambda: [make_shard(tmp_path, 2, 20, N, keys=other_keys)],
        "missing_last": lambda: [],
        "pending": lambda: [make_shard(tmp_path, 2, 20, N, finish=False)],
    }[case]()
    out = tmp_path / "merged.h5"
    with pytest.raises(ValueError, match=problem) as err:
        store.merge(good + last, out)
    assert "shard-" in str(err.value) or str(out) in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


@pytest.fixture
def good_store(tmp_path):
    return full_store(tmp_path / "maps.h5")


def test_validate_accepts_good_store(good_store):
    assert len(store.validate(good_store, dataset_keys=KEYS)) == N


def _set_map(value):
    def damage(f):
        f["maps"][3, 1, 2] = value
    return damage


def _drop_format_version(f):
    del f.attrs["format_version"]


def _reshape_maps(f):
    del f["maps"]
    f.create_dataset("maps", (N, 3, 3), np.float16)


def _alter_keys(f):
    f["keys"][0] = "class0/renamed.png"


@pytest.mark.parametrize("damage, problem", [
    (_set_map(np.nan), "NaN or inf"),
    (_set_map(np.inf), "NaN or inf"),
    (_set_map(1.5), r"outside \[0, 1\]"),
    (lambda f: f.attrs.__setitem__("format_version", 2), "format_version is 2"),
    (_drop_format_version, "no format_version"),
    (_reshape_maps, r"/maps is float16\[30, 3, 3\], expected float16\[30, 4, 5\]"),
    (_alter_keys, "keys hash to"),
])
def test_validate_refuses_damaged_store(good_store, damage, problem):
    with h5py.File(good_store, "r+") as f:
        damage(f)
    with pytest.raises(ValueError, match=problem) as err:
        store.validate(good_store)
    assert str(good_store) in str(err.value)


def test_validate_refuses_wrong_dataset_fingerprint(good_store):
    with pytest.raises(ValueError, match="differs from the dataset's") as err:
        store.validate(good_store, dataset_keys=KEYS[:-1])
    assert str(good_store) in str(err.value)
    assert keys_fingerprint(KEYS[:-1]) in str(err.value)


def test_validate_refuses_truncated_file(good_store, tmp_path):
    copy = tmp_path / "truncated.h5"
    shutil.copy(good_store, copy)
    os.truncate(copy, os.path.getsize(copy) - 1024)
    with pytest.raises(ValueError, match="truncated") as err:
        store.validate(copy)
    assert str(copy) in str(err.value)


def _half(path, tmp_path):
    damaged = tmp_path / "half.h5"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damaged


def _random_bytes(path, tmp_path):
    damaged = tmp_path / "random.h5"
    damaged.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    return damaged


def _foreign_hdf5(path, tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("maps", data=np.zeros((N, *GRID), np.float16))
    return foreign


@pytest.mark.parametrize("damage, problem", [
    (_half, "damaged attention store, truncated: the file has"),
    (_random_bytes, "damaged attention store, not an HDF5 file"),
    (_foreign_hdf5, "an HDF5 file, but not an agmae attention store"),
])
def test_a_damaged_store_is_called_damaged_by_readers_and_writers(good_store, tmp_path, damage, problem):
    damaged = damage(good_store, tmp_path)
    for attempt in (lambda: store.open_maps(damaged), lambda: store.validate(damaged), lambda: make_store(damaged)):
        with pytest.raises(agmae.errors.UserError, match=problem) as err:
            attempt()
        assert str(damaged) in str(err.value) and "lock" not in str(err.value)


def _hold_for_writing(path, ready, release):
    with h5py.File(path, "r+"):
        ready.set()
        release.wait(30)


def test_only_a_store_another_process_writes_is_reported_locked(tmp_path):
    path = tmp_path / "maps.h5"
    with make_store(path) as writer:
        write_range(writer, 0, 8)
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_for_writing, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(agmae.errors.UserError, match="another job is writing this store") as err:
            make_store(path)
        assert str(path) in str(err.value)
        assert store.open_maps(path).counts()["done"] == 7, "readers do not take the lock"
    finally:
        release.set()
        holder.join()
    with make_store(path) as writer:
        assert writer.first_pending() == 8


def test_a_store_under_a_regular_file_names_the_file(tmp_path):
    (tmp_path / "runs").write_text("a file where a folder should be")
    with pytest.raises(agmae.errors.UserError, match="its parent .*runs is a file, not a directory"):
        make_store(tmp_path / "runs" / "default" / "maps.h5")


def test_a_changed_dataset_is_named_by_the_images_added_and_removed(good_store):
    added = KEYS + ["class0/new_1.png", "class1/new_2.png"]
    with pytest.raises(agmae.errors.UserError, match=r"2 images added \(class0/new_1.png, class1/new_2.png\)") as err:
        store.validate(good_store, dataset_keys=added)
    assert "recompute" in str(err.value)
    with pytest.raises(agmae.errors.UserError, match=r"1 image removed \(class0/img_000.png\)"):
        store.validate(good_store, dataset_keys=KEYS[1:])
    many = KEYS + [f"class0/new_{i}.png" for i in range(5)]
    with pytest.raises(agmae.errors.UserError, match=r"5 images added \(class0/new_0.png, class0/new_1.png, "
                                                     r"class0/new_2.png, \.\.\.\)"):
        make_store(good_store, keys=many)
    with pytest.raises(agmae.errors.UserError, match="the same images in another order"):
        store.validate(good_store, dataset_keys=KEYS[::-1])


def test_inspect_calls_a_truncated_store_truncated_in_one_line(good_store, tmp_path):
    from click.testing import CliRunner

    from agmae.cli.discover import main

    damaged = _half(good_store, tmp_path)
    result = CliRunner().invoke(main, ["inspect", str(damaged)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith(f"Error: {damaged}: damaged attention store, truncated: the file has ")
    assert "lock" not in errors[0] and errors[0].endswith("recompute it (agmae-discover --overwrite) or copy it again")
