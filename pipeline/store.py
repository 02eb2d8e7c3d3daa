"""The attention store, format version 1: one HDF5 file of per-image maps
(docs/ARCHITECTURE.md#the-attention-store).

Layout: `/maps` float16 `[N, h, w]` and `/status` uint8 `[N]`, both contiguous so readers
`np.memmap` them; `/keys` and `/errors` utf-8 strings `[N]`; identity in the file's attrs.
Writers go in index order and make each batch's maps durable before the status that marks
them done, so a killed job leaves only correct done entries and resumes at `first_pending()`.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

import agmae
from agmae.errors import UserError

FORMAT_VERSION = 1
STATUS_PENDING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
# Attributes that say what a store holds; two stores agree when these match.
IDENTITY_ATTRS = ("format_version", "method", "backbone", "weights_sha256", "image_size", "grid",
                  "method_options", "keys_sha256", "shard", "index_range")
_MERGE_ATTRS = ("method", "backbone", "weights_sha256", "image_size", "grid", "method_options",
                "keys_sha256")
_STRINGS = h5py.string_dtype("utf-8")
_ROWS_PER_STEP = 65536  # maps validated or merged per step: ~25 MB of float32 at 14x14


def keys_fingerprint(keys) -> str:
    """Fingerprint of a dataset order: hex SHA-256 of the keys joined by newlines, UTF-8 (the store's
    `keys_sha256` attribute; image-folder indexes carry the same fingerprint)."""
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


def _identity(keys, grid, method, backbone, weights_sha256, image_size, method_options,
              keys_sha256, shard, index_range) -> dict:
    """The identity attrs in the normalised form they are stored and compared in."""
    if (shard is None) != (index_range is None):
        raise UserError("a shard store needs both shard=(k, n) and index_range=(lo, hi)")
    if shard is not None:
        lo, hi = index_range
        if hi - lo != len(keys):
            raise UserError(f"index_range {tuple(index_range)} holds {hi - lo} images "
                             f"but {len(keys)} keys were given")
        if keys_sha256 is None:
            raise UserError("a shard store needs keys_sha256 = the full dataset's fingerprint")
    return {"format_version": FORMAT_VERSION, "method": method, "backbone": backbone or "",
            "weights_sha256": weights_sha256 or "", "image_size": int(image_size),
            "grid": tuple(int(g) for g in grid),
            "method_options": json.dumps(method_options or {}, sort_keys=True),
            "keys_sha256": keys_sha256 or keys_fingerprint(keys),
            "shard": None if shard is None else tuple(int(s) for s in shard),
            "index_range": None if index_range is None else tuple(int(i) for i in index_range)}


def _read_attrs(f: h5py.File) -> dict:
    """File attrs as plain Python: ints, strings, tuples; absent identity attrs as None."""
    attrs = {name: None for name in IDENTITY_ATTRS}
    for name, value in f.attrs.items():
        if isinstance(value, np.ndarray):
            value = tuple(value.tolist())
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[name] = value
    return attrs


class NotWritableError(UserError):
    """The store's file system refuses writes (read-only, no permission)."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _lock_held(path: Path, err: OSError) -> bool:
    """Whether another process holds the file's lock: HDF5 reports a refused lock as EAGAIN (BlockingIOError);
    without that, ask the file system whether a shared lock would be refused right now."""
    if isinstance(err, BlockingIOError) or err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as probe:
        return probe.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _has_hdf5_signature(path: Path) -> bool:
    """HDF5's superblock starts with its signature at byte 0, 512, 1024, 2048, ... (a user block may precede it)."""
    size, offset = path.stat().st_size, 0
    with open(path, "rb") as f:
        while offset + len(HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _damage(path: Path, err: OSError) -> str:
    """What is wrong with a file HDF5 will not open, told from the file itself where it can be."""
    if not _has_hdf5_signature(path):
        return f"not an HDF5 file ({path.stat().st_size} bytes, no HDF5 signature)"
    stored = re.search(r"\bstored_eof = (\d+)", str(err))
    if stored and int(stored.group(1)) > path.stat().st_size:
        return (f"truncated: the file has {path.stat().st_size} bytes, its HDF5 header says "
                f"{int(stored.group(1))} (an interrupted copy or a full disk?)")
    return f"a damaged HDF5 file ({err})"


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open with HDF5's file lock off for readers, so `inspect` can look at a store a job is writing.
    Without SWMR such a read can still meet a half-updated /errors heap and fail; retry it."""
    try:
        return h5py.File(path, mode, locking=False if mode == "r" else None)
    except OSError as err:
        if mode != "r" and _lock_held(path, err):
            raise UserError(f"{path}: another job is writing this store (it holds the file's lock); wait for it "
                             f"to finish or write to another --out (--overwrite would leave that job writing to an "
                             f"unlinked file)") from err
        if mode != "r" and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise NotWritableError(f"{path}: cannot be opened for writing ({err.strerror}); a complete store is "
                                   f"read where it lies (agmae-train --maps, agmae-discover inspect), an "
                                   f"unfinished one needs a writable --out") from err
        if err.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"{path}: cannot be read ({err.strerror}); give yourself read access to it") from err
        raise UserError(f"{path}: damaged attention store, {_damage(path, err)}; recompute it "
                         f"(agmae-discover --overwrite) or copy it again") from err


def _require_store(path: Path, attrs: dict) -> None:
    """Refuse an HDF5 file that agmae-discover did not write."""
    if attrs["format_version"] is None:
        raise UserError(f"{path}: an HDF5 file, but not an agmae attention store (no format_version attribute); "
                         f"pass the maps-<method>.h5 that agmae-discover wrote, or write the store to another --out")


def _contiguous(path: Path, f: h5py.File, name: str, shape: tuple, dtype) -> int:
    """Byte offset of dataset `name`, after checking it is the memmap-able array the format says."""
    if name not in f:
        raise UserError(f"{path}: dataset /{name} is missing")
    ds = f[name]
    if ds.shape != shape or ds.dtype != np.dtype(dtype):
        raise UserError(f"{path}: /{name} is {ds.dtype}{list(ds.shape)}, expected "
                         f"{np.dtype(dtype)}{list(shape)}")
    offset = ds.id.get_offset()
    if ds.chunks is not None or ds.compression is not None or offset is None:
        raise UserError(f"{path}: /{name} is not stored contiguously, so it cannot be memory-mapped")
    if offset + ds.nbytes > path.stat().st_size:
        raise UserError(f"{path}: /{name} ends at byte {offset + ds.nbytes} but the file has "
                         f"{path.stat().st_size} bytes (truncated copy?)")
    return offset


def status_counts(status) -> dict:
    """{"done": ..., "failed": ..., "pending": ...} of a /status array."""
    per_code = np.bincount(np.asarray(status), minlength=3)
    return {"done": int(per_code[STATUS_DONE]), "failed": int(per_code[STATUS_FAILED]),
            "pending": int(per_code[STATUS_PENDING])}


class MapStore:
    """Read-only view of a store: `.maps` float16 `[N, h, w]` and `.status` uint8 `[N]` are
    `np.memmap`s; `.keys` (list of str) and `.attrs` (dict) were read once. No h5py handle stays
    open, so a MapStore can be used inside forked DataLoader workers."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such attention store; run agmae-discover first")
        with _open_h5(self.path) as f:
            self.attrs = _read_attrs(f)
            _require_store(self.path, self.attrs)
            version = self.attrs["format_version"]
            if version != FORMAT_VERSION:
                raise UserError(f"{self.path}: format_version is {version}, this agmae reads "
                                 f"version {FORMAT_VERSION}; recompute the store")
            self.attrs["method_options"] = json.loads(self.attrs["method_options"])
            for name in ("keys", "errors"):
                if name not in f or f[name].ndim != 1:
                    raise UserError(f"{self.path}: dataset /{name} is missing or not one-dimensional")
            n = f["keys"].shape[0]
            if f["errors"].shape != (n,):
                raise UserError(f"{self.path}: /errors has {f['errors'].shape[0]} entries, /keys {n}")
            maps_offset = _contiguous(self.path, f, "maps", (n, *self.attrs["grid"]), np.float16)
            status_offset = _contiguous(self.path, f, "status", (n,), np.uint8)
            self.keys = f["keys"].asstr()[:].tolist()
            self.errors = f["errors"].asstr()[:].tolist()
        self.maps = np.memmap(self.path, np.float16, "r", maps_offset, (n, *self.attrs["grid"]))
        self.status = np.memmap(self.path, np.uint8, "r", status_offset, (n,))

    def counts(self) -> dict:
        return status_counts(self.status)

    def identity(self) -> dict:
        """What the maps are, independent of where the file lies: method, backbone, weights, method
        options, image size, grid and the keys' fingerprint. Two stores with one identity hold the same maps."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in self.attrs.items() if name in _MERGE_ATTRS}

    def __len__(self) -> int:
        return len(self.keys)


def open_maps(path) -> MapStore:
    """Open a store read-only; see MapStore."""
    return MapStore(path)


class StoreWriter:
    """Appends maps to a store in index order; made by `create`."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = _open_h5(path, "r+")
        except NotWritableError:
            # A complete store needs no writing: on a read-only file system it is still reported complete.
            self._file = _open_h5(path)
            if (self._file["status"][:] == STATUS_PENDING).any():
                self._file.close()
                raise
        self._fd = self._file.id.get_vfd_handle()
        self.status = self._file["status"][:]
        self._next = self.first_pending()

    def first_pending(self) -> int:
        """First local index whose status is pending, len(store) if none."""
        pending = np.flatnonzero(self.status == STATUS_PENDING)
        return int(pending[0]) if pending.size else len(self.status)

    def write(self, start: int, maps, status, errors: Sequence[str] | None = None) -> None:
        """Store one batch at local indices `start ...`. `maps: [b, h, w]` in [0, 1] (clipped,
        quantised to float16), `status: [b]` DONE or FAILED, `errors: [b]` reasons for FAILED.
        A DONE map that is not finite is stored as FAILED, with its error if given, else "non-finite map"."""
        maps = np.asarray(maps, dtype=np.float32)
        status = np.asarray(status, dtype=np.uint8).copy()
        errors = list(errors) if errors is not None else [""] * len(status)
        grid = self._file["maps"].shape[1:]
        if maps.shape != (len(status), *grid) or len(errors) != len(status):
            raise ValueError(f"{self.path}: write got maps {list(maps.shape)}, {len(status)} status, "
                             f"{len(errors)} errors; expected [b, {grid[0]}, {grid[1]}] and b of each")
        if start != self._next:
            raise ValueError(f"{self.path}: writes go in index order; got start={start}, "
                             f"the next index to write is {self._next}")
        if start + len(status) > len(self.status):
            raise ValueError(f"{self.path}: batch [{start}, {start + len(status)}) runs past the "
                             f"store's {len(self.status)} entries")
        if not np.isin(status, (STATUS_DONE, STATUS_FAILED)).all():
            raise ValueError(f"{self.path}: status must be STATUS_DONE or STATUS_FAILED")
        broken = (status == STATUS_DONE) & ~np.isfinite(maps).all(axis=(1, 2))
        status[broken] = STATUS_FAILED
        errors = ["non-finite map" if bad and not err else err for bad, err in zip(broken, errors)]
        failed = status == STATUS_FAILED
        maps[failed] = 0.0
        stop = start + len(status)
        self._file["maps"][start:stop] = np.clip(maps, 0.0, 1.0).astype(np.float16)
        self._sync()  # the maps are on disk before any status says they are done
        for i in np.flatnonzero(failed):  # errors default to "", so only failures are written
            self._file["errors"][start + i] = errors[i]
        self._file["status"][start:stop] = status
        self._sync()
        self.status[start:stop] = status
        self._next = stop

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._fd)

    def counts(self) -> dict:
        """{"done": ..., "failed": ..., "pending": ...} over this store's entries."""
        return status_counts(self.status)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_parent(path: Path) -> None:
    """Create the folder `path` goes in; refuse in one line a path under a regular file."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{path}: its parent {parent} is a file, not a directory; write to a path under a "
                             f"directory (--out)")
    path.parent.mkdir(parents=True, exist_ok=True)


def create(path, keys: Sequence[str], grid, *, method: str, backbone: str | None,
           weights_sha256: str | None, image_size: int, method_options: dict | None,
           keys_sha256: str | None = None, shard=None, index_range=None,
           overwrite: bool = False, image_root=None) -> StoreWriter:
    """Create a store for `keys` with maps `[len(keys), *grid]`, or reopen a compatible one to
    resume. A shard k of n holds the keys of `index_range` (lo, hi) of the full dataset and
    `keys_sha256` is the FULL dataset's fingerprint. An existing store that differs in any
    identity attr or key raises ValueError unless `overwrite`. image_root: where the images lie, recorded
    (not part of the identity: the images may move) so that `inspect` can find them."""
    path = Path(path)
    keys = list(keys)
    if not keys:
        raise UserError(f"{path}: no keys given; a store needs at least one image")
    identity = _identity(keys, grid, method, backbone, weights_sha256, image_size, method_options,
                         keys_sha256, shard, index_range)
    if path.exists() and not overwrite:
        _check_resumable(path, identity, keys)
        return StoreWriter(path)
    make_parent(path)
    temp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        with h5py.File(temp, "w") as f:
            for name, dtype, shape in (("maps", np.float16, (len(keys), *identity["grid"])),
                                       ("status", np.uint8, (len(keys),)),
                                       ("errors", _STRINGS, (len(keys),))):
                # Early allocation fixes each array's place in the file before any write, which
                # is what lets readers memmap /maps and /status by offset.
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                fill = {} if dtype is _STRINGS else {"fillvalue": 0}
                f.create_dataset(name, shape, dtype, dcpl=dcpl, **fill)
            f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=_STRINGS)
            for name, value in identity.items():
                if value is not None:
                    f.attrs[name] = value
            f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            if image_root is not None:
                f.attrs["image_root"] = str(Path(image_root).resolve())
            f.attrs["agmae_version"] = agmae.__version__
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return StoreWriter(path)


def key_changes(old: Sequence[str], new: Sequence[str], show: int = 3) -> str:
    """What changed between two key lists, for a message: the keys added and removed (the first `show` of each),
    or, when both hold the same keys, that their order differs."""
    old_set, new_set = set(old), set(new)
    added, removed = sorted(new_set - old_set), sorted(old_set - new_set)
    parts = [f"{len(keys)} image{'s' if len(keys) > 1 else ''} {what} ({', '.join(keys[:show])}"
             f"{', ...' if len(keys) > show else ''})" for keys, what in ((added, "added"), (removed, "removed")) if keys]
    if parts:
        return " and ".join(parts)
    if len(old) != len(new):
        return f"{abs(len(old) - len(new))} duplicate keys"
    return "the same images in another order"


def _check_resumable(path: Path, identity: dict, keys: list) -> None:
    with _open_h5(path) as f:
        stored = _read_attrs(f)
        _require_store(path, stored)
        stored_keys = f["keys"].asstr()[:].tolist() if "keys" in f else []
    for name, value in identity.items():
        if stored[name] != value:
            change = f" ({key_changes(stored_keys, keys)} since)" if name == "keys_sha256" else ""
            raise UserError(f"{path}: existing store has {name}={stored[name]!r}, this run has "
                             f"{name}={value!r}{change}; pass overwrite=True (--overwrite) or another output")
    if stored_keys != keys:
        raise UserError(f"{path}: existing store holds other keys than this run ({key_changes(stored_keys, keys)}); "
                         f"pass overwrite=True (--overwrite) or another output")


def merge(shard_paths: Sequence, out_path) -> Path:
    """Join shard stores into one store at `out_path`, written atomically. The shards must agree
    on what they computed, be finished, and cover the dataset's indices exactly once."""
    out_path = Path(out_path)
    if not shard_paths:
        raise UserError(f"{out_path}: no shards given to merge")
    shards = sorted((open_maps(p) for p in shard_paths), key=lambda s: (s.attrs["index_range"] or (0,)))
    first = shards[0]
    end = 0
    for shard in shards:
        if shard.attrs["shard"] is None:
            raise UserError(f"{shard.path}: not a shard (no shard attribute); merge takes shard stores")
        for name in _MERGE_ATTRS:
            if shard.attrs[name] != first.attrs[name]:
                raise UserError(f"{shard.path}: {name}={shard.attrs[name]!r} disagrees with "
                                 f"{first.path}: {name}={first.attrs[name]!r}; shards must come from one run")
        lo, hi = shard.attrs["index_range"]
        if lo > end:
            raise UserError(f"{shard.path}: gap, indices [{end}, {lo}) are in no shard; "
                             f"add the missing shard")
        if lo < end:
            raise UserError(f"{shard.path}: overlap, indices [{lo}, {end}) are in two shards; "
                             f"merge each shard once")
        pending = int((shard.status == STATUS_PENDING).sum())
        if pending:
            raise UserError(f"{shard.path}: {pending} maps still pending; finish the shard "
                             f"(rerun its job, it resumes) before merging")
        end = hi
    keys = [key for shard in shards for key in shard.keys]
    if keys_fingerprint(keys) != first.attrs["keys_sha256"]:
        raise UserError(f"{out_path}: the shards' keys hash to {keys_fingerprint(keys)}, not the "
                         f"dataset fingerprint {first.attrs['keys_sha256']}; a shard is missing at the end "
                         f"or the shards come from another dataset")
    temp = out_path.with_name(f".{out_path.name}.merging-{os.getpid()}")
    try:
        identity = {name: first.attrs[name] for name in _MERGE_ATTRS}
        with create(temp, keys, overwrite=True, image_root=first.attrs.get("image_root"), **identity) as writer:
            for shard in shards:
                offset = shard.attrs["index_range"][0]
                for lo in range(0, len(shard), _ROWS_PER_STEP):
                    hi = min(lo + _ROWS_PER_STEP, len(shard))
                    writer.write(offset + lo, shard.maps[lo:hi], shard.status[lo:hi], shard.errors[lo:hi])
        os.replace(temp, out_path)
    finally:
        temp.unlink(missing_ok=True)
    return out_path


def validate(path, dataset_keys: Sequence[str] | None = None) -> MapStore:
    """Check a store end to end and return it opened; raise ValueError naming the file and the
    problem: format version, layout, truncation, key fingerprints, status codes, map values."""
    store = open_maps(path)
    attrs, path = store.attrs, store.path
    if attrs["shard"] is None and keys_fingerprint(store.keys) != attrs["keys_sha256"]:
        raise UserError(f"{path}: its keys hash to {keys_fingerprint(store.keys)} but keys_sha256 "
                         f"says {attrs['keys_sha256']}; the file was altered, recompute it")
    if dataset_keys is not None:
        dataset_keys = list(dataset_keys)
        expected = keys_fingerprint(dataset_keys)
        lo, hi = attrs["index_range"] or (0, len(dataset_keys))
        if attrs["keys_sha256"] != expected:
            changes = key_changes(store.keys, dataset_keys if attrs["shard"] is None else dataset_keys[lo:hi])
            raise UserError(f"{path}: keys fingerprint {attrs['keys_sha256']} differs from the dataset's {expected}: "
                             f"{changes} since the maps were computed; recompute them (agmae-discover --overwrite)")
        if store.keys != dataset_keys[lo:hi]:
            raise UserError(f"{path}: its keys differ from the dataset's indices [{lo}, {hi}) "
                             f"({key_changes(store.keys, dataset_keys[lo:hi])}); recompute them")
    if not np.isin(store.status, (STATUS_PENDING, STATUS_DONE, STATUS_FAILED)).all():
        raise UserError(f"{path}: /status holds codes other than 0, 1, 2")
    for lo in range(0, len(store), _ROWS_PER_STEP):
        done = store.status[lo:lo + _ROWS_PER_STEP] == STATUS_DONE
        maps = np.asarray(store.maps[lo:lo + _ROWS_PER_STEP][done])
        if not np.isfinite(maps).all():
            raise UserError(f"{path}: done maps contain NaN or inf (first near index {lo}); recompute them")
        if maps.size and (maps.min() < 0 or maps.max() > 1):
            raise UserError(f"{path}: done maps have values outside [0, 1] "
                             f"({maps.min()} .. {maps.max()}, near index {lo}); recompute them")
    return store
