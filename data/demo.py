"""The built-in demo dataset: Fashion-MNIST garments pasted on crops of real photographs.

Each image is a 64x64 random crop of one of the photographs bundled with scikit-image,
with one Fashion-MNIST garment (scaled to GARMENT_SIZES px by default, tinted with a random colour, alpha =
the garment's intensity) pasted at a random place. Label = garment class; the ground-truth
mask is where alpha is above MASK_THRESHOLD (alpha is zero elsewhere, so outside the mask
every pixel is exactly the background photograph).

Splits (ImageNet-9 style; every test split shows the same test objects, only the
background changes):
- `train`: training garments on bank-A photographs.
- `train-fg`: the same training objects (garment, size, place, colour) on black.
- `original`: test garments on bank-A photographs, backgrounds drawn like `train`.
- `mixed-rand`: the test objects on bank-B photographs, never seen in training.
- `only-fg`: the test objects on black.
- `mixed-same` (only when correlation > 0): the test objects on the photograph of their class.
With correlation p, an image of class c gets bank-A photograph `BANK_A[c % len(BANK_A)]`
with probability p, otherwise a uniformly drawn bank-A photograph.

Layout: ROOT/<split>/<class>/<index>.png, masks at ROOT/masks/<split>/<class>/<index>.png
(uint8 0/255), ROOT/manifest-<split>.json (per image: garment, photograph, crop, ...),
ROOT/demo.json (parameters; written last, marks the build complete).
"""
import fcntl
import functools
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import skimage.data
from joblib import Parallel, delayed
from PIL import Image
from skimage.color import hsv2rgb
from tqdm import tqdm

from agmae.data.idx import read_idx
from agmae.paths import agmae_home
from agmae.errors import UserError

# Bump when the generator changes, so that cached builds of older versions are not reused.
GENERATOR_VERSION = 1
# The build's parameters, written last: its presence marks a complete demo dataset.
BUILD_MARKER = "demo.json"
FASHION_MNIST_DIR = Path(os.environ.get("AGMAE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = (
    "0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat",
    "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-boot",
)  # fmt: skip
IMAGE_SIZE = 64
# Garment side in pixels, drawn uniformly in [lo, hi] per image (the default recipe's range).
GARMENT_SIZES = (36, 60)
# alpha (0-255) at or below this is made fully transparent, so mask = (alpha > 0) exactly.
MASK_THRESHOLD = 25
# Tints are bright and saturated enough to stay visible on black (`only-fg`).
TINT_SATURATION = (0.5, 1.0)
TINT_VALUE = (0.6, 1.0)

# Photographs bundled in the scikit-image wheel (no download). Left out: drawings and
# synthetic images (logo, colorwheel, checkerboard, horse, phantom, blobs), the nearly
# uniform ones (clock, cell, moon: most 64-px crops have a standard deviation < 5 grey
# levels), the mostly black hubble_deep_field (71 % of crops) and the 102-px
# microaneurysms. Grey photographs are used as RGB. Bank A has ten photographs so that
# with correlation every class has one of its own; bank B mixes colour and grey like A.
BANK_A = (
    "astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
    "camera", "brick", "grass", "coins", "text",
)  # fmt: skip
BANK_B = ("motorcycle", "retina", "gravel", "page")
BLACK = "black"

CHUNK = 250


def _sample_stream(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, so one split's draws never shift another's."""
    return np.random.default_rng([seed, *stream.encode("utf-8")])


@functools.lru_cache(maxsize=None)
def load_photograph(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 `[H, W, 3]`."""
    if name == "motorcycle":
        pixels = skimage.data.stereo_motorcycle()[0]
    else:
        pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels[:, :, :3])
    pixels.flags.writeable = False
    return pixels


def _fashion_mnist(part: str):
    """(images [N, 28, 28] uint8, labels [N] int64) of the `train` or `t10k` part."""
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [FASHION_MNIST_DIR / f"{part}-{kind}{ext}" for ext in ("", ".gz")]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {candidates[1]} not found; install it with "
                "`apt-get install dataset-fashion-mnist` (or `make install`), or set AGMAE_FASHION_MNIST to its folder"
            )
        arrays.append(read_idx(found))
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"{FASHION_MNIST_DIR}: {part} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def _sample_objects(labels_pool: np.ndarray, n: int, garment_sizes, rng: np.random.Generator) -> dict:
    """Class-balanced garments (n // 10 per class, the remainder to the first classes) with size, place and tint."""
    per_class = [n // len(CLASS_NAMES) + (c < n % len(CLASS_NAMES)) for c in range(len(CLASS_NAMES))]
    garments = np.concatenate(
        [rng.choice(np.flatnonzero(labels_pool == c), size=k, replace=False) for c, k in enumerate(per_class)]
    )
    sizes = rng.integers(garment_sizes[0], garment_sizes[1] + 1, size=n)
    places = (rng.random((n, 2)) * (IMAGE_SIZE - sizes + 1)[:, None]).astype(np.int64)
    hsv = np.stack(
        [rng.random(n), rng.uniform(*TINT_SATURATION, size=n), rng.uniform(*TINT_VALUE, size=n)], axis=1
    )
    tints = np.rint(hsv2rgb(hsv[:, None, :])[:, 0] * 255).astype(np.uint8)
    return {"garments": garments, "labels": labels_pool[garments], "sizes": sizes, "places": places, "tints": tints}


def _alpha_canvases(images: np.ndarray, objects: dict) -> np.ndarray:
    """Alpha of each garment at its size and place: uint8 [N, 64, 64], 0 outside the object."""
    n = len(objects["garments"])
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, (g, s, (y, x)) in enumerate(zip(objects["garments"], objects["sizes"], objects["places"])):
        scaled = np.asarray(Image.fromarray(images[g]).resize((int(s), int(s)), Image.BICUBIC))
        alpha[i, y : y + s, x : x + s] = np.where(scaled > MASK_THRESHOLD, scaled, 0)
    return alpha


def _sample_backgrounds(labels: np.ndarray, bank, class_probability: float, rng: np.random.Generator) -> dict:
    """Photograph and 64x64 crop corner per image; with probability class_probability the class's own photograph."""
    n = len(labels)
    own = labels % len(bank)
    uniform = rng.integers(len(bank), size=n)
    photo_index = np.where(rng.random(n) < class_probability, own, uniform)
    photos = [bank[i] for i in photo_index]
    room = np.array([load_photograph(p).shape[:2] for p in photos]).reshape(n, 2) - IMAGE_SIZE + 1
    corners = (rng.random((n, 2)) * room).astype(np.int64)
    return {"photos": photos, "crops": corners}


def _background_pixels(n: int, backgrounds) -> np.ndarray:
    """uint8 [n, 64, 64, 3]: the photograph crops of n images, backgrounds = (photos, crops) of each; black when
    backgrounds is None."""
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    if backgrounds is not None:
        for i, (photo, (y, x)) in enumerate(zip(*backgrounds)):
            pixels[i] = load_photograph(photo)[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE]
    return pixels


def composite(alpha: np.ndarray, tints: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Alpha-blend tinted garments over backgrounds in exact integer arithmetic.

    alpha: [N, 64, 64] uint8, tints: [N, 3] uint8, background: [N, 64, 64, 3] uint8 -> uint8 [N, 64, 64, 3].
    Where alpha is 0 the result is the background, bit for bit.
    """
    a = alpha[..., None].astype(np.uint16)
    # a*tint + (255-a)*bg <= 255*255, so uint16 holds the sum and the rounding offset.
    blended = a * tints[:, None, None, :].astype(np.uint16) + (255 - a) * background.astype(np.uint16) + 127
    return (blended // 255).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: a faster build than the default level 6, for slightly larger files.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _keys(labels: np.ndarray) -> list:
    return [f"{CLASS_NAMES[label]}/{i:06d}.png" for i, label in enumerate(labels)]


def _write_chunk(root: Path, split: str, keys: list, alpha: np.ndarray, tints: np.ndarray, backgrounds) -> int:
    """Composite and write the images and masks of `keys` (one chunk of a split); returns how many. Takes only its
    chunk's data, so that a worker process receives no more than it writes."""
    images = composite(alpha, tints, _background_pixels(len(keys), backgrounds))
    masks = np.where(alpha > 0, 255, 0).astype(np.uint8)
    for key, pixels, mask in zip(keys, images, masks):
        (root / split / key).write_bytes(_png_bytes(pixels))
        (root / "masks" / split / key).write_bytes(_png_bytes(mask))
    return len(keys)


def _write_split(root: Path, split: str, objects: dict, alpha: np.ndarray, backgrounds, parallel, progress) -> None:
    keys = _keys(objects["labels"])
    for name in CLASS_NAMES:
        (root / split / name).mkdir(parents=True)
        (root / "masks" / split / name).mkdir(parents=True)

    def task(ids):
        chunk_backgrounds = ([backgrounds["photos"][i] for i in ids], backgrounds["crops"][ids]) if backgrounds else None
        return delayed(_write_chunk)(root, split, [keys[i] for i in ids], alpha[ids], objects["tints"][ids],
                                     chunk_backgrounds)

    # A chunk holds images of one class, and consecutive chunks are of different classes: the workers then create
    # their files in different folders, as creating files in one folder serialises on its lock.
    per_class = [np.flatnonzero(objects["labels"] == label) for label in range(len(CLASS_NAMES))]
    chunks = [ids[lo : lo + CHUNK] for lo in range(0, max(map(len, per_class)), CHUNK) for ids in per_class
              if lo < len(ids)]
    for done in parallel(task(ids) for ids in chunks):
        progress.update(done)

    manifest = {
        "split": split,
        "keys": keys,
        "labels": objects["labels"].tolist(),
        "garments": objects["garments"].tolist(),
        "sizes": objects["sizes"].tolist(),
        "places": objects["places"].tolist(),
        "tints": objects["tints"].tolist(),
        "photos": backgrounds["photos"] if backgrounds else [BLACK] * len(keys),
        "crops": backgrounds["crops"].tolist() if backgrounds else [[0, 0]] * len(keys),
    }
    (root / f"manifest-{split}.json").write_text(json.dumps(manifest))


def _build(root: Path, params: dict, workers: int) -> None:
    seed, correlation = params["seed"], params["correlation"]
    train_images, train_labels = _fashion_mnist("train")
    test_images, test_labels = _fashion_mnist("t10k")
    for part, pool_labels, n in (("train", train_labels, params["n_train"]), ("t10k", test_labels, params["n_test"])):
        available = int(np.bincount(pool_labels, minlength=len(CLASS_NAMES)).min()) * len(CLASS_NAMES)
        if n > available:
            raise UserError(f"Fashion-MNIST {part} holds {available} class-balanced garments; asked for {n}")

    sizes = params["garment_sizes"]
    train_objects = _sample_objects(train_labels, params["n_train"], sizes, _sample_stream(seed, "objects-train"))
    test_objects = _sample_objects(test_labels, params["n_test"], sizes, _sample_stream(seed, "objects-test"))
    train_alpha = _alpha_canvases(train_images, train_objects)
    test_alpha = _alpha_canvases(test_images, test_objects)

    def backgrounds(split, labels, bank, class_probability):
        return _sample_backgrounds(labels, bank, class_probability, _sample_stream(seed, f"backgrounds-{split}"))

    splits = [
        ("train", train_objects, train_alpha, backgrounds("train", train_objects["labels"], BANK_A, correlation)),
        ("train-fg", train_objects, train_alpha, None),
        ("original", test_objects, test_alpha, backgrounds("original", test_objects["labels"], BANK_A, correlation)),
        ("mixed-rand", test_objects, test_alpha, backgrounds("mixed-rand", test_objects["labels"], BANK_B, 0.0)),
        ("only-fg", test_objects, test_alpha, None),
    ]
    if correlation > 0:
        splits.append(
            ("mixed-same", test_objects, test_alpha, backgrounds("mixed-same", test_objects["labels"], BANK_A, 1.0))
        )
    total = sum(len(objects["garments"]) for _, objects, _, _ in splits)
    # Processes (joblib's default): most of a 64-px PNG's encoding is Python-side work that holds the GIL, so threads
    # ran slower than one (docs/PERFORMANCE.md#cpu-parallelism-joblib); a chunk's canvases are its only payload.
    with Parallel(n_jobs=workers, return_as="generator") as parallel, tqdm(
        total=total, desc="building demo dataset", unit="img", disable=None
    ) as progress:
        for split, objects, alpha, bgs in splits:
            _write_split(root, split, objects, alpha, bgs, parallel, progress)

    info = {
        "params": params,
        "generator_version": GENERATOR_VERSION,
        "splits": [split for split, *_ in splits],
        "classes": list(CLASS_NAMES),
        "image_size": IMAGE_SIZE,
        "mask_threshold": MASK_THRESHOLD,
        "bank_a": list(BANK_A),
        "bank_b": list(BANK_B),
    }
    (root / BUILD_MARKER).write_text(json.dumps(info, indent=1))


def is_demo_root(root) -> bool:
    """Whether `root` is a completely built demo dataset."""
    return (Path(root) / BUILD_MARKER).is_file()


def demo_name(correlation: float, seed: int, n_train: int, n_test: int, garment_sizes=GARMENT_SIZES) -> str:
    """The cache folder's name: every parameter of the build, so another recipe never reuses this one's images."""
    lo, hi = garment_sizes
    return f"fmnist-v{GENERATOR_VERSION}-p{correlation:g}-seed{seed}-train{n_train}-test{n_test}-garment{lo}-{hi}"


def ensure_demo(correlation=0.0, seed=0, n_train=10000, n_test=10000, garment_sizes=GARMENT_SIZES,
                workers: int | None = None) -> Path:
    """Root of the demo dataset with these parameters, building it (once) into AGMAE_HOME/demo/ if needed.

    correlation: probability that an image's background is its class's own photograph
    (0 = backgrounds carry no label information). n_train / n_test: images in `train` and in
    each test split. garment_sizes: (lo, hi), the garment's side in pixels, uniform in [lo, hi].
    workers: processes writing the images (default: every CPU this process may use); the files do not depend on it.
    The build is deterministic in the parameters and atomic (temp dir, then rename; `demo.json`
    marks completion); concurrent callers wait for one build.
    """
    correlation, seed, n_train, n_test = float(correlation), int(seed), int(n_train), int(n_test)
    if not 0.0 <= correlation <= 1.0:
        raise UserError(f"demo correlation {correlation} is outside [0, 1]")
    if seed < 0:
        raise UserError(f"demo seed {seed} is negative; use a seed >= 0")
    if min(n_train, n_test) < len(CLASS_NAMES):
        raise UserError(f"demo n_train={n_train}, n_test={n_test}: need at least {len(CLASS_NAMES)} (one per class)")
    lo, hi = (int(size) for size in garment_sizes)
    if not 1 <= lo <= hi <= IMAGE_SIZE:
        raise UserError(f"demo garment sizes {lo}-{hi}: need 1 <= lo <= hi <= {IMAGE_SIZE} (the image side)")
    if workers is not None and workers < 1:
        raise UserError(f"demo build workers={workers}: use at least 1 (or None for every CPU)")
    params = {"correlation": correlation, "seed": seed, "n_train": n_train, "n_test": n_test,
              "garment_sizes": [lo, hi]}
    name = demo_name(correlation, seed, n_train, n_test, (lo, hi))
    demo_dir = agmae_home() / "demo"
    root = demo_dir / name
    if is_demo_root(root):
        return root
    demo_dir.mkdir(parents=True, exist_ok=True)
    with open(demo_dir / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_demo_root(root):
            return root
        # Holding the lock, anything named like our temp dir or an unmarked root is a killed build.
        for stale in [*demo_dir.glob(f".tmp-{name}-*"), root]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = demo_dir / f".tmp-{name}-{os.getpid()}"
        try:
            _build(tmp, params, workers or len(os.sched_getaffinity(0)))
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def load_manifest(root, split: str) -> dict:
    """Per-image record of a split (lists): keys, labels, garments (Fashion-MNIST indices), sizes, places (y, x),
    tints (RGB), photos (bank photograph or "black"), crops (y, x corner in the photograph)."""
    path = Path(root) / f"manifest-{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"no demo manifest {path}; is {root} a demo dataset root with split {split!r}?")
    return json.loads(path.read_text())


def load_mask(root, split: str, key: str) -> np.ndarray:
    """Ground-truth object mask of image `key` in `split`: float32 [h, w] in [0, 1]."""
    path = Path(root) / "masks" / split / key
    if not path.exists():
        raise FileNotFoundError(f"no ground-truth mask {path}; masks exist for the demo dataset's splits only")
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
