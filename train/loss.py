"""The attention-guided MAE reconstruction loss (docs/METHOD.md#the-guided-loss).

Per image b and patch i, with m_bi = 1 on masked patches and a_bi the cropped map value:
`e_bi` = mean squared error over the patch's pixels, `w_bi = exp(a_bi / tau)`, and

- `weight_norm="batch"`  (default): L = sum(m w e) / sum(m w)
- `weight_norm="sample"`:           L = mean_b [ sum_i(m w e) / sum_i(m w) ]
- `weight_norm="none"`:             L = gamma * sum(m w e) / sum(m)   (the paper's literal form)

All-equal weights give the plain MAE loss; `a >= 0` keeps every background weight >= 1.
"""
from typing import Callable

import torch

WEIGHT_NORMS = ("batch", "sample", "none")
NORM_PIX_EPS = 1e-6


def patch_weights(attn: torch.Tensor, tau: float) -> torch.Tensor:
    """attn: [B, L] map values in [0, 1] -> w: [B, L] = exp(attn / tau)"""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.exp(attn.float() / tau)


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
    weights = mask if attn is None else mask * patch_weights(attn, tau)
    if weight_norm == "sample":
        return ((weights * per_patch).sum(dim=1) / weights.sum(dim=1)).mean()
    sync = sync_denominator or (lambda denominator: denominator)
    numerator = (weights * per_patch).sum()
    if weight_norm == "batch":
        return numerator / sync(weights.sum().detach())
    return gamma * numerator / sync(mask.sum())


def foreground_weight_share(mask: torch.Tensor, attn: torch.Tensor, tau: float | None,
                            threshold: float = 0.5) -> torch.Tensor:
    """Share of the masked patches' loss weight that lies on map values above `threshold` (0-d tensor,
    left on the device so the caller can fetch it with the loss in one synchronisation).

    mask, attn: [B, L]; tau None: the loss is not weighted by the maps (they only chose the masked
    patches), so the share is that of the masked patches. A diagnostic: 0.5 on uniform weights over a
    half-foreground map; larger as tau shrinks.
    """
    weights = mask.float() if tau is None else mask.float() * patch_weights(attn, tau)
    return (weights * (attn > threshold)).sum() / weights.sum()
