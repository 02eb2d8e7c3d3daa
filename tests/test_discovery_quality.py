"""experiments/discovery_quality.py: rows of one run's kept checkpoints stay apart; --encoder-layers picks the layers
cut."""
from pathlib import Path

from experiments import discovery_quality


def test_kept_checkpoints_of_one_run_are_labelled_by_epoch():
    label = discovery_quality.encoder_label
    run = Path("runs/vanilla-773f2ccb")
    assert label(run / "checkpoint-last.pth") == "vanilla-773f2ccb"
    assert label(run / "checkpoint-16.pth") == "vanilla-773f2ccb/checkpoint-16"
    assert label(run / "checkpoint-16.pth") != label(run / "checkpoint-32.pth")


def test_each_encoder_layer_gets_its_own_tokencut_row_beside_the_method_defaults():
    settings = discovery_quality.own_encoder_settings(["norm", "blocks.0"])
    assert list(settings) == ["tokencut keys", "tokencut norm centred border", "tokencut blocks.0 centred border",
                              "dino"]
    assert settings["tokencut blocks.0 centred border"] == (
        "tokencut", {"layer": "blocks.0", "center": True, "fg_rule": "border"})
    assert settings["tokencut keys"] == ("tokencut", {}) and settings["dino"] == ("dino", {})
