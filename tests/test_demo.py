import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from agmae.data import demo
from agmae.data.demo import BANK_A, BANK_B, CLASS_NAMES, ensure_demo, load_manifest, load_mask, load_photograph
from agmae.data.folder import scan
from agmae.data.idx import read_idx

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
BACKGROUND_SPLITS = ("train", "original", "mixed-rand")
BLACK_SPLITS = ("train-fg", "only-fg")
ALL_SPLITS = BACKGROUND_SPLITS + BLACK_SPLITS


def digests(root):
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def pixels(root, split, key):
    return np.asarray(Image.open(root / split / key))


def split_arrays(root, split):
    """images [N, 64, 64, 3] uint8, masks [N, 64, 64] bool, manifest."""
    manifest = load_manifest(root, split)
    images = np.stack([pixels(root, split, k) for k in manifest["keys"]])
    masks = np.stack([load_mask(root, split, k) for k in manifest["keys"]]) > 0.5
    return images, masks, manifest


def backgrounds(manifest):
    crops = []
    for photo, (y, x) in zip(manifest["photos"], manifest["crops"]):
        crops.append(load_photograph(photo)[y : y + 64, x : x + 64])
    return np.stack(crops)


def test_layout_and_image_folder_view(demo_root):
    info = json.loads((demo_root / "demo.json").read_text())
    assert info["params"] == {"correlation": 0.0, "seed": 0, "n_train": 240, "n_test": 60,
                              "garment_sizes": list(demo.GARMENT_SIZES)}
    assert sorted(info["splits"]) == sorted(ALL_SPLITS) and not (demo_root / "mixed-same").exists()
    for split in ALL_SPLITS:
        index = scan(demo_root / split)
        manifest = load_manifest(demo_root, split)
        n = 240 if split.startswith("train") else 60
        assert len(index) == n and index.classes == list(CLASS_NAMES)
        assert np.bincount(index.labels).tolist() == [n // 10] * 10
        assert index.keys == manifest["keys"] and index.labels.tolist() == manifest["labels"]
        for i in range(0, n, n // 10):
            key = index.keys[i]
            img = Image.open(index.path(i))
            mask_file = Image.open(demo_root / "masks" / split / key)
            assert img.mode == "RGB" and img.size == (64, 64) and mask_file.mode == "L" and mask_file.size == (64, 64)
            assert set(np.unique(np.asarray(mask_file))) <= {0, 255}
            mask = load_mask(demo_root, split, key)
            assert mask.dtype == np.float32 and mask.shape == (64, 64)
            np.testing.assert_array_equal(mask, np.asarray(mask_file) / 255.0)
    # The test splits show the same objects, only the backgrounds differ.
    original = load_manifest(demo_root, "original")
    for split in ("mixed-rand", "only-fg"):
        other = load_manifest(demo_root, split)
        for field in ("keys", "garments", "sizes", "places", "tints"):
            assert other[field] == original[field]


@pytest.mark.parametrize("split", BACKGROUND_SPLITS)
def test_mask_and_image_align_with_the_recorded_background(demo_root, split):
    images, masks, manifest = split_arrays(demo_root, split)
    background = backgrounds(manifest)
    outside = ~masks[..., None].repeat(3, axis=3)
    # Outside the mask every pixel is the recorded photograph crop, bit for bit.
    np.testing.assert_array_equal(images[outside], background[outside])
    # Inside the mask the garment changes the pixel.
    changed = (images != background).any(axis=3)
    assert changed[masks].mean() > 0.95
    assert all(changed[i][masks[i]].mean() > 0.7 for i in range(len(images)))
    assert 0.15 < masks.mean() < 0.6  # garments of 36-60 px on 64 px images


@pytest.mark.parametrize("split", BLACK_SPLITS)
def test_fg_splits_are_black_outside_the_mask_and_visible_inside(demo_root, split):
    images, masks, _ = split_arrays(demo_root, split)
    assert images[~masks].max() == 0
    assert images[masks].max(axis=1).min() > 0


def test_train_fg_is_the_training_objects_on_black(demo_root):
    train, train_masks, train_manifest = split_arrays(demo_root, "train")
    fg, fg_masks, fg_manifest = split_arrays(demo_root, "train-fg")
    np.testing.assert_array_equal(fg_masks, train_masks)
    for field in ("keys", "garments", "sizes", "places", "tints"):
        assert fg_manifest[field] == train_manifest[field]
    # Same garment and tint blended over a background instead of black: fg <= train <= fg + background.
    background = backgrounds(train_manifest).astype(np.int32)
    inside = train_masks[..., None].repeat(3, axis=3)
    train, fg = train.astype(np.int32), fg.astype(np.int32)
    assert (train[inside] >= fg[inside]).all() and (train[inside] <= fg[inside] + background[inside]).all()


def test_bank_b_photographs_only_in_mixed_rand(demo_root):
    assert not set(BANK_A) & set(BANK_B)
    used = {split: set(load_manifest(demo_root, split)["photos"]) for split in ALL_SPLITS}
    assert used["mixed-rand"] <= set(BANK_B) and len(used["mixed-rand"]) == len(BANK_B)
    assert used["train"] <= set(BANK_A) and len(used["train"]) == len(BANK_A)
    assert used["original"] <= set(BANK_A)
    assert used["train-fg"] == used["only-fg"] == {"black"}


def garment_iou(mask, place, size, garment):
    """IoU between an image's mask, cut back to the garment box and shrunk to 28 px, and a Fashion-MNIST garment."""
    y, x = place
    box = Image.fromarray(mask[y : y + size, x : x + size].astype(np.uint8) * 255)
    small = np.asarray(box.resize((28, 28), Image.BILINEAR)) > 127
    reference = garment > demo.MASK_THRESHOLD
    return (small & reference).sum() / (small | reference).sum()


@pytest.mark.parametrize("split, part", [("train", "train"), ("original", "t10k")])
def test_garments_come_from_the_right_fashion_mnist_part(demo_root, split, part):
    images = read_idx(f"{FASHION_MNIST}/{part}-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST}/{part}-labels-idx1-ubyte.gz")
    other = read_idx(f"{FASHION_MNIST}/{'t10k' if part == 'train' else 'train'}-images-idx3-ubyte.gz")
    _, masks, manifest = split_arrays(demo_root, split)
    garments = np.array(manifest["garments"])
    np.testing.assert_array_equal(labels[garments], manifest["labels"])
    right, wrong = [], []
    for mask, place, size, g in zip(masks, manifest["places"], manifest["sizes"], garments):
        right.append(garment_iou(mask, place, size, images[g]))
        wrong.append(garment_iou(mask, place, size, other[g % len(other)]))
    assert min(right) > 0.75 and np.mean(wrong) < np.mean(right) - 0.3


def test_build_is_deterministic_and_seeded(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home-b"))
    again = ensure_demo(n_train=240, n_test=60)
    assert again != demo_root and again.name == demo_root.name
    assert digests(again) == digests(demo_root)
    other_seed = ensure_demo(seed=1, n_train=20, n_test=10)
    assert load_manifest(other_seed, "train")["garments"] != load_manifest(demo_root, "train")["garments"][:20]


def test_parallel_build_writes_the_files_of_the_serial_build(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path))
    monkeypatch.setattr(demo, "CHUNK", 7)  # several chunks per split, so the two workers share every split
    serial = ensure_demo(n_train=40, n_test=20, workers=1)
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "parallel"))
    parallel = ensure_demo(n_train=40, n_test=20, workers=2)
    assert parallel != serial and len(digests(serial)) == 2 * (2 * 40 + 3 * 20) + 5 + 1 and digests(parallel) == digests(serial)


def test_garment_sizes_are_a_recipe_parameter_with_a_cache_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path))
    small = ensure_demo(n_train=40, n_test=20, garment_sizes=(20, 24))
    assert small.name.endswith("-garment20-24") and small != ensure_demo(n_train=40, n_test=20)
    sizes = load_manifest(small, "train")["sizes"]
    assert min(sizes) >= 20 and max(sizes) <= 24 and len(set(sizes)) > 1
    masks = np.stack([load_mask(small, "train", key) for key in load_manifest(small, "train")["keys"]])
    assert masks.mean() < 0.15  # 20-24 px garments cover a small part of a 64 px image


def test_correlation_ties_backgrounds_to_classes_and_adds_mixed_same(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path))
    root = ensure_demo(correlation=1.0, n_train=40, n_test=20)
    own = {label: BANK_A[label % len(BANK_A)] for label in range(10)}
    for split in ("train", "original", "mixed-same"):
        manifest = load_manifest(root, split)
        assert manifest["photos"] == [own[label] for label in manifest["labels"]]
    assert set(load_manifest(root, "mixed-rand")["photos"]) <= set(BANK_B)
    assert len(scan(root / "mixed-same")) == 20 and (root / "masks" / "mixed-same").is_dir()
    # Without correlation a train image gets its class's photograph only by chance (1 in 10).
    uncorrelated = load_manifest(demo_root, "train")
    hits = np.mean([photo == own[label] for photo, label in zip(uncorrelated["photos"], uncorrelated["labels"])])
    assert hits < 0.25


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path))
    real_build = demo._build

    def killed(root, params, workers):
        (root / "train").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo(n_train=10, n_test=10)
    assert [p.name for p in (tmp_path / "demo").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(demo, "_build", real_build)
    root = ensure_demo(n_train=10, n_test=10)
    assert (root / "demo.json").is_file() and len(scan(root / "train")) == 10

    def must_not_build(root, params, workers):
        raise AssertionError("a complete demo dataset was built again")

    monkeypatch.setattr(demo, "_build", must_not_build)
    assert ensure_demo(n_train=10, n_test=10) == root


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"correlation": 1.5}, "correlation 1.5 is outside"),
        ({"seed": -1}, "seed -1 is negative"),
        ({"n_train": 5}, "at least 10"),
        ({"n_test": 20000}, "t10k holds 10000"),
        ({"garment_sizes": (40, 30)}, "garment sizes 40-30"),
        ({"garment_sizes": (20, 70)}, "hi <= 64"),
        ({"workers": 0}, "workers=0: use at least 1"),
    ],
)
def test_bad_parameters_are_rejected(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        ensure_demo(**kwargs)
    assert not list(tmp_path.glob("demo/fmnist*")) and not list(tmp_path.glob("demo/.tmp-*"))


def test_missing_mask_is_a_clear_error(demo_root):
    with pytest.raises(FileNotFoundError, match="no ground-truth mask"):
        load_mask(demo_root, "train", "0-tshirt/999999.png")
