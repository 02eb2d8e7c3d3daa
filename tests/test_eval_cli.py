"""agmae-eval end to end on the small demo dataset with a tiny random ViT."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae.data.demo import load_mask
from agmae.data.folder import scan
from agmae.eval.features import FeatureSource
from agmae.checkpoint import file_sha256
from agmae.eval.knn import knn_evaluate
from agmae.eval.retrieval import retrieval_metrics
from agmae.eval.linear import probe_blr
from agmae import store
from agmae.cli.eval import main

from helpers import TINY_VIT, add_unreadable_images

CLASS = "0-tshirt"


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    encoder = VisionTransformer(**TINY_VIT, num_classes=0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": encoder.state_dict(), "config": {"encoder": TINY_VIT}, "epoch": 1},
               run / "checkpoint-last.pth")
    return run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_without_arguments_evaluates_the_default_run_on_the_demo(run_dir, demo_root, monkeypatch):
    monkeypatch.setenv("AGMAE_RUN_DIR", str(run_dir))
    monkeypatch.setattr("agmae.data.demo.ensure_demo", lambda **params: demo_root)
    result = CliRunner().invoke(main, ["knn"])
    assert result.exit_code == 0, result.output
    assert "top-1" in result.output and "results.json" in result.output
    entry = json.loads((run_dir / "results.json").read_text())["knn"]
    checkpoint = run_dir / "checkpoint-last.pth"
    assert entry["checkpoint_sha256"] == file_sha256(checkpoint)
    assert entry["dataset"]["keys_sha256"] == {split: scan(demo_root / split).keys_sha256
                                               for split in ("train", "original")}
    source = FeatureSource(checkpoint, workers=0)
    train, test = source.features(demo_root / "train"), source.features(demo_root / "original")
    expected = knn_evaluate(train.feats, train.index.labels, test.feats, test.index.labels, 10)
    assert entry["results"] == expected and set(expected) == {"k=10", "k=20", "k=100", "k=200"}


def _oracle_store(path, demo_root, keys, grid=(4, 4)):
    masks = torch.from_numpy(np.stack([load_mask(demo_root, "train", key) for key in keys]))
    maps = F.adaptive_avg_pool2d(masks[:, None], grid)[:, 0].numpy()
    with store.create(path, keys, grid, method="oracle", backbone=None, weights_sha256=None, image_size=32,
                      method_options={}, keys_sha256=scan(demo_root / "train").keys_sha256) as writer:
        status = np.full(len(keys), store.STATUS_DONE, dtype=np.uint8)
        status[-1] = store.STATUS_FAILED
        writer.write(0, maps, status, [""] * (len(keys) - 1) + ["unreadable"])


def test_all_writes_every_protocol_and_keeps_earlier_keys(run_dir, demo_root):
    keys = scan(demo_root / "train").keys
    _oracle_store(run_dir / "maps-oracle.h5", demo_root, keys)
    (run_dir / "results.json").write_text(json.dumps({"finetune": {"results": {"top1": 1.0}}}))
    result = CliRunner().invoke(main, ["all", "--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data",
                                       str(demo_root), "--workers", "0", "--mode", "cached", "--epochs", "2",
                                       "--warmup-epochs", "1", "--k", "5", "--k", "20"])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"finetune", "knn", "linear-cached", "retrieval", "robustness", "attention"}
    assert results["linear-cached"]["results"]["mode"] == "cached-features (no augmentation)"
    assert results["linear-cached"]["options"]["blr"] == probe_blr(len(keys)) == 534.0  # 0.1 x 1.28M / 240
    assert set(results["knn"]["results"]) == {"k=5", "k=20"}
    source = FeatureSource(run_dir / "checkpoint-last.pth", workers=0)
    features = {split: source.features(demo_root / split) for split in ("train", "original", "only-fg", "train-fg")}
    train, test = features["train"], features["original"]
    assert results["retrieval"]["results"] == retrieval_metrics(train.feats, train.index.labels, test.feats,
                                                                test.index.labels)
    assert results["knn"]["results"] == knn_evaluate(train.feats, train.index.labels, test.feats, test.index.labels,
                                                     10, ks=(5, 20))
    robustness = results["robustness"]["results"]
    assert set(robustness["splits"]) == {"original", "mixed-rand", "only-fg"} and "bg_gap" not in robustness
    assert robustness["splits"]["original"]["knn_top1"] == results["knn"]["results"]["k=20"]["top1"]
    bank, queries = features["train-fg"], features["only-fg"]
    clean_fg = knn_evaluate(bank.feats, bank.index.labels, queries.feats, queries.index.labels, 10, ks=(20,))
    assert robustness["clean_fg_knn_top1"] == clean_fg["k=20"]["top1"]
    oracle = results["attention"]["results"]["oracle (maps-oracle.h5)"]
    assert oracle["images"] == len(keys) - 1 and oracle["skipped"] == 1
    # mask-derived maps must beat the centre prior that ignores the image
    prior = results["attention"]["results"]["centre-prior"]
    assert oracle["mean_iou"] > prior["mean_iou"] and oracle["pointing"] > 90
    assert "centre prior" in result.output and "BG-gap" not in result.output


def test_missing_checkpoint_fails_with_one_line_and_writes_nothing(tmp_path, demo_root):
    result = CliRunner().invoke(main, ["knn", "--checkpoint", str(tmp_path / "none.pth"), "--data", str(demo_root)])
    assert result.exit_code != 0
    assert "none.pth does not exist" in result.output and "agmae-train" in result.output
    assert not (tmp_path / "results.json").exists()


def test_split_missing_from_dataset_is_rejected(run_dir, demo_root):
    result = CliRunner().invoke(main, ["retrieval", "--checkpoint", str(run_dir / "checkpoint-last.pth"),
                                       "--data", str(demo_root), "--test-split", "val", "--workers", "0"])
    assert result.exit_code != 0 and "no split folder 'val'" in result.output
    assert not (run_dir / "results.json").exists()


def test_probe_lr_follows_the_size_of_any_training_set(run_dir, demo_root, tmp_path):
    root = tmp_path / "folders"  # the demo's images without its demo.json: an ordinary dataset
    root.mkdir()
    for split in ("train", "original"):
        (root / split).symlink_to(demo_root / split)
    result = CliRunner().invoke(main, ["linear", "--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data",
                                       str(root), "--workers", "0", "--mode", "cached",
                                       "--epochs", "1", "--warmup-epochs", "0", "--linear-batch-size", "64"])
    assert result.exit_code == 0, result.output
    entry = json.loads((run_dir / "results.json").read_text())["linear-cached"]
    assert entry["options"]["blr"] == 534.0 and entry["results"]["lr"] == pytest.approx(534.0 * 64 / 256)
    assert probe_blr(10_000) == 12.8 and probe_blr(1_281_167) == probe_blr(5_000_000) == 0.1


def test_attention_scores_a_centre_prior_at_each_stores_grid_and_takes_no_feature_options(run_dir, demo_root):
    keys = scan(demo_root / "train").keys
    _oracle_store(run_dir / "maps-coarse.h5", demo_root, keys, grid=(2, 2))
    _oracle_store(run_dir / "maps-fine.h5", demo_root, keys, grid=(8, 8))
    result = CliRunner().invoke(main, ["attention", "--run-dir", str(run_dir), "--data", str(demo_root)])
    assert result.exit_code == 0, result.output
    scores = json.loads((run_dir / "results.json").read_text())["attention"]["results"]
    coarse, fine = scores["centre-prior 2x2"], scores["centre-prior 8x8"]
    assert (coarse["grid"], fine["grid"]) == ([2, 2], [8, 8]) and coarse["mean_iou"] != fine["mean_iou"]
    options = {param.name for param in main.commands["attention"].params}
    assert {"run_dir", "data", "map_stores"} <= options and not options & {"checkpoint", "pool", "precision"}


def test_robustness_reads_its_own_splits_and_refuses_a_test_split(run_dir, demo_root):
    checkpoint = ["--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data", str(demo_root), "--workers", "0"]
    refused = CliRunner().invoke(main, ["robustness", *checkpoint, "--test-split", "only-fg"])
    assert refused.exit_code == 2 and "No such option '--test-split'" in refused.output
    result = CliRunner().invoke(main, ["robustness", *checkpoint, "--splits", "only-fg", "--splits", "mixed-rand",
                                       "--epochs", "1", "--warmup-epochs", "0"])
    assert result.exit_code == 0, result.output
    entry = json.loads((run_dir / "results.json").read_text())["robustness"]
    assert set(entry["results"]["splits"]) == {"only-fg", "mixed-rand"} and entry["options"]["splits"] == [
        "only-fg", "mixed-rand"]
    assert set(entry["dataset"]["keys_sha256"]) == {"train", "only-fg", "mixed-rand", "train-fg"}
    assert "clean_fg_knn_top1" in entry["results"]
    # without the diagnostic, train-fg is neither read nor reported
    result = CliRunner().invoke(main, ["robustness", *checkpoint, "--splits", "only-fg", "--no-clean-fg",
                                       "--epochs", "1", "--warmup-epochs", "0"])
    assert result.exit_code == 0, result.output
    entry = json.loads((run_dir / "results.json").read_text())["robustness"]
    assert "clean_fg_knn_top1" not in entry["results"] and set(entry["dataset"]["keys_sha256"]) == {"train", "only-fg"}
    assert "clean-fg" not in result.output


def test_every_protocol_leaves_unreadable_images_out_and_names_them(run_dir, demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "home"))
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    like = next((data / "train").glob("*/*.png"))
    bad = {split: [f"{CLASS}/{name}" for name in ("empty.png", "text.png", "truncated.png", "truncated.jpg")]
           for split in ("train", "original")}
    for split in bad:
        (tmp_path / split).mkdir()
        for key in add_unreadable_images(tmp_path / split, like):
            shutil.move(tmp_path / split / key, data / split / CLASS / key.split("/")[1])
    base = ["--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data", str(data), "--workers", "0"]
    result = CliRunner().invoke(main, ["all", *base, "--mode", "cached", "--epochs", "1", "--warmup-epochs", "0",
                                       "--max-failures", "0.1"])
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "results.json").read_text())
    for protocol in ("knn", "linear-cached", "retrieval"):
        assert {split: info["count"] for split, info in results[protocol]["unreadable"].items()} == {
            "train": 4, "original": 4}
        assert set(results[protocol]["unreadable"]["train"]["examples"]) == set(bad["train"])
    assert results["robustness"]["unreadable"]["original"]["count"] == 4
    assert "4 unreadable images left out" in result.output
    strict = CliRunner().invoke(main, ["knn", *base])
    assert strict.exit_code == 1 and "4 of" in strict.output and "--max-failures" in strict.output
