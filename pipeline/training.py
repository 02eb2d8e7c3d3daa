"""The training scaffold that pre-training (`agmae.train.engine`) and fine-tuning (`agmae.eval.finetune`) share.

Each stage keeps its own model, data and loss; this module holds what a resumable, data-parallel training needs
around them, defined once:
- `hold_run_dir`: one writer per run directory (a lock held for the run's lifetime);
- `seed_everything`, `seed_epoch`, `rng_state` / `set_rng_state`: the seeding that makes a resume exact;
- `changed_settings`: the identity check of a resume (what a run computes must match, how it executes may change);
- `Optimization`: autocast, the loss scaler, the DDP wrap, gradient accumulation and clipping;
- `LossGuard`: a diverging run stops before it can save a bad state.
Checkpoints are written with `agmae.checkpoint.atomic_save` (temp file, rename), preemption is `agmae.preemption`.
"""
import fcntl
import os
import random
import socket
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from agmae import distributed
from agmae.errors import UserError
from agmae.hardware import autocast_dtype, resolve_precision

LOCK_NAME = ".agmae-writer.lock"
# A new epoch's seed: far apart per epoch and per rank, so no two streams of a run coincide.
EPOCH_SEED_STRIDE, RANK_SEED_STRIDE = 1_000_003, 7_919
# The divergence bound: a step stops the run when its loss is not finite, or when the running mean of the loss
# (an exponential moving average, weight LOSS_EMA_DECAY on the past) exceeds DIVERGENCE_FACTOR times the lowest
# running mean seen since the first GUARD_WARMUP_STEPS steps and the running mean it had then. Relative to the
# lowest, not the current, running mean, so a slow geometric blow-up that the running mean follows is caught too; a
# running mean, so one hard batch is not; over where it started too, so a loss that fell near zero (a fine-tune
# without label smoothing on an easy dataset) may wobble by ten times its tiny lowest without stopping a healthy run.
LOSS_EMA_DECAY, DIVERGENCE_FACTOR, GUARD_WARMUP_STEPS = 0.9, 10.0, 10


@contextmanager
def hold_run_dir(path, env: distributed.DistEnv, command: str):
    """Hold the writer's lock of run directory `path` (created if needed) while inside; a second writer is
    refused with a UserError naming the directory and the process that holds it. Rank 0 takes the lock and
    every rank learns the outcome, so no rank starts alone. The kernel releases the lock when its holder dies,
    so a crashed run never blocks its rerun."""
    path, held, refusal = Path(path), None, ""
    if env.is_main:
        try:
            held = _lock(path, command)
        except UserError as err:
            refusal = str(err)
    if distributed.any_rank(bool(refusal)):
        raise UserError(refusal or f"{path}: rank 0 could not take this run directory's lock (see its log)")
    try:
        yield
    finally:
        if held is not None:
            held.close()  # closing the file releases the lock


def _lock(path: Path, command: str):
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: is a file, not a run directory; pass another --out / --run-dir")
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{path}: {holder} is writing this run directory; wait for it to finish (or stop it), "
                        f"or write to another --out / --run-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{command} (PID {os.getpid()} on {socket.gethostname()})\n")
    lock.flush()
    return lock


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seed every random stream of one epoch on one rank; returns a generator for the loader."""
    value = seed + EPOCH_SEED_STRIDE * (epoch + 1) + RANK_SEED_STRIDE * rank
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    return torch.Generator().manual_seed(value)


def rng_state() -> dict:
    """The process's random streams (torch, CUDA, NumPy, Python) as tensors and plain containers, so a
    checkpoint holding them loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(state["python"])


def changed_settings(recorded: dict, current: dict, execution_settings=frozenset()) -> list[str]:
    """The settings of `current` that a resume may not change (all but `execution_settings`: how a run executes,
    not what it computes) whose value differs from `recorded`, sorted."""
    return [name for name in sorted(set(current) - set(execution_settings)) if recorded.get(name) != current[name]]


def adamw(param_groups, lr: float, betas: tuple) -> torch.optim.AdamW:
    """AdamW over `param_groups`, pre-training's and fine-tuning's, with its `foreach` implementation on every device:
    torch picks it on CUDA; on a CPU it takes the per-parameter loop's step bit for bit, in less time
    (docs/PERFORMANCE.md#training)."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, foreach=True)


class Optimization:
    """Autocast, loss scaling, the DDP wrap and gradient accumulation around one model and its optimizer.

    `wrapped` is the model to call in the forward (DistributedDataParallel under a process group). `backward`
    accumulates `loss / accum_iter`'s gradients, keeping DDP's all-reduce for the micro-batch that closes the
    step, and then clips (with `clip_grad`), steps the optimizer through the scaler and clears the gradients.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: distributed.DistEnv,
                 device: torch.device, precision: str, accum_iter: int = 1, clip_grad: float | None = None):
        self.model, self.optimizer, self.env, self.device = model, optimizer, env, device
        self.accum_iter, self.clip_grad = accum_iter, clip_grad
        self.amp_dtype = autocast_dtype(resolve_precision(precision, device, training=True))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.wrapped = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                        if env.distributed else model)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward(self, loss: torch.Tensor, closes_step: bool, step: bool = True) -> None:
        """Accumulate the gradients of one micro-batch's loss; when it `closes_step`, apply the step (unless
        `step` is False: every image of the step was skipped, so only the gradients are cleared)."""
        sync = nullcontext() if closes_step or not self.env.distributed else self.wrapped.no_sync()
        with sync:
            self.scaler.scale(loss / self.accum_iter).backward()
        if not closes_step:
            return
        if step:
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


class DivergedError(UserError):
    """The loss became non-finite or ran away; the run stopped before saving anything from that state."""


class LossGuard:
    """Stops a run whose loss diverges (see DIVERGENCE_FACTOR) with a DivergedError naming where, the last good
    checkpoint and `fix`. Its state travels in the checkpoint, so a resumed run judges as the uninterrupted one."""

    def __init__(self, checkpoint: Path, fix: str):
        self.checkpoint, self.fix = checkpoint, fix
        self.running, self.lowest, self.start, self.seen = None, None, None, 0

    def check(self, loss: float, where: str) -> None:
        """`loss`: the step's value, the same on every rank; `where`: e.g. 'epoch 2, step 13'."""
        if not np.isfinite(loss):
            self._stop(f"loss is {loss} at {where}")
        self.running = loss if self.running is None else LOSS_EMA_DECAY * self.running + (1 - LOSS_EMA_DECAY) * loss
        self.seen += 1
        if self.seen < GUARD_WARMUP_STEPS:
            return
        if self.lowest is not None and self.running > max(DIVERGENCE_FACTOR * self.lowest, self.start):
            self._stop(f"loss is diverging at {where}: its running mean {self.running:.4g} is over "
                       f"{DIVERGENCE_FACTOR:g}x its lowest, {self.lowest:.4g}, and over its start, {self.start:.4g} "
                       f"(this step's loss {loss:.4g})")
        self.start = self.running if self.start is None else self.start
        self.lowest = self.running if self.lowest is None else min(self.lowest, self.running)

    def _stop(self, what: str) -> None:
        raise DivergedError(f"{what}; stopped without saving, {self.checkpoint} is the last good state; {self.fix}")

    def state_dict(self) -> dict:
        return {"running": self.running, "lowest": self.lowest, "start": self.start, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.running, self.lowest, self.seen = state["running"], state["lowest"], state["seen"]
        self.start = state.get("start", self.lowest)  # a checkpoint from before `start` was kept: the lowest bounds
