"""Datasets on which an evaluation's number would mean nothing are refused in one line that names the folder and the
fix: a bank or probe set of one class (every query right by construction: it printed 100.00 with exit 0), a class
whose every image is unreadable, a test split with classes the bank lacks, a map store with no finished map."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from agmae import store
from agmae.cli.eval import main
from agmae.errors import UserError
from agmae.eval.knn import knn_evaluate
from agmae.eval.linear import train_probe_cached
from agmae.eval.retrieval import retrieval_metrics

from helpers import TINY_VIT, add_unreadable_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "run" / "checkpoint-last.pth"
    path.parent.mkdir()
    torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(), "config": {"encoder": TINY_VIT},
                "epoch": 1}, path)
    return path


def image_folders(root, splits: dict, per_class: int = 3):
    """ROOT/<split>/<class>/<i>.png, random 40x48 images; splits: {split: [class, ...]}."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def refused(args, checkpoint, data):
    result = CliRunner().invoke(main, [*args, "--checkpoint", str(checkpoint), "--data", str(data), "--workers", "0",
                                       "--test-split", "val"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not (checkpoint.parent / "results.json").exists()
    return errors[0]


@pytest.mark.parametrize("protocol, args", [
    ("k-NN", ["knn"]),
    ("the linear probe", ["linear", "--mode", "cached", "--epochs", "1"]),
    ("the linear probe", ["linear", "--epochs", "1"]),
    ("retrieval", ["retrieval"]),
])
def test_a_one_class_dataset_is_refused(protocol, args, checkpoint, tmp_path):
    data = image_folders(tmp_path / "data", {"train": ["cat"], "val": ["cat"]})
    error = refused(args, checkpoint, data)
    assert error == (f"Error: {data / 'train'} has 1 class folder (cat); {protocol} needs at least two, since with "
                     "one every query is right by construction: add the other classes' folders "
                     "(ROOT/<split>/<class>/<image>)")


def test_a_one_class_dataset_is_refused_by_robustness(checkpoint, tmp_path):
    data = image_folders(tmp_path / "data", {"train": ["cat"], "only-fg": ["cat"]})
    result = CliRunner().invoke(main, ["robustness", "--checkpoint", str(checkpoint), "--data", str(data),
                                       "--workers", "0", "--epochs", "1"])
    assert result.exit_code == 1 and f"{data / 'train'} has 1 class folder (cat); robustness needs" in result.output


def test_a_class_with_no_readable_image_is_named(checkpoint, tmp_path):
    data = image_folders(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    add_unreadable_images(data / "train", like=data / "train" / "cat" / "0.png")
    error = refused(["knn", "--max-failures", "1"], checkpoint, data)
    assert error.startswith(f"Error: {data / 'train' / 'bad'}: class bad has no readable image (all 4 cannot be "
                            "read, e.g. bad/")
    assert error.endswith("fix them, or move the class folder out of every split")


def test_a_test_split_with_classes_the_bank_lacks_is_refused(checkpoint, tmp_path):
    data = image_folders(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "fox"]})
    error = refused(["knn"], checkpoint, data)
    assert f"split val ({data / 'val'}) lacks the classes ['dog'] and has ['fox']" in error and "k-NN needs" in error


def test_a_store_with_no_finished_map_is_refused(tmp_path, demo_root):
    keys = [str(p.relative_to(demo_root / "train")) for p in sorted((demo_root / "train").glob("*/*.png"))]
    path = tmp_path / "maps-oracle.h5"
    store.create(path, keys, (4, 4), method="oracle", backbone=None, weights_sha256=None, image_size=32,
                 method_options={}).close()
    result = CliRunner().invoke(main, ["attention", "--run-dir", str(tmp_path), "--data", str(demo_root),
                                       "--maps", str(path)])
    assert result.exit_code == 1 and result.output.splitlines()[-1] == (
        f"Error: {path}: no finished map to score (0 failed, {len(keys)} pending); finish it (re-run its "
        "agmae-discover, which resumes) or pass another --maps"), result.output


def test_python_callers_are_refused_a_one_class_bank_too():
    feats, labels = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    for call in (lambda: knn_evaluate(feats, labels, feats, labels, 1, ks=(2,)),
                 lambda: retrieval_metrics(feats, labels, feats, labels),
                 lambda: train_probe_cached(feats, labels, 1, epochs=1, progress=False)):
        with pytest.raises(UserError, match="needs a bank of at least two classes, got 1"):
            call()
