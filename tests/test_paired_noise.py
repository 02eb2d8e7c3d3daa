"""The paired difference of two runs' k-NN hits and its standard error (agmae.eval.knn, experiments/paired_noise.py)."""
import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_evaluate, paired_difference

from experiments import paired_noise as noise

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_standard_error_is_that_of_the_mean_per_image_difference():
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.rand(997, generator=generator) < share for share in (0.3, 0.25))
    result = paired_difference(first, second)
    per_image = first.double() - second.double()
    assert result["difference"] == pytest.approx(100 * per_image.mean().item())
    assert result["standard_error"] == pytest.approx(100 * per_image.std(unbiased=False).item() / 997 ** 0.5)
    assert result["disagreement"] == pytest.approx(100 * (first ^ second).double().mean().item())
    small = paired_difference(torch.tensor([1, 1, 0, 0, 1]).bool(), torch.tensor([1, 0, 1, 0, 0]).bool())
    assert small == pytest.approx({"difference": 20.0, "disagreement": 60.0, "standard_error": 100 * 0.112 ** 0.5})


def test_each_guided_run_and_split_gets_the_difference_of_agmae_eval_knn(demo_root, tmp_path):
    splits = ("original", "mixed-rand")
    top1 = {}
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        torch.manual_seed(seed)
        torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(),
                    "config": {"encoder": TINY_VIT}, "epoch": 1}, run / "checkpoint-last.pth")
        source = FeatureSource(run / "checkpoint-last.pth", pool="mean", workers=0, use_cache=False, progress=False)
        bank = source.features(demo_root / "train")
        for split in splits:
            queries = source.features(demo_root / split)
            top1[seed, split] = knn_evaluate(bank.feats, bank.index.labels, queries.feats, queries.index.labels, 10,
                                             ks=(20,))["k=20"]["top1"]
    runs = [str(tmp_path / "run0"), str(tmp_path / "run1"), str(tmp_path / "run1")]
    result = CliRunner().invoke(noise.main, [*runs, "--data", str(demo_root), "--workers", "0",
                                             *(arg for split in splits for arg in ("--test-split", split))])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4
    for line, split in zip(lines, splits):
        assert line.startswith(f"run0 - run1 on {split} ")
        assert f"{top1[0, split] - top1[1, split]:+.2f} points" in line
        assert top1[0, split] != top1[1, split]
    for line, split in zip(lines[2:], splits):
        assert line.startswith(f"run1 - run1 on {split} ") and "+0.00 points" in line and "disagree on 0.0 %" in line


def test_a_split_the_dataset_lacks_is_refused_before_any_extraction(demo_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = CliRunner().invoke(noise.main, [str(run), str(run), "--data", str(demo_root),
                                             "--test-split", "mixed-same"])
    assert result.exit_code == 2
    assert "mixed-same" in result.output and "original" in result.output
