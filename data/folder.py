"""Image folders (`ROOT/<class>/<image>`, ImageNet style) with a stable, cached index.

The index (sorted keys, labels, class names) fixes the dataset order that every stage
shares: the attention store is written in this order and training checks its
`keys_sha256` against it. Scanning 1.28 M files takes minutes on network storage, so
the index is cached and re-used while no directory of the tree has changed.
"""
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image, ImageOps
from tqdm import tqdm

from agmae.paths import agmae_home
from agmae.store import keys_fingerprint
from agmae.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
EXPECTED_LAYOUT = "ROOT/<class>/<image>.jpg"
CACHE_VERSION = 1
# A directory modified this recently may still change within the same timestamp tick
# (coarse mtimes on ext4/NFS/FAT), so an index that includes it is not cached yet.
RACY_MTIME_NS = 2_000_000_000
# Images per decode task: enough that handing a task to a worker costs little beside it.
DECODE_CHUNK = 256


class UnreadableImageError(OSError, ValueError):
    """An image file that PIL cannot decode (missing, empty, truncated or not an image)."""


@dataclass(frozen=True)
class ImageFolderIndex:
    """`keys[i]` is image i's path relative to `root` (POSIX, `class/.../img.ext`), `labels[i]` its class index."""

    root: Path
    keys: list
    labels: np.ndarray
    classes: list
    keys_sha256: str

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, i: int) -> Path:
        return self.root / self.keys[i]

    def spread(self, n: int) -> list:
        """`n` keys at an even stride from the first, so that a subset of this class-sorted index keeps every class
        (its first `n` would be one class's); all keys when n is 0 or not below the index's size."""
        if n <= 0 or n >= len(self):
            return list(self.keys)
        return self.keys[::len(self) // n][:n]

    def without(self, rows) -> "ImageFolderIndex":
        """This index less the images at `rows` (e.g. the unreadable ones), in the same order."""
        drop = set(int(i) for i in rows)
        kept = [i for i in range(len(self)) if i not in drop]
        keys = [self.keys[i] for i in kept]
        return ImageFolderIndex(self.root, keys, self.labels[kept], self.classes, keys_fingerprint(keys))


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Transparent pixels are composited on white, as image viewers and browsers show them.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
EXIF_ORIENTATION = 0x0112


def as_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image, as it is meant to be seen: the EXIF orientation applied, 16-bit
    values scaled to 8 bits (not clipped), transparency composited on TRANSPARENCY_BACKGROUND, palette,
    grey, CMYK converted."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:  # I: 16-bit PNG/TIFF/PGM pixels held as 32-bit ints
        pixels = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.rint(pixels.clip(0, 65535) / 257).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENCY_BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path) -> Image.Image:
    """Decode an image fully (so truncation is caught here, not later) and return it as 8-bit RGB (as_rgb)."""
    try:
        with Image.open(path) as img:
            img.load()
            return as_rgb(img)
    except DECODE_ERRORS as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}") from err


def _decode_check(paths: list) -> list:
    """(size, mtime_ns, reason) per file; reason "" when it decodes. JPEGs are decoded at 1/8 scale, which
    still reads every byte of the stream (so truncation is caught) at a fraction of the cost."""
    checked = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as err:
            checked.append((-1, -1, _reason(err)))
            continue
        try:
            with Image.open(path) as img:
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
            reason = ""
        except DECODE_ERRORS as err:
            reason = _reason(err)
        checked.append((stat.st_size, stat.st_mtime_ns, reason))
    return checked


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".replace("\n", " ")


def _decode_cache_path(index) -> Path:
    root_hash = hashlib.sha256(str(index.root).encode("utf-8")).hexdigest()[:24]
    return agmae_home() / "index" / f"{root_hash}-{index.keys_sha256[:16]}.decodes.npz"


def unreadable_images(index, workers: int | None = None, progress: bool = True) -> dict:
    """{dataset index: reason} of the images of `index` that do not decode.

    Checked in parallel on joblib threads (`workers` of them, default: every CPU this process may use; 1 checks
    serially). PIL decodes without holding the GIL, and threads start at no cost where worker processes take
    longer to start than a small split takes to check (benchmarks/joblib_bench.py times both). Cached per file
    by (size, mtime) under AGMAE_HOME/index/, so a second call decodes only the files that changed. The result
    does not depend on `workers`."""
    cache = _decode_cache_path(index)
    sizes = np.full(len(index), -2, np.int64)
    mtimes = np.zeros(len(index), np.int64)
    reasons = [""] * len(index)
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                sizes, mtimes, reasons = npz["sizes"].copy(), npz["mtimes"].copy(), _decode_lines(npz["reasons"])
        except (OSError, KeyError, ValueError):
            pass
    stale = []
    for i in range(len(index)):
        try:
            stat = os.stat(index.path(i))
            current = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            current = (-1, -1)
        if (sizes[i], mtimes[i]) != current or current == (-1, -1):
            stale.append(i)
    if stale:
        parts = [stale[lo:lo + DECODE_CHUNK] for lo in range(0, len(stale), DECODE_CHUNK)]
        workers = workers or len(os.sched_getaffinity(0))
        checks = Parallel(n_jobs=max(1, min(workers, len(parts))), prefer="threads", return_as="generator")(
            delayed(_decode_check)([str(index.path(i)) for i in part]) for part in parts)
        with tqdm(total=len(stale), desc=f"checking images decode ({index.root.name})", unit="img",
                  disable=not progress) as bar:
            for part, results in zip(parts, checks):
                for i, (size, mtime, reason) in zip(part, results):
                    sizes[i], mtimes[i], reasons[i] = size, mtime, reason
                bar.update(len(part))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, sizes=sizes, mtimes=mtimes, reasons=_encode_lines(reasons))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only AGMAE_HOME: checked again next time
    return {i: reason for i, reason in enumerate(reasons) if reason}


def split_folder(root, split: str, option: str = "--train-split") -> Path:
    """ROOT/<split>: one split's image folder in a dataset laid out ROOT/<split>/<class>/<image>, the
    layout every command's `--data` takes. A one-line error names the splits ROOT has (and `option`, the
    flag that picks another), or says that ROOT looks like a split's own folder."""
    root = Path(root)
    folder = root / split
    if folder.is_dir():
        return folder
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; pass --data ROOT with ROOT/<split>/<class>/<image>")
    children = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    if any(_is_image(f.name) for child in children for f in os.scandir(child.path) if f.is_file()):
        raise UserError(f"{root} holds class folders of images, so it is one split's folder; --data takes the "
                         f"dataset root: pass --data {root.parent} --train-split {root.name}")
    found = ", ".join(sorted(e.name for e in children)) or "no folders"
    raise UserError(f"{root} has no split folder {split!r} (it has: {found}); pass {option} NAME, or lay "
                     f"the dataset out as ROOT/<split>/<class>/<image>")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path):
    """Scan the tree. Returns (keys, classes, dir_stamps) with dir_stamps {relative dir: mtime_ns}.

    Each directory's mtime is taken before it is listed, so a file added during the scan
    leaves a newer mtime than the recorded one and invalidates the cache.
    """
    stamps = {".": root.stat().st_mtime_ns}
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    keys = []
    for cls in classes:
        count = 0
        pending = [cls]
        while pending:
            rel = pending.pop()
            directory = root / rel
            stamps[rel] = directory.stat().st_mtime_ns
            for entry in os.scandir(directory):
                if entry.is_dir():
                    if not entry.name.startswith("."):
                        pending.append(f"{rel}/{entry.name}")
                elif _is_image(entry.name):
                    if "\n" in entry.name:
                        raise UserError(f"image file name contains a newline: {directory / entry.name!r}; rename it")
                    keys.append(f"{rel}/{entry.name}")
                    count += 1
        if count == 0:
            raise UserError(
                f"class folder {root / cls} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "remove it or add images"
            )
    keys.sort()
    return keys, classes, stamps


def _labels(keys, classes) -> np.ndarray:
    class_index = {c: i for i, c in enumerate(classes)}
    return np.fromiter((class_index[k.split("/", 1)[0]] for k in keys), dtype=np.int64, count=len(keys))


def _cache_candidates(root: Path, cache_dir) -> list:
    """Where the index may be cached, in order of preference."""
    root_hash = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:24]
    if cache_dir is not None:
        return [Path(cache_dir) / f"{root_hash}.npz"]
    # Beside the root rather than inside it: a file inside would change the root's mtime
    # and invalidate the cache it was written to.
    return [root.parent / f".{root.name}.agmae-index.npz", agmae_home() / "index" / f"{root_hash}.npz"]


def _encode_lines(lines) -> np.ndarray:
    return np.frombuffer("\n".join(lines).encode("utf-8"), dtype=np.uint8)


def _decode_lines(array: np.ndarray) -> list:
    text = array.tobytes().decode("utf-8")
    return text.split("\n") if text else []


def _load_cache(path: Path, root: Path):
    """The cached index if it exists and every recorded directory still has its mtime, else None."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["version"]) != CACHE_VERSION or _decode_lines(npz["root"]) != [str(root)]:
                return None
            dirs = _decode_lines(npz["dirs"])
            mtimes = npz["mtimes"]
            for rel, mtime in zip(dirs, mtimes):
                if (root / rel).stat().st_mtime_ns != int(mtime):
                    return None
            keys = _decode_lines(npz["keys"])
            classes = _decode_lines(npz["classes"])
            labels = npz["labels"].astype(np.int64)
    except (OSError, KeyError, ValueError):
        return None
    return ImageFolderIndex(root, keys, labels, classes, keys_fingerprint(keys))


def _save_cache(path: Path, root: Path, index: ImageFolderIndex, stamps: dict) -> bool:
    """Write the cache atomically; False if the location is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f,
                version=np.int64(CACHE_VERSION),
                root=_encode_lines([str(root)]),
                keys=_encode_lines(index.keys),
                classes=_encode_lines(index.classes),
                labels=index.labels,
                dirs=_encode_lines(list(stamps)),
                mtimes=np.array(list(stamps.values()), dtype=np.int64),
            )
        os.replace(tmp, path)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


def scan(root, cache_dir=None) -> ImageFolderIndex:
    """Index an image folder `ROOT/<class>/<image>`; re-uses a cached index while the tree is unchanged.

    Keys are sorted relative POSIX paths, labels the position of the class (the first path
    component) in the sorted class names. The cache lives in `cache_dir` if given, else
    beside the root (`.<root name>.agmae-index.npz`) when writable, else under
    AGMAE_HOME/index/.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"dataset root {root} does not exist; expected an image folder {EXPECTED_LAYOUT}")
    if not root.is_dir():
        raise UserError(f"dataset root {root} is not a directory; expected an image folder {EXPECTED_LAYOUT}")
    candidates = _cache_candidates(root, cache_dir)
    for path in candidates:
        cached = _load_cache(path, root)
        if cached is not None:
            return cached

    scan_started_ns = time.time_ns()
    keys, classes, stamps = _walk(root)
    if not keys:
        raise UserError(f"dataset root {root} holds no class folders with images; expected {EXPECTED_LAYOUT}")
    index = ImageFolderIndex(root, keys, _labels(keys, classes), classes, keys_fingerprint(keys))
    if max(stamps.values()) < scan_started_ns - RACY_MTIME_NS:
        for path in candidates:
            if _save_cache(path, root, index, stamps):
                break
    return index
