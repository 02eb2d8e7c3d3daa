"""The paired difference of two runs' k-NN hits and its standard error (agmae.eval.knn, benchmarks/paired_noise.py)."""
import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_evaluate, paired_difference

from helpers import TINY_VIT, load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def noise():
    return load_benchmark("paired_noise")


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


def test_the_difference_is_that_of_agmae_eval_knn(noise, demo_root, tmp_path):
    top1 = {}
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        torch.manual_seed(seed)
        torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(),
                    "config": {"encoder": TINY_VIT}, "epoch": 1}, run / "checkpoint-last.pth")
        source = FeatureSource(run / "checkpoint-last.pth", pool="mean", workers=0, use_cache=False, progress=False)
        bank, queries = source.features(demo_root / "train"), source.features(demo_root / "original")
        top1[seed] = knn_evaluate(bank.feats, bank.index.labels, queries.feats, queries.index.labels, 10,
                                  ks=(20,))["k=20"]["top1"]
    result = CliRunner().invoke(noise.main, [str(tmp_path / "run0"), str(tmp_path / "run1"), "--data", str(demo_root),
                                             "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert f"{top1[0] - top1[1]:+.2f} points" in result.output
    assert top1[0] != top1[1]
