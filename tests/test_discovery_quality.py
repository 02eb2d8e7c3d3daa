"""benchmarks/discovery_quality.py: rows of one run's kept checkpoints stay apart."""
from pathlib import Path

from helpers import load_benchmark


def test_kept_checkpoints_of_one_run_are_labelled_by_epoch():
    label = load_benchmark("discovery_quality").encoder_label
    run = Path("runs/vanilla-773f2ccb")
    assert label(run / "checkpoint-last.pth") == "vanilla-773f2ccb"
    assert label(run / "checkpoint-16.pth") == "vanilla-773f2ccb/checkpoint-16"
    assert label(run / "checkpoint-16.pth") != label(run / "checkpoint-32.pth")
