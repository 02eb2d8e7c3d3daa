"""eval.robustness on hand-made features: per-split accuracy, BG-gap, clean-fg k-NN, class checks."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agmae.eval.features import FolderFeatures
from agmae.eval.report import format_table, read_results, update_results
from agmae.eval.robustness import check_same_classes, robustness_results

CLASSES = ["a", "b"]


def folder(feats, labels, name, classes=CLASSES):
    index = SimpleNamespace(root=Path(name), classes=classes, labels=np.asarray(labels))
    return FolderFeatures(np.asarray(feats, dtype=np.float16), index, None)


def test_split_accuracies_bg_gap_and_clean_fg():
    # class a points along x, class b along y; the queries of each split are designed to be right or wrong
    train = folder([[1, 0], [1, 0.1], [0, 1], [0.1, 1]], [0, 0, 1, 1], "train")
    right = [[1, 0.05], [0.05, 1]]
    wrong = [[0.05, 1], [1, 0.05]]
    splits = {"mixed-same": folder(right, [0, 1], "ms"), "mixed-rand": folder([right[0], wrong[1]], [0, 1], "mr"),
              "only-fg": folder(wrong, [0, 1], "fg")}
    clean_bank = folder([[0, 1], [1, 0]], [0, 1], "train-fg")  # swapped: only-fg queries are right against it
    results = robustness_results(train, splits, clean_fg_bank=clean_bank, k=2, T=0.07)
    assert results["splits"]["mixed-same"]["knn_top1"] == pytest.approx(100.0)
    assert results["splits"]["mixed-rand"]["knn_top1"] == pytest.approx(50.0)
    assert results["splits"]["only-fg"]["knn_top1"] == pytest.approx(0.0)
    assert results["bg_gap"] == {"knn_top1": pytest.approx(50.0)}
    assert results["clean_fg_knn_top1"] == pytest.approx(100.0)


def test_no_gap_without_mixed_same_and_class_mismatch_rejected():
    train = folder([[1, 0], [0, 1]], [0, 1], "train")
    results = robustness_results(train, {"original": folder([[1, 0]], [0], "o")}, k=1)
    assert "bg_gap" not in results and "clean_fg_knn_top1" not in results
    with pytest.raises(ValueError, match=r"lacks the classes \['b'\] and has \['c'\].*robustness needs"):
        robustness_results(train, {"other": folder([[1, 0]], [0], "x", classes=["a", "c"])}, k=1)
    with pytest.raises(ValueError, match="k-NN needs both splits"):
        check_same_classes(train.index, {"val": folder([[1, 0]], [0], "x", classes=["a"]).index}, "k-NN")


def test_results_json_updates_one_key_and_keeps_the_others(tmp_path):
    update_results(tmp_path, "knn", {"results": {"k=20": {"top1": 50.0}}})
    update_results(tmp_path, "retrieval", {"results": {"mAP": 10.0}})
    update_results(tmp_path, "knn", {"results": {"k=20": {"top1": 60.0}}})
    results = read_results(tmp_path)
    assert set(results) == {"knn", "retrieval"}
    assert results["knn"]["results"]["k=20"]["top1"] == 60.0 and "time" in results["knn"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        update_results(tmp_path, "knn", {})


def test_format_table():
    assert format_table(["k", "top-1"], [[20, 12.345], [200, None]]).splitlines() == [
        "k    top-1", "---  -----", "20   12.35", "200      -"]
