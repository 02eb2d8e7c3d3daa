import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from joblib import parallel_config
from PIL import Image

from agmae.data import folder
from agmae.data.folder import UnreadableImageError, load_rgb, scan
from agmae.store import keys_fingerprint

from helpers import add_unreadable_images

AN_HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def png_bytes(size=(6, 4), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root, files):
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes())
    return root


def age(root):
    """Set every directory's mtime an hour back, so the index counts as settled and gets cached."""
    for directory, _, _ in os.walk(root):
        os.utime(directory, ns=(AN_HOUR_AGO_NS, AN_HOUR_AGO_NS))


def forbid_walk(monkeypatch):
    def walk(root):
        raise AssertionError(f"{root} was scanned again instead of read from the cache")

    monkeypatch.setattr(folder, "_walk", walk)


TREE = ["dog/b.PNG", "dog/a.jpg", "cat/z.jpeg", "cat/sub/y.JPG", "ant/1.webp", "ant/.hidden.png", "ant/notes.txt",
        "README.md", ".git/x.png"]  # fmt: skip


def test_sorted_keys_labels_classes_and_fingerprint(tmp_path):
    index = scan(make_tree(tmp_path / "data", TREE))
    assert index.keys == ["ant/1.webp", "cat/sub/y.JPG", "cat/z.jpeg", "dog/a.jpg", "dog/b.PNG"]
    assert index.classes == ["ant", "cat", "dog"]
    assert index.labels.dtype == np.int64 and index.labels.tolist() == [0, 1, 1, 2, 2]
    assert len(index) == 5 and index.path(3) == tmp_path / "data" / "dog" / "a.jpg"
    expected = hashlib.sha256("ant/1.webp\ncat/sub/y.JPG\ncat/z.jpeg\ndog/a.jpg\ndog/b.PNG".encode()).hexdigest()
    assert index.keys_sha256 == keys_fingerprint(index.keys) == expected


def test_spread_keeps_every_class_of_the_sorted_index(tmp_path):
    index = scan(make_tree(tmp_path / "data", [f"{name}/{i}.png" for name in ("ant", "cat", "dog") for i in range(4)]))
    assert index.spread(3) == ["ant/0.png", "cat/0.png", "dog/0.png"]
    assert index.spread(6) == ["ant/0.png", "ant/2.png", "cat/0.png", "cat/2.png", "dog/0.png", "dog/2.png"]
    assert index.spread(0) == index.spread(12) == index.spread(50) == index.keys


def test_cached_index_is_reused_while_the_tree_is_unchanged(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data", TREE)
    age(root)
    first = scan(root)
    assert (tmp_path / ".data.agmae-index.npz").is_file()  # beside the root, not inside it
    forbid_walk(monkeypatch)
    again = scan(root)
    assert again.keys == first.keys and again.classes == first.classes and again.keys_sha256 == first.keys_sha256
    np.testing.assert_array_equal(again.labels, first.labels)


@pytest.mark.parametrize(
    "change, keys",
    [
        ("add file", ["ant/1.webp", "ant/2.png", "cat/sub/y.JPG", "cat/z.jpeg", "dog/a.jpg", "dog/b.PNG"]),
        ("remove file", ["ant/1.webp", "cat/sub/y.JPG", "cat/z.jpeg", "dog/b.PNG"]),
        ("add nested file", ["ant/1.webp", "cat/sub/x.png", "cat/sub/y.JPG", "cat/z.jpeg", "dog/a.jpg", "dog/b.PNG"]),
        ("add class", ["ant/1.webp", "bee/q.png", "cat/sub/y.JPG", "cat/z.jpeg", "dog/a.jpg", "dog/b.PNG"]),
    ],
)
def test_cache_invalidated_when_the_tree_changes(tmp_path, change, keys):
    root = make_tree(tmp_path / "data", TREE)
    age(root)
    scan(root)
    if change == "remove file":
        (root / "dog/a.jpg").unlink()
    else:
        added = {"add file": "ant/2.png", "add nested file": "cat/sub/x.png", "add class": "bee/q.png"}[change]
        make_tree(root, [added])
    index = scan(root)
    assert index.keys == keys
    assert index.keys_sha256 == keys_fingerprint(keys)
    if change == "add class":
        assert index.classes == ["ant", "bee", "cat", "dog"] and index.labels.tolist() == [0, 1, 2, 2, 3, 3]


def test_recently_modified_tree_is_not_cached(tmp_path):
    """A directory changed within the timestamp resolution could change again unseen: rescan until it settles."""
    root = make_tree(tmp_path / "data", TREE)
    scan(root)
    assert not (tmp_path / ".data.agmae-index.npz").exists()


def test_cache_falls_back_to_agmae_home_then_explicit_dir(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data", TREE)
    age(root)
    (tmp_path / ".data.agmae-index.npz").mkdir()  # the beside-the-root location cannot take a file
    home = tmp_path / "home"
    monkeypatch.setenv("AGMAE_HOME", str(home))
    scan(root)
    assert len(list((home / "index").glob("*.npz"))) == 1
    explicit = tmp_path / "explicit"
    scan(root, cache_dir=explicit)
    assert len(list(explicit.glob("*.npz"))) == 1
    forbid_walk(monkeypatch)
    assert len(scan(root)) == 5 and len(scan(root, cache_dir=explicit)) == 5


def test_corrupt_or_foreign_cache_is_ignored(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "data", TREE)
    age(root)
    cache = tmp_path / ".data.agmae-index.npz"
    cache.write_bytes(b"not an npz")
    assert len(scan(root)) == 5
    other = make_tree(tmp_path / "other" / "data", ["x/1.png"])
    age(other)
    os.replace(cache, tmp_path / "other" / ".data.agmae-index.npz")  # an index of a different root
    assert scan(other).keys == ["x/1.png"]


def test_missing_empty_and_classless_roots_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        scan(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} holds no class folders"):
        scan(tmp_path / "empty")
    flat = make_tree(tmp_path / "flat", ["a.png", "b.png"])
    with pytest.raises(ValueError, match="holds no class folders"):
        scan(flat)
    make_tree(tmp_path / "hollow", ["cat/a.png", "dog/readme.txt"])
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'hollow' / 'dog'} holds no images") as err:
        scan(tmp_path / "hollow")
    assert "\n" not in str(err.value)


def test_load_rgb_converts_to_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    grey.write_bytes(png_bytes(size=(5, 3), mode="L"))
    img = load_rgb(grey)
    assert img.mode == "RGB" and img.size == (5, 3) and img.getpixel((0, 0)) == (128, 128, 128)


def jpeg_bytes():
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jpg", b""),
        ("text.jpg", b"this is not an image\n"),
        ("truncated.jpg", jpeg_bytes()[:400]),
        ("truncated.png", png_bytes(size=(64, 64))[:60]),
    ],
)
def test_load_rgb_names_the_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=str(path)) as err:
        load_rgb(path)
    assert isinstance(err.value, ValueError) and isinstance(err.value, OSError)


def test_load_rgb_missing_file(tmp_path):
    with pytest.raises(OSError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def _saved(tmp_path, name, img, **save):
    path = tmp_path / name
    img.save(path, **save)
    return path


def test_images_load_as_they_are_meant_to_be_seen(tmp_path):
    """Every mode to 8-bit RGB, each checked against a mean worked out by hand."""
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 16-bit 0..65535 in 257 steps
    grey16 = _saved(tmp_path, "grey16.png", Image.fromarray(ramp))
    assert Image.open(grey16).mode == "I;16"
    assert np.asarray(load_rgb(grey16)).mean() == pytest.approx(127.5)  # scaled, not clipped to 255
    palette = Image.new("P", (4, 4))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 4, 2))  # the top half palette entry 1
    assert np.asarray(load_rgb(_saved(tmp_path, "p.png", palette))).reshape(-1, 3).mean(0).tolist() == \
        [100.0, 50.0, 25.0]
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent: the white background shows
    la.paste((100, 255), (0, 0, 4, 1))  # one opaque row of grey 100
    assert np.asarray(load_rgb(_saved(tmp_path, "la.png", la))).mean() == pytest.approx((100 + 3 * 255) / 4)
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 200, 51))  # 20 % blue over white: 255 - 0.2 * 255, 255 - 0.2 * 255, 255 - 0.2 * 55
    pixels = np.asarray(load_rgb(_saved(tmp_path, "rgba.png", rgba))).astype(int)
    assert pixels[0, 0].tolist() == [200, 0, 0] and np.abs(pixels[0, 1] - [204, 204, 244]).max() <= 1
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    red = np.asarray(load_rgb(_saved(tmp_path, "cmyk.jpg", cmyk, quality=100))).reshape(-1, 3).mean(0)
    assert np.abs(red - [255, 0, 0]).max() < 3
    grey = Image.fromarray(np.full((3, 5), 90, np.uint8))
    assert np.asarray(load_rgb(_saved(tmp_path, "grey.png", grey))).tolist() == [[[90] * 3] * 5] * 3
    # EXIF orientation 6 (rotate 90° clockwise to view): a 5-wide, 3-tall image is seen 3 wide, 5 tall,
    # its left column becoming the top row
    wide = np.zeros((3, 5, 3), np.uint8)
    wide[:, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_rgb(_saved(tmp_path, "exif.jpg", Image.fromarray(wide), exif=exif, quality=100))
    assert rotated.size == (3, 5) and np.asarray(rotated)[0].mean() > 200 and np.asarray(rotated)[-1].mean() < 50


def test_unreadable_images_are_found_in_parallel_and_rechecked_only_when_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(folder, "DECODE_CHUNK", 2)  # 6 tasks for the 2 workers
    root = tmp_path / "data"
    (root / "ok").mkdir(parents=True)
    for i in range(6):
        Image.effect_noise((40, 40), 40).convert("RGB").save(root / "ok" / f"{i}.png")
    bad_keys = add_unreadable_images(root, root / "ok" / "0.png")
    index = scan(root)
    found = folder.unreadable_images(index, workers=2, progress=False)
    assert sorted(index.keys[i] for i in found) == bad_keys and all(found.values())
    assert index.without(found).keys == [f"ok/{i}.png" for i in range(6)]
    checked = []
    real_check = folder._decode_check
    monkeypatch.setattr(folder, "_decode_check", lambda paths: checked.extend(paths) or real_check(paths))
    assert folder.unreadable_images(index, workers=1, progress=False) == found and checked == []  # cached
    Image.effect_noise((40, 40), 40).convert("RGB").save(root / "bad" / "text.png")  # mended in place
    again = folder.unreadable_images(index, workers=1, progress=False)
    assert [Path(p).name for p in checked] == ["text.png"] and len(again) == len(found) - 1


def test_parallel_image_check_finds_what_the_serial_one_finds(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "DECODE_CHUNK", 3)
    root = tmp_path / "data"
    (root / "ok").mkdir(parents=True)
    for i in range(7):
        Image.effect_noise((30, 20), 40).convert("RGB").save(root / "ok" / f"{i}.png")
    add_unreadable_images(root, root / "ok" / "0.png")
    index = scan(root)
    results = []
    for workers, backend in ((1, "threading"), (2, "threading"), (2, "loky")):  # serial, threads, processes
        monkeypatch.setenv("AGMAE_HOME", str(tmp_path / f"home-{workers}-{backend}"))  # a fresh decode cache each
        with parallel_config(backend=backend):
            results.append(folder.unreadable_images(index, workers=workers, progress=False))
    assert results[0] == results[1] == results[2] and len(results[0]) == 4 and all(results[0].values())
