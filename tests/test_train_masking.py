"""Guided masking (--masking, --no-weight-loss): which patches each rule masks, through the model's own
`random_masking`; that --masking random leaves training bit for bit as it was; the masking-only run; and
the combinations refused at the door."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import agmae.train.engine as engine
from agmae import store
from agmae.checkpoint import load_checkpoint
from agmae.cli.train import main as train_cli
from agmae.data.folder import scan
from agmae.train.config import TrainConfig
from agmae.train.engine import train
from agmae.train.masking import SAMPLING_WEIGHT_FLOOR, masking_noise
from agmae.train.model import MaskedAutoencoderViT

from helpers import random_training_split

L = 16
DRAWS = 20_000
N_IMAGES, GRID = 16, (5, 6)
TINY_MODEL = dict(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def _mask(rule: str, noise: torch.Tensor, attn: torch.Tensor, mask_ratio: float):
    """(mask, ids_restore) that the model's own masking makes of `rule`'s noise; noise, attn: [B, L]."""
    tokens = torch.zeros(*noise.shape, 1)
    _, mask, ids_restore = MaskedAutoencoderViT.random_masking(tokens, mask_ratio, masking_noise(rule, noise, attn))
    return mask, ids_restore


def _noise(rows: int = DRAWS, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, L, generator=torch.Generator().manual_seed(seed))


def test_attention_high_masks_exactly_the_attended_patches_for_every_noise_draw():
    attended = torch.tensor([1, 5, 10, 14])
    attn = torch.zeros(DRAWS, L)
    attn[:, attended] = 1.0
    mask, _ = _mask("attention-high", _noise(), attn, mask_ratio=0.25)
    expected = torch.zeros(L)
    expected[attended] = 1.0
    assert torch.equal(mask, expected.expand(DRAWS, L))


def test_attention_high_breaks_ties_among_equal_map_values_by_the_noise():
    # 6 patches at the top value, 4 to mask: the 4 of them with the highest noise
    attn = torch.zeros(DRAWS, L)
    attn[:, :6] = 0.7
    attn[:, 6] = 0.2  # the next highest, never reached
    noise = _noise()
    mask, _ = _mask("attention-high", noise, attn, mask_ratio=0.25)
    top_noise = torch.zeros(DRAWS, L).scatter_(1, noise[:, :6].topk(4, dim=1).indices, 1.0)
    assert torch.equal(mask, top_noise)


def _sampling_weights() -> torch.Tensor:
    """A map rising from 0 to 1 over the patches: [L]."""
    return torch.linspace(0, 1, L)


def test_attention_sampled_masks_a_patch_more_often_the_higher_its_map_value():
    frequency = _mask("attention-sampled", _noise(), _sampling_weights().expand(DRAWS, L), mask_ratio=0.5)[0].mean(0)
    assert frequency.sum().item() == pytest.approx(L / 2)
    assert torch.all(frequency[1:] - frequency[:-1] > 0.01)  # > 10 standard errors of each difference
    assert frequency[0] < 0.01 and frequency[-1] > 0.8


def test_attention_sampled_masks_one_patch_with_probability_w_over_the_sum_of_w():
    # the Efraimidis-Spirakis first draw: P(patch i) = w_i / Σw, the floor included in w
    weights = _sampling_weights() + SAMPLING_WEIGHT_FLOOR
    frequency = _mask("attention-sampled", _noise(), _sampling_weights().expand(DRAWS, L), mask_ratio=1 / L)[0].mean(0)
    probability = weights / weights.sum()
    standard_error = (probability * (1 - probability) / DRAWS).sqrt()
    assert torch.all((frequency - probability).abs() < 5 * standard_error)
    assert frequency[0] < 0.001  # the zero-map patch: probability 0.001 / 8.016


@pytest.mark.parametrize("rule", ["attention-high", "attention-sampled"])
@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])  # 0: a failed or constant map, which the store holds as zeros
def test_a_constant_map_masks_exactly_as_random_masking_with_the_same_noise(rule, value):
    # high: all values tie, so the noise decides; sampled: u ** (1 / w) with one w is monotone in u
    noise = _noise(rows=2_000)
    guided = _mask(rule, noise, torch.full_like(noise, value), mask_ratio=0.75)
    random = _mask("random", noise, None, mask_ratio=0.75)
    assert torch.equal(guided[0], random[0]) and torch.equal(guided[1], random[1])


def test_random_masking_hands_the_noise_on_untouched():
    noise = _noise(rows=4)
    assert masking_noise("random", noise, torch.rand(4, L)) is noise
    assert masking_noise("random", noise, None) is noise


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return random_training_split(tmp_path_factory.mktemp("dataset"), N_IMAGES)


@pytest.fixture(scope="module")
def maps_file(image_root, tmp_path_factory):
    """Random maps, every one done."""
    path = tmp_path_factory.mktemp("maps") / "maps-oracle.h5"
    maps = np.random.default_rng(1).random((N_IMAGES, *GRID), dtype=np.float32)
    with store.create(path, scan(image_root).keys, GRID, method="oracle", backbone=None, weights_sha256=None,
                      image_size=48, method_options={}) as writer:
        writer.write(0, maps, np.full(N_IMAGES, store.STATUS_DONE, np.uint8), [""] * N_IMAGES)
    return path


def _config_for(image_root, out, maps, **overrides):
    settings = {**TINY_MODEL, "model": "mae_vit_demo_patch8", "epochs": 1, "warmup_epochs": 0, "batch_size": 4,
                "blr": 1e-2, "workers": 0, "device": "cpu", **overrides}
    return TrainConfig(data=str(image_root.parent), out=str(out), maps=str(maps), **settings)


def _weights(run_dir) -> dict:
    return load_checkpoint(Path(run_dir) / "checkpoint-last.pth")["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_masking_random_trains_bit_for_bit_as_the_code_without_a_masking_step(image_root, maps_file, tmp_path,
                                                                            monkeypatch):
    train(_config_for(image_root, tmp_path / "default", maps_file))
    train(_config_for(image_root, tmp_path / "random", maps_file, masking="random"))
    train(_config_for(image_root, tmp_path / "high", maps_file, masking="attention-high"))
    monkeypatch.setattr(engine, "masking_noise", lambda rule, noise, attn: noise)
    train(_config_for(image_root, tmp_path / "no-masking-step", maps_file))
    untouched = _weights(tmp_path / "no-masking-step")
    assert _same_weights(_weights(tmp_path / "default"), untouched)
    assert _same_weights(_weights(tmp_path / "random"), untouched)
    assert not _same_weights(_weights(tmp_path / "high"), untouched)  # the rule reaches training
    config = json.loads((tmp_path / "high" / "config.json").read_text())
    assert (config["masking"], config["weight_loss"]) == ("attention-high", True)


def test_masking_only_run_masks_the_most_attended_patches_and_keeps_the_maps_out_of_the_loss(
        image_root, maps_file, tmp_path, monkeypatch):
    masked_maps, loss_maps = [], []
    real_noise, real_loss = engine.masking_noise, engine.guided_mae_loss

    def recording_noise(rule, noise, attn):
        masked_maps.append(attn)
        return real_noise(rule, noise, attn)

    def recording_loss(pred, target, mask, attn, **kwargs):
        loss_maps.append((mask, attn))
        return real_loss(pred, target, mask, attn, **kwargs)

    monkeypatch.setattr(engine, "masking_noise", recording_noise)
    monkeypatch.setattr(engine, "guided_mae_loss", recording_loss)
    record = train(_config_for(image_root, tmp_path, maps_file, masking="attention-high", weight_loss=False))
    assert len(masked_maps) == len(loss_maps) == N_IMAGES // 4
    for attn, (mask, loss_attn) in zip(masked_maps, loss_maps):
        assert loss_attn is None and attn.shape == (4, L)
        # every masked patch's cropped map value >= every visible one's, 12 of 16 masked
        assert torch.all(attn.masked_fill(mask == 0, 2).amin(1) >= attn.masked_fill(mask == 1, -1).amax(1))
        assert torch.equal(mask.sum(1), torch.full((4,), 12.0))
    assert record["tau"] is None and 0 < record["fg_weight_share"] < 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["masking"], config["weight_loss"]) == ("attention-high", False)


def test_resuming_with_another_masking_or_weight_loss_is_refused(image_root, maps_file, tmp_path):
    train(_config_for(image_root, tmp_path, maps_file, masking="attention-sampled"))
    with pytest.raises(ValueError, match="was trained with --masking 'attention-sampled', this run has "
                                         "'attention-high'"):
        train(_config_for(image_root, tmp_path, maps_file, masking="attention-high"))
    with pytest.raises(ValueError, match="was trained with --weight-loss True, this run has False"):
        train(_config_for(image_root, tmp_path, maps_file, masking="attention-sampled", weight_loss=False))


@pytest.mark.parametrize("settings, args, message", [
    (dict(masking="attention-high"), ["--no-guidance", "--masking", "attention-high"],
     "--masking attention-high chooses the masked patches by the maps: it needs --maps"),
    (dict(masking="attention-sampled", weight_loss=False),
     ["--no-guidance", "--masking", "attention-sampled", "--no-weight-loss"],
     "--masking attention-sampled chooses the masked patches by the maps: it needs --maps"),
    (dict(weight_loss=False), ["--no-guidance", "--no-weight-loss"], "--no-weight-loss .* it needs --maps"),
    (dict(weight_loss=False, maps="maps.h5"), ["--maps", "maps.h5", "--no-weight-loss"],
     "--no-weight-loss with --masking random uses --maps for nothing: .* train it with --no-guidance"),
])
def test_maps_without_a_use_or_a_use_without_maps_is_one_line_naming_the_options(settings, args, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)
    result = CliRunner().invoke(train_cli, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and re.search(message, lines[0])


def test_an_unknown_masking_rule_is_refused_in_python_and_on_the_command_line():
    with pytest.raises(ValueError, match="--masking 'attention-low'"):
        TrainConfig(masking="attention-low")
    result = CliRunner().invoke(train_cli, ["--masking", "attention-low"])
    assert result.exit_code == 2 and "'attention-low' is not one of 'random', 'attention-high'" in result.output
