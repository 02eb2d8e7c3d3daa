"""Guided masking, the ablation where the map chooses which patches are masked
(docs/METHOD.md#guided-masking-ablation).

`MaskedAutoencoderViT.random_masking` masks the patches of highest noise, so every rule is only another
noise tensor handed to the unchanged model, with the same number of masked patches. The map is the
image's cropped and flipped `attn`, the one the loss weights by.
"""
import torch

MASKING_RULES = ("random", "attention-high", "attention-sampled")
# The weight of a map value of 0 under attention-sampled. With weight 0 every such patch would get the
# key 0: when the attended area is smaller than the masked share, argsort's tie order (not chance) would
# pick the background patches masked, and a zero map (a failed or constant map) would mask no patch at
# random. The floor samples them, at random, after the attended ones.
SAMPLING_WEIGHT_FLOOR = 1e-3


def masking_noise(rule: str, noise: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
    """The noise that makes `random_masking` mask by `rule`; noise: [B, L] in [0, 1), the sample's
    random draw, attn: [B, L] map values (None is fine for "random") -> noise: [B, L].

    - "random": `noise` itself, MAE's masking.
    - "attention-high" (AttMask's "mask the most attended"): the patches of highest map value are
      masked, ties broken by `noise`, so a constant map masks exactly as "random".
    - "attention-sampled": a weighted sample without replacement, probability rising with the map:
      Efraimidis-Spirakis keys `noise ** (1 / w)`, `w = attn + SAMPLING_WEIGHT_FLOOR`, highest keys
      masked. A single masked patch is patch i with probability w_i / Σw; a constant map orders the
      patches as `noise` does, so it masks exactly as "random".
    """
    if rule == "random":
        return noise
    if rule == "attention-high":
        return _ranks(attn, tiebreak=noise)
    if rule == "attention-sampled":
        return _log_sampling_keys(noise, attn + SAMPLING_WEIGHT_FLOOR)
    raise ValueError(f"masking must be one of {MASKING_RULES}, got {rule!r}")


def _ranks(values: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """values, tiebreak: [B, L] -> each patch's rank by (values, tiebreak) over L: [B, L] in [0, 1)."""
    by_tiebreak = torch.argsort(tiebreak, dim=1, stable=True)
    # a stable sort by value of the tiebreak order leaves equal values in tiebreak order
    order = by_tiebreak.gather(1, torch.argsort(values.gather(1, by_tiebreak), dim=1, stable=True))
    return torch.argsort(order, dim=1).to(tiebreak.dtype) / values.shape[1]


def _log_sampling_keys(noise: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log(noise ** (1 / weights)): [B, L], ordered as the keys themselves, which underflow (u ** 1000 is 0
    in float32 below u = 0.9). In float64 so that distinct noise values stay distinct keys."""
    return noise.double().log() / weights.double()
