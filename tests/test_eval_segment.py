"""The dense linear probe (agmae-eval segment) against cases whose answer is known by construction."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae.cli.eval import main
from agmae.eval import segment
from agmae.eval.segment import SegmentOptions

from helpers import TINY_VIT

GRID = (4, 4)
PATCH = 4  # masks of 16 x 16 pixels, patch-aligned


def blocky_masks(count: int, seed: int) -> np.ndarray:
    """Random patch-aligned masks [count, 16, 16] in {0, 1}: each cell object with probability 0.3."""
    cells = np.random.default_rng(seed).random((count, *GRID)) < 0.3
    return np.kron(cells, np.ones((PATCH, PATCH))).astype(np.float32)


def separable_tokens(masks: np.ndarray, classes: np.ndarray, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Tokens [N, 16, dim] that say by construction what their cell holds: channel 0 is 1 on the object, channel
    1 + c is 1 on an object of class c, plus small noise."""
    fg = segment.mask_labels(masks, GRID).astype(np.float32)
    tokens = np.random.default_rng(seed).normal(0, 0.05, (len(masks), fg.shape[1], dim)).astype(np.float32)
    tokens[..., 0] += fg
    for i, c in enumerate(classes):
        tokens[i, :, 1 + c] += fg[i]
    return tokens.astype(np.float16)


OPTS = SegmentOptions(epochs=30, lr=0.05, segment_batch_size=8, seed=0)


def test_patch_labels_are_the_majority_cover_of_each_cell():
    mask = np.zeros((8, 8), np.float32)
    mask[:4, :4] = 1  # cell (0, 0) fully covered
    mask[4:, 4:6] = 1  # cell (1, 1) half covered: not more than half
    mask[:4, 4:7] = 1  # cell (0, 1) three quarters covered
    assert segment.patch_labels(mask, (2, 2)).tolist() == [[True, True], [False, False]]
    assert segment.task_labels(np.array([[True, False]]), [3], "classes").tolist() == [[4, 0]]


def test_linearly_separable_tokens_give_miou_100():
    train_masks, test_masks = blocky_masks(40, 1), blocky_masks(12, 2)
    train_classes, test_classes = np.arange(40) % 3, np.arange(12) % 3
    results = segment.dense_probe(separable_tokens(train_masks, train_classes), train_masks, train_classes,
                                  {"test": (separable_tokens(test_masks, test_classes, seed=1), test_masks,
                                            test_classes)}, GRID, 3, OPTS)
    assert results["fg"]["splits"]["test"]["miou"] == 100.0
    assert results["classes"]["splits"]["test"]["miou"] == 100.0
    assert results["classes"]["splits"]["test"]["iou"] == [100.0] * 4


def test_constant_tokens_predict_the_majority_class_everywhere():
    train_masks, test_masks = blocky_masks(30, 3), blocky_masks(10, 4)
    tokens = np.ones((30, 16, 8), np.float16)
    results = segment.dense_probe(tokens, train_masks, np.zeros(30, int),
                                  {"test": (np.ones((10, 16, 8), np.float16), test_masks, np.zeros(10, int))},
                                  GRID, 1, OPTS)
    # background is the majority of the training patches, so every test pixel is called background:
    # IoU(background) = background pixels / all pixels, IoU(object) = 0
    assert segment.mask_labels(train_masks, GRID).mean() < 0.5
    background_share = 1 - test_masks.mean()
    assert results["fg"]["splits"]["test"]["iou"] == pytest.approx([100 * background_share, 0.0])
    assert results["fg"]["splits"]["test"]["miou"] == pytest.approx(100 * background_share / 2)


def test_miou_of_a_hand_computed_confusion_matrix():
    matrix = np.array([[6, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2 neither true nor predicted: left out
    ious = segment.iou_per_class(matrix)
    assert ious[:2] == pytest.approx([6 / 9, 3 / 6]) and np.isnan(ious[2])
    assert segment.mean_iou(matrix) == pytest.approx(100 * (6 / 9 + 3 / 6) / 2)


def test_probe_is_a_function_of_the_seed():
    masks, classes = blocky_masks(20, 5), np.arange(20) % 2
    tokens = separable_tokens(masks, classes) + np.random.default_rng(9).normal(0, 1, (20, 16, 8)).astype(np.float16)
    labels = segment.task_labels(segment.mask_labels(masks, GRID), classes, "classes")
    opts = SegmentOptions(epochs=2, lr=0.01, segment_batch_size=3, seed=4)
    first, again = (segment.fit_probe(tokens, labels, 3, opts)[0] for _ in range(2))
    other = segment.fit_probe(tokens, labels, 3, SegmentOptions(epochs=2, lr=0.01, segment_batch_size=3, seed=5))[0]
    assert np.array_equal(first.linear.weight.detach(), again.linear.weight.detach())
    assert not np.array_equal(first.linear.weight.detach(), other.linear.weight.detach())


@pytest.mark.parametrize("kwargs, message", [({"epochs": 0}, "--epochs 0"), ({"lr": -1.0}, "--lr -1.0"),
                                             ({"segment_batch_size": 0}, "--segment-batch-size 0")])
def test_bad_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as caught:
        SegmentOptions(**kwargs)
    assert "\n" not in str(caught.value)


def test_segment_command_records_miou_per_test_split(tmp_path, demo_root, one_thread):
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint-last.pth"
    torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(), "config": {"encoder": TINY_VIT}},
               checkpoint)
    args = ["segment", "--checkpoint", str(checkpoint), "--data", str(demo_root), "--workers", "0", "--epochs", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    entry = json.loads((tmp_path / "results.json").read_text())["segment"]
    assert entry["options"]["splits"] == ["original", "mixed-rand", "only-fg"] and entry["options"]["grid"] == [4, 4]
    for task, classes in (("fg", 2), ("classes", 11)):
        for split, scores in entry["results"][task]["splits"].items():
            present = [v for v in scores["iou"] if v is not None]
            assert len(scores["iou"]) == classes and 0 <= scores["miou"] <= 100
            assert scores["miou"] == pytest.approx(sum(present) / len(present))
    again = CliRunner().invoke(main, args + ["--run-dir", str(tmp_path / "again")])
    assert json.loads((tmp_path / "again" / "results.json").read_text())["segment"]["results"] == entry["results"]


@pytest.mark.parametrize("split, message", [("nowhere", "has no split folder 'nowhere'"),
                                            ("unmasked", "no ground-truth masks at")])
def test_segment_command_refuses_a_split_without_masks_in_one_line(tmp_path, demo_root, split, message):
    root = tmp_path / "data"
    (root / "masks").mkdir(parents=True)
    (root / "train").symlink_to(demo_root / "train")
    (root / "masks" / "train").symlink_to(demo_root / "masks" / "train")
    (root / "unmasked").symlink_to(demo_root / "original")
    checkpoint = tmp_path / "checkpoint-last.pth"
    torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(), "config": {"encoder": TINY_VIT}},
               checkpoint)
    result = CliRunner().invoke(main, ["segment", "--checkpoint", str(checkpoint), "--data", str(root),
                                       "--splits", split])
    assert result.exit_code != 0 and message in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "results.json").exists()
