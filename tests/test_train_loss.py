"""The guided loss against the formulas of docs/METHOD.md#the-guided-loss, and the lr / tau schedules."""
import math

import pytest
import torch

from agmae.errors import UserError
from agmae.train.config import TrainConfig
from agmae.train.loss import check_temperature, foreground_weight_share, guided_mae_loss
from agmae.train.schedules import lr_at, tau_at

E = math.e


def _plain_mae_loss(pred, target, mask):
    """MAE's own loss, written out: norm-pix target, per-patch MSE, mean over masked patches."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    per_patch = ((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _random_batch(seed=0, b=3, length=16, dim=12):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, length, dim, generator=g)
    target = torch.randn(b, length, dim, generator=g) * 3 + 1
    # MAE masks the same number of patches in every image
    mask = torch.zeros(b, length)
    for row in range(b):
        mask[row, torch.randperm(length, generator=g)[: length * 3 // 4]] = 1
    attn = torch.rand(b, length, generator=g)
    return pred, target, mask, attn


@pytest.mark.parametrize("weight_norm", ["batch", "sample"])
def test_all_equal_weights_give_the_plain_mae_loss(weight_norm):
    pred, target, mask, _ = _random_batch()
    plain = _plain_mae_loss(pred, target, mask)
    constant_map = torch.full_like(mask, 0.7)
    guided = guided_mae_loss(pred, target, mask, constant_map, tau=0.3, weight_norm=weight_norm)
    assert guided.item() == pytest.approx(plain.item(), rel=1e-6)
    assert guided_mae_loss(pred, target, mask).item() == pytest.approx(plain.item(), rel=1e-6)


def test_paper_form_with_zero_map_and_unit_gamma_is_the_plain_loss():
    pred, target, mask, _ = _random_batch()
    loss = guided_mae_loss(pred, target, mask, torch.zeros_like(mask), tau=0.5, weight_norm="none", gamma=1.0)
    assert loss.item() == pytest.approx(_plain_mae_loss(pred, target, mask).item(), rel=1e-6)


@pytest.mark.parametrize("weight_norm", ["batch", "sample"])
def test_large_tau_converges_to_the_plain_loss(weight_norm):
    pred, target, mask, attn = _random_batch(seed=1)
    plain = _plain_mae_loss(pred, target, mask).item()
    gaps = [abs(guided_mae_loss(pred, target, mask, attn, tau=tau, weight_norm=weight_norm).item() - plain)
            for tau in (1.0, 10.0, 1e3, 1e6)]
    assert gaps[0] > 1e-3
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-5


@pytest.mark.parametrize("weight_norm", ["batch", "sample", "none"])
def test_unmasked_patches_get_zero_gradient(weight_norm):
    pred, target, mask, attn = _random_batch(seed=2)
    pred.requires_grad_(True)
    guided_mae_loss(pred, target, mask, attn, tau=0.5, weight_norm=weight_norm).backward()
    visible = mask == 0
    assert torch.count_nonzero(pred.grad[visible]) == 0
    assert (pred.grad[~visible].abs().sum(dim=-1) > 0).all()


def _hand_example():
    """2 images x 4 patches; norm_pix off so e_bi = mean of target^2 (pred = 0) can be read off."""
    patch_values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 1.0, 1.5, 2.0]])
    target = patch_values[..., None].expand(2, 4, 2).clone()  # e = [[1, 4, 9, 16], [0.25, 1, 2.25, 4]]
    pred = torch.zeros_like(target)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    attn = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.5]])
    return pred, target, mask, attn  # with tau = 0.5: w = exp(2a) = [[e^2, 1, e, 1], [1, e^2, 1, e]]


def test_hand_computed_values_on_a_two_by_four_example():
    pred, target, mask, attn = _hand_example()
    kwargs = dict(tau=0.5, norm_pix=False)
    # masked: image 0 -> (w, e) = (e^2, 1), (e, 9), (1, 16); image 1 -> (e^2, 1), (1, 2.25)
    batch = (E**2 * 1 + E * 9 + 16 + E**2 * 1 + 2.25) / (E**2 + E + 1 + E**2 + 1)
    sample = ((E**2 + 9 * E + 16) / (E**2 + E + 1) + (E**2 + 2.25) / (E**2 + 1)) / 2
    paper = 2.0 * (E**2 + 9 * E + 16 + E**2 + 2.25) / 5
    assert guided_mae_loss(pred, target, mask, attn, weight_norm="batch", **kwargs).item() == pytest.approx(batch, rel=1e-6)
    assert guided_mae_loss(pred, target, mask, attn, weight_norm="sample", **kwargs).item() == pytest.approx(sample, rel=1e-6)
    assert guided_mae_loss(pred, target, mask, attn, weight_norm="none", gamma=2.0, **kwargs).item() == pytest.approx(
        paper, rel=1e-6)


def test_norm_pix_uses_the_unbiased_variance_plus_epsilon():
    target = torch.tensor([[[1.0, 2.0, 3.0]]])  # mean 2, unbiased variance 1 (biased would be 2/3)
    pred = torch.zeros_like(target)
    mask = torch.ones(1, 1)
    expected = (1 + 0 + 1) / 3 / (1 + 1e-6)
    assert guided_mae_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-7)


def test_background_patches_keep_a_positive_weight():
    """Equal errors on a foreground (a = 1) and a background (a = 0) patch: the background's
    gradient is smaller by exactly exp(-1/tau), never zero, even at a small tau."""
    target = torch.tensor([[[1.0, -1.0], [1.0, -1.0]]])
    mask = torch.ones(1, 2)
    attn = torch.tensor([[1.0, 0.0]])
    for tau in (1.0, 0.25, 0.1):
        pred = torch.zeros_like(target, requires_grad=True)
        guided_mae_loss(pred, target, mask, attn, tau=tau, norm_pix=False).backward()
        fg, bg = pred.grad[0, 0].abs().sum().item(), pred.grad[0, 1].abs().sum().item()
        assert bg > 0
        assert bg / fg == pytest.approx(math.exp(-1 / tau), rel=1e-5)


def test_bad_settings_are_rejected():
    pred, target, mask, attn = _random_batch()
    with pytest.raises(ValueError, match="weight_norm"):
        guided_mae_loss(pred, target, mask, attn, weight_norm="image")
    with pytest.raises(ValueError, match="tau"):
        guided_mae_loss(pred, target, mask, attn, tau=0.0)


def test_foreground_weight_share():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    attn = torch.tensor([[1.0, 0.0, 1.0]])
    # masked weights: e^(1/0.5) on the foreground, 1 on the background; the visible patch is ignored
    assert foreground_weight_share(mask, attn, tau=0.5).item() == pytest.approx(E**2 / (E**2 + 1), rel=1e-6)


def test_tau_schedule_start_middle_end():
    assert tau_at(0, 100, 1.0, 0.5) == pytest.approx(1.0)
    assert tau_at(50, 100, 1.0, 0.5) == pytest.approx(0.75)
    assert tau_at(25, 100, 1.0, 0.5) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 4)))
    assert tau_at(100, 100, 1.0, 0.5) == pytest.approx(0.5)
    assert [tau_at(s, 100, 1.0, 0.5, kind="constant") for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="tau schedule"):
        tau_at(0, 100, 1.0, 0.5, kind="linear")


def test_lr_schedule_warmup_then_half_cycle_cosine():
    base, warmup, total = 0.4, 10, 110
    assert lr_at(0, total, warmup, base) == 0.0
    assert lr_at(5, total, warmup, base) == pytest.approx(0.2)
    assert lr_at(10, total, warmup, base) == pytest.approx(base)
    assert lr_at(60, total, warmup, base) == pytest.approx(base / 2)
    assert lr_at(35, total, warmup, base) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, total, warmup, base) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(110, total, warmup, base, min_lr=0.01) == pytest.approx(0.01)
    assert lr_at(0, total, 0, base) == pytest.approx(base)


def _reference_loss(pred, target, mask, attn, tau, weight_norm, gamma=1.0):
    """The formulas of docs/METHOD.md#the-guided-loss in float64, weights exp(a/τ) as written."""
    pred, target, mask, attn = pred.double(), target.double(), mask.double(), attn.double()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    e, w = ((pred - target) ** 2).mean(-1), torch.exp(attn / tau)
    if weight_norm == "sample":
        return ((mask * w * e).sum(1) / (mask * w).sum(1)).mean().item()
    if weight_norm == "batch":
        return ((mask * w * e).sum() / (mask * w).sum()).item()
    return (gamma * (mask * w * e).sum() / mask.sum()).item()


@pytest.mark.parametrize("weight_norm", ["batch", "sample"])
@pytest.mark.parametrize("tau", [0.0201, 0.0199, 0.01, 0.002])
def test_small_tau_gives_a_finite_loss_equal_to_the_float64_formula(weight_norm, tau):
    """exp(a/τ) overflows float32 from τ < 1/88.7; the normalised losses stay exact (float32 tolerance), also
    for an image whose map is all background (zeros: its weights are e^(-1/τ) times the largest)."""
    pred, target, mask, attn = _random_batch(seed=3)
    attn[1] = 0
    pred.requires_grad_(True)
    loss = guided_mae_loss(pred, target, mask, attn, tau=tau, weight_norm=weight_norm)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(pred.grad).all()
    assert loss.item() == pytest.approx(_reference_loss(pred.detach(), target, mask, attn, tau, weight_norm),
                                        rel=1e-6)
    assert foreground_weight_share(mask, attn, tau).isfinite()


def test_unnormalised_weights_near_the_float32_limit_keep_their_scale():
    pred, target, mask, attn = _random_batch(seed=4)
    loss = guided_mae_loss(pred, target, mask, attn, tau=0.016, weight_norm="none", gamma=2.0)
    assert loss.item() == pytest.approx(_reference_loss(pred, target, mask, attn, 0.016, "none", 2.0), rel=1e-6)


def test_a_temperature_whose_weights_overflow_is_refused_at_the_door():
    check_temperature(0.01, "batch")
    check_temperature(0.0145, "none")
    with pytest.raises(UserError, match=r"reach 0.001: .* use τ >= 0.0014"):
        check_temperature(0.001, "sample")
    with pytest.raises(UserError, match=r"--weight-norm none: the loss scales with γ·e\^\(1/τ\) = e\^100.* "
                                         r"use τ >= 0.0145, or --weight-norm batch"):
        check_temperature(0.01, "none")
    with pytest.raises(UserError, match="--tau-start/--tau-end reach 0.01 with --weight-norm none"):
        TrainConfig(tau_start=0.01, tau_end=0.01, weight_norm="none", maps="maps.h5")
    with pytest.raises(UserError, match="reach 0.001"):
        TrainConfig(tau_start=1.0, tau_end=0.001, maps="maps.h5")
    TrainConfig(tau_start=0.01, tau_end=0.01, maps="maps.h5")
    TrainConfig(tau_start=0.001, tau_end=0.001)  # no maps: τ is not used
