"""What several test modules share: the tiny ViT they evaluate, a small training split, and loading a
benchmark script as a module."""
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package; its scripts import their siblings,
    as they do when run as `python benchmarks/<name>.py`)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"agmae_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def add_unreadable_images(root, like) -> list:
    """Put a class folder `bad/` of unreadable files (empty, not an image, truncated PNG and JPEG) under
    root, the truncated PNG cut from the readable image `like`; returns their keys."""
    from PIL import Image

    bad = Path(root) / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    (bad / "truncated.png").write_bytes(Path(like).read_bytes()[:200])
    Image.open(like).convert("RGB").save(bad / "whole.jpg", quality=95)
    (bad / "truncated.jpg").write_bytes((bad / "whole.jpg").read_bytes()[:400])
    (bad / "whole.jpg").unlink()
    return sorted(f"bad/{p.name}" for p in bad.iterdir())


def random_training_split(root, count: int):
    """ROOT/train/{cat,dog}/NN.png: `count` random 48x40 images in two classes, seed 0; returns the split's
    folder (its parent is the --data root)."""
    import numpy as np
    from PIL import Image

    split = Path(root) / "train"
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = split / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return split
