"""experiments/learning_curve.py: k-NN of every kept checkpoint, equal to agmae-eval's k-NN of that checkpoint."""
import json

import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae.eval.features import FeatureSource
from agmae.eval.knn import knn_evaluate

from experiments import learning_curve as curve

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_kept_epoch_is_scored_like_agmae_eval_knn(demo_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (2, 4, 5):
        torch.manual_seed(epoch)
        encoder = VisionTransformer(**TINY_VIT, num_classes=0)
        torch.save({"model": encoder.state_dict(), "config": {"encoder": TINY_VIT}, "epoch": epoch},
                   run / f"checkpoint-{epoch}.pth")
    (run / "checkpoint-last.pth").write_bytes((run / "checkpoint-5.pth").read_bytes())
    out = tmp_path / "curve.json"
    result = CliRunner().invoke(curve.main, [str(run), "--data", str(demo_root), "--every", "2", "--workers", "0",
                                             "--precision", "fp32", "--test-split", "original",
                                             "--test-split", "mixed-rand", "--json", str(out)])
    assert result.exit_code == 0, result.output
    top1 = json.loads(out.read_text())["top1"]
    assert set(top1) == {"original", "mixed-rand"}
    assert set(top1["original"]["run"]) == {"2", "4"}  # 5 is not a multiple of --every, checkpoint-last no epoch
    source = FeatureSource(run / "checkpoint-4.pth", pool="mean", workers=0, use_cache=False, progress=False)
    bank = source.features(demo_root / "train")
    for split in ("original", "mixed-rand"):
        queries = source.features(demo_root / split)
        expected = knn_evaluate(bank.feats, bank.index.labels, queries.feats, queries.index.labels, 10, ks=(20,))
        assert top1[split]["run"]["4"] == expected["k=20"]["top1"]
    assert top1["original"]["run"]["2"] != top1["original"]["run"]["4"]
    assert top1["original"]["run"]["4"] != top1["mixed-rand"]["run"]["4"]
    cls = CliRunner().invoke(curve.main, [str(run), "--data", str(demo_root), "--every", "4", "--workers", "0",
                                          "--precision", "fp32", "--pool", "cls", "--json", str(out)])
    assert cls.exit_code == 0, cls.output
    assert json.loads(out.read_text())["top1"]["original"]["run"]["4"] != top1["original"]["run"]["4"]


def test_a_split_the_dataset_lacks_is_refused_before_any_extraction(demo_root, tmp_path):
    result = CliRunner().invoke(curve.main, [str(tmp_path), "--data", str(demo_root), "--test-split", "mixed_rand"])
    assert result.exit_code == 2 and "has no split folder 'mixed_rand'" in result.output


def test_a_run_without_kept_checkpoints_is_refused(demo_root, tmp_path):
    result = CliRunner().invoke(curve.main, [str(tmp_path), "--data", str(demo_root)])
    assert result.exit_code != 0 and "--keep-every" in result.output


def test_runs_with_one_name_are_rejected_before_any_extraction(tmp_path):
    runs = [tmp_path / parent / "vanilla" for parent in ("p0", "p0.8")]
    for run in runs:
        run.mkdir(parents=True)
    result = CliRunner().invoke(curve.main, [*map(str, runs), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "two run directories are named vanilla" in result.output
