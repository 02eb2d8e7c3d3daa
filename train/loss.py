"""The attention-guided MAE reconstruction loss (docs/METHOD.md#the-guided-loss).

Per image b and patch i, with m_bi = 1 on masked patches and a_bi the cropped map value:
`e_bi` = mean squared error over the patch's pixels, `w_bi = exp(a_bi / tau)`, and

- `weight_norm="batch"`  (default): L = sum(m w e) / sum(m w)
- `weight_norm="sample"`:           L = mean_b [ sum_i(m w e) / sum_i(m w) ]
- `weight_norm="none"`:             L = gamma * sum(m w e) / sum(m)   (the paper's literal form)

All-equal weights give the plain MAE loss; `a >= 0` keeps every background weight >= 1.

The weights reach e^(1/tau), which overflows float32 below tau = 1/88.7; they are computed stably at any
tau the door lets through (`patch_weights`, `check_temperature`).
"""
import math
from typing import Callable

import torch

from agmae.errors import UserError

WEIGHT_NORMS = ("batch", "sample", "none")
NORM_PIX_EPS = 1e-6
# Up to this exponent 1/tau, exp(a/tau) and its sums over a batch stay far inside float32 and are used as they
# are; beyond it they are shifted by the map's upper bound 1 and computed in float64 (patch_weights).
PLAIN_EXPONENT_MAX = 50.0
# exp(-1/tau), the smallest shifted weight, stays a normal float64 up to this exponent.
SHIFTED_EXPONENT_MAX = 700.0
# Under --weight-norm none the loss itself scales with gamma * e^(1/tau): refused above this, which leaves float32
# eight orders of magnitude for the errors and their gradients.
UNNORMALISED_WEIGHT_MAX = 1e30


def check_temperature(tau_min: float, weight_norm: str, gamma: float = 1.0) -> None:
    """Refuse (UserError) a smallest temperature `tau_min` whose weights cannot be represented: below
    1/SHIFTED_EXPONENT_MAX for every normalisation; under `none`, where gamma * e^(1/tau) exceeds
    UNNORMALISED_WEIGHT_MAX (the loss is that large)."""
    if tau_min < 1 / SHIFTED_EXPONENT_MAX:
        raise UserError(f"--tau-start/--tau-end reach {tau_min:g}: the loss weights exp(a/τ) then span "
                        f"e^{1 / tau_min:.0f}, beyond float64; use τ >= {1 / SHIFTED_EXPONENT_MAX:.4f}")
    if weight_norm == "none" and math.log(gamma) + 1 / tau_min > math.log(UNNORMALISED_WEIGHT_MAX):
        smallest = 1 / (math.log(UNNORMALISED_WEIGHT_MAX) - math.log(gamma))
        raise UserError(f"--tau-start/--tau-end reach {tau_min:g} with --weight-norm none: the loss scales with "
                        f"γ·e^(1/τ) = e^{math.log(gamma) + 1 / tau_min:.0f}, beyond float32 with room for its "
                        f"errors; use τ >= {smallest:.4f}, or --weight-norm batch (normalised at any τ)")


def patch_weights(attn: torch.Tensor, tau: float) -> tuple[torch.Tensor, float]:
    """attn: [B, L] map values in [0, 1] -> (w [B, L], log_scale) with exp(attn / tau) = w * e^log_scale.

    While 1/tau <= PLAIN_EXPONENT_MAX: w = exp(attn / tau) in float32, log_scale 0. Beyond: w =
    exp((attn - 1) / tau) in float64, in [e^(-1/tau), 1], and log_scale = 1/tau; the same factor on every
    image and rank, so the normalised losses cancel it exactly."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if 1 / tau <= PLAIN_EXPONENT_MAX:
        return torch.exp(attn.float() / tau), 0.0
    return torch.exp((attn.double() - 1) / tau), 1 / tau


def guided_mae_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    attn: torch.Tensor | None = None,
    tau: float = 1.0,
    norm_pix: bool = True,
    weight_norm: str = "batch",
    gamma: float = 1.0,
    sync_denominator: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scalar loss. pred, target: [B, L, p*p*3] (target = raw patches, normalised here when
    `norm_pix`), mask: [B, L] (1 = masked), attn: [B, L] or None (None = vanilla MAE).

    `sync_denominator` makes the batch-wide denominators of `batch` and `none` global under data
    parallelism: it receives the local denominator and must return its mean over the ranks
    (detached), so that averaging the ranks' gradients yields the gradient of the global-batch loss.
    """
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    weights, log_scale = (mask, 0.0) if attn is None else patch_weights(attn, tau)
    if attn is not None:
        weights = mask.to(weights.dtype) * weights
        per_patch = per_patch.to(weights.dtype)
    if weight_norm == "sample":
        return ((weights * per_patch).sum(dim=1) / weights.sum(dim=1)).mean().float()
    sync = sync_denominator or (lambda denominator: denominator)
    numerator = (weights * per_patch).sum()
    if weight_norm == "batch":
        return (numerator / sync(weights.sum().detach())).float()
    return (gamma * math.exp(log_scale) * numerator / sync(mask.sum().to(numerator.dtype))).float()


def foreground_weight_share(mask: torch.Tensor, attn: torch.Tensor, tau: float | None,
                            threshold: float = 0.5) -> torch.Tensor:
    """Share of the masked patches' loss weight that lies on map values above `threshold` (0-d tensor,
    left on the device so the caller can fetch it with the loss in one synchronisation).

    mask, attn: [B, L]; tau None: the loss is not weighted by the maps (they only chose the masked
    patches), so the share is that of the masked patches. A diagnostic: 0.5 on uniform weights over a
    half-foreground map; larger as tau shrinks.
    """
    weights = mask.float() if tau is None else mask.float() * patch_weights(attn, tau)[0]
    return ((weights * (attn > threshold)).sum() / weights.sum()).float()
