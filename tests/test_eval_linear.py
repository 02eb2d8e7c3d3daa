"""eval.linear: MAE-protocol probe (BN + Linear, LARS, warm-up + cosine), cached and augmented modes."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from agmae.data.folder import scan
from agmae.eval.linear import build_optimizer, build_probe, build_scheduler, probe_accuracy, train_probe_augmented, \
    train_probe_cached


pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_head_is_bn_without_affine_and_small_linear():
    torch.manual_seed(0)
    probe = build_probe(64, 10)
    bn, linear = probe
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.all(linear.bias == 0)


def test_lars_adapts_the_weight_matrix_only_and_has_no_weight_decay():
    optimizer = build_optimizer(build_probe(8, 3), lr=0.5)
    matrices, vectors = optimizer.param_groups
    assert [p.ndim for p in matrices["params"]] == [2] and matrices["always_adapt"]
    assert [p.ndim for p in vectors["params"]] == [1] and not vectors["always_adapt"]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in optimizer.param_groups)


def test_schedule_is_linear_warmup_then_half_cosine():
    optimizer = build_optimizer(build_probe(8, 3), lr=0.4)
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_steps=10)
    for step in (0, 5, 10, 40, 99):
        scheduler.step_update(step)
        expected = 0.4 * step / 10 if step < 10 else 0.4 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_cached_probe_reaches_100_percent_on_a_linearly_separable_set():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 4
    labels = rng.integers(0, 4, 200)
    feats = (centres[labels] + rng.normal(size=(200, 16))).astype(np.float16)
    # blr 51.2 at batch 32 is lr 6.4, the lr of MAE's 16384-image probe batches
    probe, losses, lr = train_probe_cached(feats, labels, 4, epochs=30, warmup_epochs=3, batch_size=32, blr=51.2,
                                           progress=False)
    assert lr == pytest.approx(6.4)
    assert probe_accuracy(probe, feats, labels)["top1"] == 100.0
    assert losses[-1] < 0.1 * losses[0]


def test_augmented_probe_trains_the_head_and_leaves_the_encoder_frozen(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe, losses, lr = train_probe_augmented(encoder, scan(tmp_path), 32, 2, epochs=2, warmup_epochs=1,
                                              batch_size=4, blr=25.6, workers=0, progress=False)
    assert lr == pytest.approx(0.4) and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    torch.manual_seed(0)
    assert not torch.equal(probe[1].weight, build_probe(32, 2)[1].weight)
