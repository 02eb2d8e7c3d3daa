"""Per-iteration schedules: learning rate (linear warm-up, then half-cycle cosine) and the loss temperature tau."""
import math

TAU_SCHEDULES = ("cosine", "constant")


def half_cycle_cosine(progress: float, start: float, end: float) -> float:
    """`start` at progress 0, `end` at progress 1, cosine in between."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def tau_at(step: int, total_steps: int, start: float, end: float, kind: str = "cosine") -> float:
    """tau(t) = end + (start - end)(1 + cos(pi t / T)) / 2, or `start` throughout when kind='constant'."""
    if kind not in TAU_SCHEDULES:
        raise ValueError(f"tau schedule must be one of {TAU_SCHEDULES}, got {kind!r}")
    if kind == "constant":
        return start
    return half_cycle_cosine(min(step, total_steps) / max(total_steps, 1), start, end)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    return half_cycle_cosine(min(step - warmup_steps, decay_steps) / decay_steps, base_lr, min_lr)
