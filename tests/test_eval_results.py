"""Typed results: each protocol's entry of results.json is a `Result` with typed metrics, written with a
schema_version and read back by `load_results`; entries written before the schema was versioned read too. Every
value an evaluation clamped, defaulted or resolved (a k above the bank, a capped probe batch, the default blr, the
precision "auto", the encoder's kwargs, the map stores found in the run directory) is printed and recorded."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from timm.models.vision_transformer import VisionTransformer

from agmae import store
from agmae.cli.eval import main
from agmae.data.demo import load_mask
from agmae.data.folder import scan
from agmae.errors import UserError
from agmae.eval.report import (SCHEMA_VERSION, AttentionMetrics, FinetuneMetrics, KnnMetrics, LinearMetrics, Result,
                               RetrievalMetrics, RobustnessMetrics, load_results, parse_results)

from helpers import TINY_VIT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": VisionTransformer(**TINY_VIT, num_classes=0).state_dict(), "config": {"encoder": TINY_VIT},
                "epoch": 1}, run / "checkpoint-last.pth")
    return run


def oracle_store(path, demo_root):
    keys = scan(demo_root / "train").keys
    masks = torch.from_numpy(np.stack([load_mask(demo_root, "train", key) for key in keys]))
    with store.create(path, keys, (4, 4), method="oracle", backbone=None, weights_sha256=None, image_size=32,
                      method_options={}) as writer:
        writer.write(0, torch.nn.functional.adaptive_avg_pool2d(masks[:, None], (4, 4))[:, 0].numpy(),
                     np.full(len(keys), store.STATUS_DONE, np.uint8))


def test_every_protocol_is_written_typed_and_read_back_with_the_values_it_used(run_dir, demo_root):
    oracle_store(run_dir / "maps-oracle.h5", demo_root)
    result = CliRunner().invoke(main, ["all", "--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data",
                                       str(demo_root), "--workers", "0", "--mode", "cached", "--epochs", "1",
                                       "--warmup-epochs", "0", "--k", "5", "--k", "500",
                                       "--linear-batch-size", "1000"])
    assert result.exit_code == 0, result.output
    raw = json.loads((run_dir / "results.json").read_text())
    results = load_results(run_dir)
    assert {key: type(r.metrics) for key, r in results.items()} == {
        "knn": KnnMetrics, "linear-cached": LinearMetrics, "retrieval": RetrievalMetrics,
        "robustness": RobustnessMetrics, "attention": AttentionMetrics}
    for key, typed in results.items():
        assert typed.schema_version == SCHEMA_VERSION == raw[key]["schema_version"]
        assert typed.to_json() == raw[key], f"{key}: the typed entry is what results.json holds"
    bank = len(scan(demo_root / "train"))
    knn = results["knn"]
    assert knn.metrics.k_used == {5: 5, 500: bank} and raw["knn"]["results"]["k=500"]["k_used"] == bank
    assert knn.metrics.top1(500) == raw["knn"]["results"]["k=500"]["top1"]
    assert f"k=500 exceed the bank of {bank} images: k={bank} used" in result.output
    assert knn.options["precision"] == "fp32" and knn.options["encoder"]["num_heads"] == TINY_VIT["num_heads"]
    probe = results["linear-cached"]
    assert probe.metrics.batch_size == bank and probe.metrics.lr == pytest.approx(probe.options["blr"] * bank / 256)
    assert (f"probe: blr 534 (default, scaled to {bank} training images), batch {bank} (--linear-batch-size 1000 "
            "capped at the training set)") in result.output
    robustness = results["robustness"].metrics
    assert robustness.k_used == bank and f"k-NN top-1 (k={bank})" in result.output  # k=20 not asked: the largest k
    assert robustness.splits["original"].knn_top1 == knn.metrics.top1(500)
    attention = results["attention"]
    assert attention.options["maps"] == [str((run_dir / "maps-oracle.h5").resolve())]
    assert attention.options["maps_chosen"] == "every maps-*.h5 of the run directory (no --maps given)"
    assert "map stores: every maps-*.h5 of the run directory" in result.output
    assert attention.metrics.rows["oracle (maps-oracle.h5)"].images == bank
    assert results["retrieval"].metrics.recall[1] == raw["retrieval"]["results"]["R@1"]
    # a second evaluation on the cached features still records the encoder it was computed with
    again = CliRunner().invoke(main, ["knn", "--checkpoint", str(run_dir / "checkpoint-last.pth"), "--data",
                                      str(demo_root), "--workers", "0", "--k", "5"])
    assert again.exit_code == 0 and load_results(run_dir)["knn"].options["encoder"] == knn.options["encoder"]


# An entry of each protocol as agmae wrote them before schema_version (numbers shortened).
SCHEMA_1 = {
    "knn": {"protocol": "knn", "options": {"ks": [10, 20], "pool": "cls", "precision": "auto"},
            "results": {"k=10": {"top1": 40.5, "top5": 80.0}, "k=20": {"top1": 41.0, "top5": 81.5}},
            "checkpoint": "/r/checkpoint-last.pth", "checkpoint_sha256": "ab", "seconds": 1.5,
            "dataset": {"root": "/d", "keys_sha256": {"train": "t", "original": "o"}}, "time": "2026-12-01T10:00:00"},
    "knn[pool=mean]": {"protocol": "knn[pool=mean]", "results": {"k=20": {"top1": 44.0, "top5": 85.0}}},
    "linear-cached": {"protocol": "linear-cached", "results": {"mode": "cached-features (no augmentation)",
                                                               "top1": 30.0, "top5": 70.0, "lr": 2.5,
                                                               "final_loss": 1.9}},
    "retrieval": {"protocol": "retrieval", "results": {"mAP": 12.0, "R@1": 30.0, "R@5": 60.0, "queries": 60,
                                                       "queries_without_relevant": 0}},
    "robustness[pool=mean]": {"protocol": "robustness[pool=mean]", "results": {
        "splits": {"original": {"knn_top1": 50.0, "linear_top1": 45.0},
                   "mixed-rand": {"knn_top1": 30.0, "linear_top1": 28.0},
                   "mixed-same": {"knn_top1": 55.0, "linear_top1": 52.0}},
        "bg_gap": {"knn_top1": 25.0, "linear_top1": 24.0}, "clean_fg_knn_top1": 33.0,
        "linear_mode": "cached-features (no augmentation)"}},
    "attention": {"protocol": "attention", "results": {
        "oracle (maps-oracle.h5)": {"path": "/r/maps-oracle.h5", "method": "oracle", "grid": [14, 14],
                                    "mean_iou": 70.0, "pointing": 99.0, "images": 240, "skipped": 0},
        "centre-prior": {"grid": [14, 14], "sigma": 0.25, "mean_iou": 40.0, "pointing": 80.0, "images": 240,
                         "skipped": 0}}},
    "finetune": {"protocol": "finetune", "results": {"splits": {"original": {"top1": 60.0, "top5": 95.0}},
                                                     "epoch_losses": [2.0, 1.5]}},
}


def test_entries_written_before_the_schema_version_read_as_typed_fields(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(SCHEMA_1))
    results = load_results(tmp_path)
    assert all(r.schema_version == 1 for r in results.values())
    assert results["knn"].metrics.top1(20) == 41.0 and results["knn"].metrics.k_used == {10: None, 20: None}
    assert results["knn"].metrics.by_k[10].top5 == 80.0 and results["knn"].dataset["keys_sha256"]["train"] == "t"
    assert results["knn[pool=mean]"].metrics.top1() == 44.0
    assert results["linear-cached"].metrics.top1 == 30.0 and results["linear-cached"].metrics.batch_size is None
    assert results["retrieval"].metrics.recall == {1: 30.0, 5: 60.0}
    mean = results["robustness[pool=mean]"].metrics
    assert mean.splits["mixed-rand"].knn_top1 == 30.0 and mean.splits["original"].linear_top1 == 45.0
    assert mean.bg_gap.knn_top1 == 25.0 and mean.clean_fg_knn_top1 == 33.0 and mean.k_used is None
    assert results["attention"].metrics.rows["centre-prior"].sigma == 0.25
    assert results["finetune"].metrics.splits["original"].top1 == 60.0
    for key, entry in SCHEMA_1.items():  # nothing of an old entry is lost on the way through the types
        assert results[key].to_json() == {"schema_version": 1, **entry}


def test_an_entry_of_an_unknown_protocol_keeps_its_plain_results_and_a_newer_schema_is_refused(tmp_path):
    typed = parse_results({"segment": {"protocol": "segment", "schema_version": 2, "results": {"miou": 3.0}}})
    assert typed["segment"].metrics == {"miou": 3.0} and isinstance(typed["segment"], Result)
    (tmp_path / "results.json").write_text(json.dumps({"knn": {**SCHEMA_1["knn"], "schema_version": 3}}))
    with pytest.raises(UserError, match=r"results.json: entry 'knn' has schema_version 3, this agmae reads 1 to 2"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"robustness": {"results": {"mAP": 1.0}}}))
    with pytest.raises(UserError, match="entry 'robustness' does not hold robustness results"):
        load_results(tmp_path)


def test_finetune_metrics_round_trip():
    metrics = FinetuneMetrics.from_json(SCHEMA_1["finetune"]["results"])
    assert metrics.to_json() == SCHEMA_1["finetune"]["results"] and metrics.epoch_losses == [2.0, 1.5]


def test_a_head_count_guessed_from_an_exported_state_dict_is_printed_and_recorded(run_dir, demo_root, tmp_path):
    exported = tmp_path / "vit.pth"  # a plain timm state dict with no kwargs file: the head count is assumed
    torch.save(torch.load(run_dir / "checkpoint-last.pth")["model"], exported)
    result = CliRunner().invoke(main, ["knn", "--checkpoint", str(exported), "--data", str(demo_root), "--workers",
                                       "0", "--k", "5"])
    assert result.exit_code == 0, result.output
    recorded = load_results(tmp_path)["knn"].options["encoder"]
    assert recorded["num_heads"] == 1 and recorded["embed_dim"] == 32  # 32 / 64-wide heads, at least one
    assert "encoder: depth 2, heads 1, dim 32, patch 8, image 32; features cls, fp32" in result.output
