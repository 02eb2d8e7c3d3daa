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


def test_probe_standardises_each_feature_with_eps_1e6_and_starts_near_uniform():
    torch.manual_seed(0)
    probe = build_probe(64, 10).train()
    # features of variance exactly 1e-5: BN's eps (1e-6) shrinks them to sqrt(1e-5 / 1.1e-5) = 0.9535
    # (the default eps 1e-5 would give 0.707), whatever their offset and scale
    feats = torch.randn(512, 64, dtype=torch.float64)
    feats = ((feats - feats.mean(0)) / feats.std(0, unbiased=False) * math.sqrt(1e-5) + 5.0).float()
    standardised = probe[0](feats)
    assert standardised.std(0, unbiased=False).mean().item() == pytest.approx(math.sqrt(1 / 1.1), rel=1e-3)
    assert sum(p.numel() for p in probe.parameters()) == 64 * 10 + 10  # no affine BN parameters to learn
    # a head of std 0.01 on 64 standardised features starts with logits of std ~0.08: nearly uniform
    assert 0.05 < probe(feats).std().item() < 0.11


def test_lars_steps_the_matrix_by_its_trust_ratio_and_the_bias_by_its_gradient():
    """timm's Lars: a matrix moves by lr x 0.001 x |w| whatever its gradient's scale; the bias, not adapted,
    by lr x its gradient; no weight decay (a zero gradient moves nothing)."""
    steps = []
    for scale in (1.0, 100.0):
        torch.manual_seed(0)
        probe = build_probe(8, 3)
        weight, bias = probe[1].weight, probe[1].bias
        before = weight.detach().clone(), bias.detach().clone()
        optimizer = build_optimizer(probe, lr=0.5)
        weight.grad, bias.grad = torch.full_like(weight, scale), torch.full_like(bias, scale)
        optimizer.step()
        steps.append(((weight - before[0]).norm().item(), (bias - before[1]).abs().max().item(),
                      before[0].norm().item()))
    (w1, b1, norm), (w100, b100, _) = steps
    assert w1 == pytest.approx(0.5 * 0.001 * norm, rel=1e-4) and w100 == pytest.approx(w1, rel=1e-4)
    assert b1 == pytest.approx(0.5) and b100 == pytest.approx(50.0)
    probe = build_probe(8, 3)
    before = [p.detach().clone() for p in probe.parameters()]
    optimizer = build_optimizer(probe, lr=0.5)
    for p in probe.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, probe.parameters()))


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


def test_augmented_probe_trains_the_head_reproducibly_and_leaves_the_encoder_frozen(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    runs = [train_probe_augmented(encoder, scan(tmp_path), 32, 2, epochs=2, warmup_epochs=1, batch_size=4, blr=25.6,
                                  workers=0, progress=False, seed=seed) for seed in (0, 0, 1)]
    (probe, losses, lr), (again, again_losses, _), (other, _, _) = runs
    assert lr == pytest.approx(0.4) and len(losses) == 2
    # a near-uniform start on 2 classes: the first epoch's loss is close to ln 2
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)
    assert losses == again_losses and torch.equal(probe[1].weight, again[1].weight)  # the seed fixes the run
    assert not torch.equal(probe[1].weight, other[1].weight)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    torch.manual_seed(0)
    assert not torch.equal(probe[1].weight, build_probe(32, 2)[1].weight)


def test_a_probe_without_a_cosine_phase_prints_nothing_of_timm(caplog):
    with caplog.at_level("DEBUG"):
        build_scheduler(build_optimizer(build_probe(4, 2), 0.1), total_steps=2, warmup_steps=1)
    assert not [record for record in caplog.records if record.name.startswith("timm")]
