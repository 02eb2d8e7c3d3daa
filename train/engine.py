"""The pre-training loop: guided (or vanilla) MAE, single process or data-parallel, resumable.

Determinism: model initialisation follows `seed`; every per-sample random choice (crop, flip,
masking noise) follows (seed, epoch, index) (train/dataset.py); the sampler's order follows
(seed, epoch). A run resumed from a checkpoint therefore continues exactly as the uninterrupted
run would have, and N ranks with batch B reproduce one process with batch N*B. Checkpoints are
written at epoch ends, and mid-epoch when the run is preempted (SIGTERM, SIGUSR1: `agmae.preemption`),
with the sampler's position, so the resumed run continues mid-epoch.

The scaffold around the loop (the run directory's lock, seeding, the resume's identity check, AMP,
DDP, accumulation, the divergence guard) is `agmae.training`, shared with fine-tuning.
"""
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import agmae
from agmae.data.folder import scan, unreadable_images
from agmae.data.transforms import normalise_images
from agmae import distributed, preemption, training
from agmae.checkpoint import atomic_save, atomic_write, atomic_write_text, load_checkpoint, weights_sha256
from agmae.distributed import mean_over_ranks, sum_over_ranks
from agmae.paths import last_checkpoint
from agmae.train.dataset import CropMapsCollate, EpochSampler, GuidedMAEDataset, check_store
from agmae.train.loss import foreground_weight_share, guided_mae_loss
from agmae.train.config import RECIPES, TrainConfig
from agmae.train.masking import masking_noise
from agmae.train.model import MaskedAutoencoderViT, create_model
from agmae.train.schedules import lr_at, tau_at
from agmae.errors import UserError
from agmae.training import DivergedError as NonFiniteLossError

ADAMW_BETAS = (0.9, 0.95)
LR_REFERENCE_BATCH = 256
FOREGROUND_THRESHOLD = 0.5
# On a CPU, torch's fused attention pays from this many patches (benchmarks/train_bench.py, 2 threads: the
# step with it on / off 1.030 for the demo MAE's 64 patches, 0.925 for base/16's 196).
FUSED_ATTN_MIN_PATCHES = 128
# Settings that change how a run executes, not what it computes (the global batch is compared as
# effective_batch, so the ranks may change between kills; the data, the maps and the starting weights by their
# fingerprints; the requested --precision as the autocast dtype it resolved to, amp_dtype, so `native` and `bf16`
# are one run).
# Resuming with any other setting changed is refused, so a run's record always says what trained it.
EXECUTION_SETTINGS = frozenset({"data", "train_split", "out", "maps", "init_from", "resume", "workers", "save_every",
                                "keep_every", "verify_images", "max_failures", "device", "compile", "batch_size",
                                "accum_iter", "world_size", "precision", "version"})


class ResumableSampler(EpochSampler):
    """An EpochSampler whose epoch may start at a sample position: a run resumed mid-epoch skips what it trained
    without loading it (every sample is a function of (seed, epoch, index), whoever loads it)."""

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


def _fit_warmup(cfg: TrainConfig, given: bool) -> tuple[TrainConfig, str | None]:
    """A recipe's warm-up (--warmup-epochs not given) that outlasts a shorter run keeps the recipe's share of the
    run, e.g. MAE's 40 of 800 epochs -> 0.05 of 1; returns the config and a line saying so (None when unchanged).
    A given warm-up longer than the run is refused (TrainConfig.check_run)."""
    if given or cfg.warmup_epochs <= cfg.epochs:
        return cfg, None
    recipe = RECIPES["paper"]
    fitted = round(cfg.epochs * recipe["warmup_epochs"] / recipe["epochs"], 4)
    return replace(cfg, warmup_epochs=fitted), (
        f"--warmup-epochs {fitted:g}: the recipe's {cfg.warmup_epochs:g} would outlast --epochs {cfg.epochs}, so the "
        f"run warms up for the recipe's share of it (pass --warmup-epochs to choose)")


def _describe(store_identity: dict | None) -> str:
    if store_identity is None:
        return "no maps, vanilla MAE"
    return ", ".join(f"{name} {store_identity[name]}" for name in ("method", "backbone", "grid", "image_size"))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class Trainer:
    """One training run; `run()` trains from the last checkpoint (if any) to `cfg.epochs`."""

    def __init__(self, cfg: TrainConfig, env: distributed.DistEnv, device: torch.device):
        cfg, self.warmup_note = _fit_warmup(cfg.resolved(), given=cfg.warmup_epochs is not None)
        self.cfg, self.env, self.device = cfg, env, device
        self.run_dir = Path(cfg.out)
        training.seed_everything(cfg.seed)
        self.images = cfg.image_folder()
        self.index = scan(self.images)
        self.unreadable = self._unreadable_images()
        self.guided = cfg.maps is not None
        # --no-weight-loss: the maps choose the masked patches and stay out of the loss
        self.weighted = self.guided and cfg.weight_loss
        self.store_identity = None
        self.map_counts = None
        if self.guided:
            store, self.map_counts = check_store(cfg.maps, self.index, cfg.require_maps, cfg.allow_missing_maps)
            self.store_identity = store.identity()

        self.model: MaskedAutoencoderViT = create_model(cfg.model, **cfg.model_overrides()).to(device)
        cfg.check_run(self.model.num_patches)
        # the weights it starts from are compared by their fingerprint, as the maps are, so a resumed run with
        # another --init-from is refused and the file may move
        self.init_weights = self._init_from(Path(cfg.init_from)) if cfg.init_from else None
        fused = device.type == "cuda" or self.model.num_patches >= FUSED_ATTN_MIN_PATCHES
        self.model.set_fused_attn(fused if cfg.fused_attn is None else cfg.fused_attn)
        input_size = self.model.encoder_kwargs["img_size"]
        positions = [i for i in range(len(self.index)) if i not in self.unreadable]
        dataset = GuidedMAEDataset(self.index, input_size, self.model.num_patches, cfg.seed, cfg.maps, positions)
        self.sampler = ResumableSampler(DistributedSampler(
            dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=True))
        self.loader = DataLoader(
            dataset, batch_size=cfg.batch_size, sampler=self.sampler, num_workers=cfg.workers,
            collate_fn=CropMapsCollate(self.model.grid_size), pin_memory=device.type == "cuda", drop_last=True,
            persistent_workers=cfg.workers > 0,
        )
        self.steps_per_epoch = len(self.loader) // cfg.accum_iter
        if self.steps_per_epoch == 0:
            raise UserError(
                f"{self.images}: {len(self.sampler)} images per process make no full step of "
                f"--batch-size {cfg.batch_size} x --accum-iter {cfg.accum_iter}; lower them"
            )
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.effective_batch = cfg.batch_size * cfg.accum_iter * env.world_size
        self.lr = cfg.blr * self.effective_batch / LR_REFERENCE_BATCH

        self.optimizer = training.adamw(
            param_groups_weight_decay(self.model, cfg.weight_decay, no_weight_decay_list=self.model.no_weight_decay()),
            self.lr, ADAMW_BETAS)
        self.optimization = training.Optimization(self.model, self.optimizer, env, device, cfg.precision,
                                                  cfg.accum_iter, cfg.clip_grad)
        self.amp_dtype = self.optimization.amp_dtype
        self.config = {
            **asdict(cfg),
            "input_size": input_size,
            "encoder": self.model.encoder_kwargs,
            "keys_sha256": self.index.keys_sha256,
            "store_identity": self.store_identity,
            "init_weights": self.init_weights,
            "world_size": env.world_size,
            "effective_batch": self.effective_batch,
            "lr": self.lr,
            "amp_dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32",
            "version": agmae.__version__,
        }
        self.guard = training.LossGuard(self.checkpoint_path, "lower --blr or set --clip-grad")
        self.start_epoch, self.step, self.epoch = 0, 0, 0
        # a run preempted mid-epoch resumes at micro-batch start_position of start_epoch, with its running totals
        self.start_position, self.start_totals = 0, None
        self.window_weight, self.preempted, self.saved_epoch = 0.0, False, None
        self.resumed_from = self._resume()
        self.ddp = self.optimization.wrapped
        if cfg.compile:  # compiled around DDP, so that its gradient buckets split the graph (DDPOptimizer)
            self.ddp = torch.compile(self.ddp)

    def _unreadable_images(self) -> dict:
        """{index: reason} of the training images that do not decode, skipped in training; more than
        --max-failures of them is an error."""
        if not self.cfg.verify_images:
            return {}
        if not self.env.is_main:  # rank 0 decodes, the others then read its cache
            distributed.barrier()
        unreadable = unreadable_images(self.index, progress=self.env.is_main)
        if self.env.is_main:
            distributed.barrier()
        if len(unreadable) > self.cfg.max_failures * len(self.index):
            first = ", ".join(self.index.keys[i] for i in list(unreadable)[:3])
            raise UserError(f"{self.images}: {len(unreadable)} of {len(self.index)} images cannot be read "
                             f"(e.g. {first}: {next(iter(unreadable.values()))}), more than --max-failures "
                             f"{self.cfg.max_failures:g}; fix or remove them, or raise --max-failures")
        return unreadable

    @property
    def checkpoint_path(self) -> Path:
        return last_checkpoint(self.run_dir)

    def _init_from(self, path: Path) -> str:
        """Load the MAE weights of checkpoint `path` into the model; return their fingerprint."""
        loaded = load_checkpoint(path)
        state = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path}: holds no MAE weights (no 'model' entry); --init-from takes an agmae-train "
                             f"checkpoint (RUN_DIR/checkpoint-last.pth), not an exported encoder")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
            raise UserError(f"{path}: not the weights of this run's MAE ({first[:200]}); pass the model options "
                             f"it was trained with (its run's config.json) or another --init-from") from None
        return weights_sha256(state)

    def _resume(self) -> Path | None:
        path = Path(self.cfg.resume) if self.cfg.resume else self.checkpoint_path
        if not self.cfg.resume and not path.is_file():
            return None
        state = load_checkpoint(path)
        self._check_same_run(path, state["config"])
        self.model.load_state_dict(state["model"])
        self.optimization.load_state_dict(state)
        self.start_epoch, self.step = state["epoch"], state["step"]
        # the epoch's samples trained, over all ranks: a whole number of optimizer steps of effective_batch (which
        # a resume keeps), so of this run's micro-batches too, whatever its ranks and batch size
        self.start_position = state["sampler"].get("samples", 0) // (self.cfg.batch_size * self.env.world_size)
        self.start_totals = state.get("epoch_totals")
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        training.set_rng_state(state["rng"])
        return path

    def _check_same_run(self, path: Path, recorded: dict) -> None:
        """Refuse to resume a checkpoint trained with another setting, naming it and both values."""
        theirs, ours = recorded.get("store_identity"), self.config["store_identity"]
        if theirs != ours:
            raise UserError(
                f"{path}: was trained with the maps of {recorded.get('maps')} ({_describe(theirs)}), this run has "
                f"{self.cfg.maps} ({_describe(ours)}); resume with the same store or write to another --out")
        if recorded.get("init_weights") != self.init_weights:
            raise UserError(
                f"{path}: started from the weights of {recorded.get('init_from') or 'its own initialisation'}, this "
                f"run from {self.cfg.init_from or 'its own initialisation'} (other weights); resume with the same "
                f"--init-from or write to another --out")
        for name in training.changed_settings(recorded, self.config, EXECUTION_SETTINGS)[:1]:
            raise UserError(
                f"{path}: was trained with --{name.replace('_', '-')} {recorded.get(name)!r}, this run has "
                f"{self.config[name]!r}; resume with the settings it was trained with, or train the new "
                f"settings into another --out")

    def _save(self, epoch: int, position: int = 0, totals: dict | None = None) -> None:
        """Save after `epoch` whole epochs and `position` micro-batches of the next (with their running totals)."""
        atomic_save(
            {
                "model": self.model.state_dict(),
                **self.optimization.state_dict(),
                "epoch": epoch,
                "step": self.step,
                "rng": training.rng_state(),
                "sampler": {"epoch": epoch, "seed": self.cfg.seed,
                            "samples": position * self.cfg.batch_size * self.env.world_size},
                "epoch_totals": totals,
                "guard": self.guard.state_dict(),
                "config": self.config,
                "version": agmae.__version__,
            },
            self.checkpoint_path,
        )
        self.saved_epoch = None if position else epoch

    def _preempt(self, epoch: int, position: int = 0, totals: dict | None = None):
        """Save a resumable state (unless this epoch's end was just saved) and raise Preempted on every rank."""
        where = f"epoch {epoch + 1}, micro-batch {position}" if position else f"the end of epoch {epoch}"
        message = (f"{preemption.signal_name() or 'preempted'}: saved {self.checkpoint_path} at {where}; run the "
                   f"same command to resume (exit code {preemption.PREEMPTED})")
        if self.env.is_main:
            if position or self.saved_epoch != epoch:
                self._save(epoch, position, totals)
            tqdm.write(message)
        distributed.barrier()
        raise preemption.Preempted(message)

    def _kept_path(self, epoch: int) -> Path | None:
        """checkpoint-<epoch>.pth where `--keep-every` keeps this epoch, else None."""
        keep = self.cfg.keep_every > 0 and epoch % self.cfg.keep_every == 0
        return self.run_dir / f"checkpoint-{epoch}.pth" if keep else None

    def _keep(self, kept: Path) -> None:
        """Keep checkpoint-last.pth as `kept`: a hard link where the file system allows (the next save
        replaces checkpoint-last.pth by rename, so the link keeps this epoch's file), else an atomic copy.
        Either way `kept` appears whole or not at all."""
        kept.unlink(missing_ok=True)
        try:
            os.link(self.checkpoint_path, kept)
        except OSError:
            with open(self.checkpoint_path, "rb") as source:
                atomic_write(kept, lambda f: shutil.copyfileobj(source, f))

    def _start_logs(self) -> None:
        """config.json, and metrics.jsonl cut back to the epochs the resumed checkpoint holds
        (a run killed after logging an epoch but before saving it re-logs that epoch)."""
        atomic_write_text(json.dumps(self.config, indent=2) + "\n", self.run_dir / "config.json")
        metrics = self.run_dir / "metrics.jsonl"
        kept = []
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= self.start_epoch]
        atomic_write_text("".join(line + "\n" for line in kept), metrics)

    def _log_epoch(self, record: dict, tensorboard) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if tensorboard is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("epoch", "step"):
                    tensorboard.add_scalar(f"epoch/{name}", value, record["epoch"])

    def run(self) -> dict | None:
        """Train to `cfg.epochs`; return the last epoch's metrics (None when nothing was left to do)."""
        tensorboard = None
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._start_logs()
            tensorboard = _tensorboard(self.run_dir)
            if self.guided and (self.map_counts["failed"] or self.map_counts["pending"]):
                tqdm.write(f"{self.cfg.maps}: {self.map_counts['failed']} maps failed and {self.map_counts['pending']} "
                           f"are pending of {len(self.index)}; those images train unguided (uniform weights, "
                           f"random masking; the unreadable among them are skipped)")
            if self.unreadable:
                first = ", ".join(f"{self.index.keys[i]} ({reason})" for i, reason in list(self.unreadable.items())[:3])
                tqdm.write(f"{len(self.unreadable)} of {len(self.index)} images cannot be read and are skipped: {first}")
            if self.warmup_note:
                tqdm.write(self.warmup_note)
            if self.init_weights and not self.resumed_from:
                tqdm.write(f"started from the weights of {self.cfg.init_from}")
            if self.resumed_from:
                within = f", micro-batch {self.start_position}" if self.start_position else ""
                tqdm.write(f"resumed from {self.resumed_from} at epoch {self.start_epoch}{within}")
                # a run killed between saving a kept epoch and keeping it resumes from exactly that file
                missed = self._kept_path(self.start_epoch)
                if (missed is not None and not missed.exists() and self.resumed_from == self.checkpoint_path
                        and not self.start_position):
                    self._keep(missed)
        record = None
        try:
            with preemption.notice():
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    record = self._train_one_epoch(epoch, tensorboard)
                    if self.env.is_main:
                        self._log_epoch(record, tensorboard)
                        tqdm.write(f"epoch {record['epoch']}/{self.cfg.epochs}: loss {record['loss']:.4f}, "
                                   f"lr {record['lr']:.2e}, {record['imgs_per_s']:.0f} imgs/s")
                        kept = self._kept_path(epoch + 1)
                        if kept or (epoch + 1) % self.cfg.save_every == 0 or epoch + 1 == self.cfg.epochs:
                            self._save(epoch + 1)
                        if kept:
                            self._keep(kept)
                    distributed.barrier()
                    if self.preempted and epoch + 1 < self.cfg.epochs:
                        self._preempt(epoch + 1)
        finally:
            if tensorboard is not None:
                tensorboard.close()
        return record

    def _train_one_epoch(self, epoch: int, tensorboard) -> dict:
        cfg = self.cfg
        self.ddp.train()
        self.epoch = epoch
        start = self.start_position if epoch == self.start_epoch else 0
        totals = self.start_totals if start else {"loss": 0.0, "fg_weight_share": 0.0, "trained": 0, "images": 0,
                                                  "missing_maps": 0, "unreadable": [], "seconds": 0.0}
        self.sampler.set_epoch(epoch, start * cfg.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        micro_steps = self.steps_per_epoch * cfg.accum_iter
        started = time.perf_counter() - totals["seconds"]
        progress = tqdm(self.loader, initial=start, total=micro_steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                        disable=not self.env.is_main, leave=False, dynamic_ncols=True)
        for micro_step, batch in enumerate(progress, start):
            if micro_step == micro_steps:
                break
            totals["unreadable"] += batch["unreadable"]
            if micro_step % cfg.accum_iter == 0:
                lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.lr)
                tau = tau_at(self.step, self.total_steps, cfg.tau_start, cfg.tau_end, cfg.tau_schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            closes_step = (micro_step + 1) % cfg.accum_iter == 0
            loss_value, share, trained = self.train_step(batch, tau, closes_step)
            if closes_step and tensorboard is not None:
                scalars = {"loss": loss_value, "lr": lr, **({"tau": tau} if self.weighted else {})}
                for name, value in scalars.items():
                    tensorboard.add_scalar(f"train/{name}", value, self.step)
            if trained:  # the mean loss counts the micro-steps that trained an image on some rank
                totals["loss"] += loss_value
                totals["fg_weight_share"] += share
                totals["trained"] += 1
            if "img" in batch:
                totals["images"] += batch["img"].shape[0]
                if self.guided:
                    totals["missing_maps"] += int((~batch["has_map"]).sum())
            imgs_per_s = totals["images"] * self.env.world_size / (time.perf_counter() - started)
            shown = dict(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", imgs_s=f"{imgs_per_s:.0f}")
            if self.weighted:
                shown["tau"] = f"{tau:.3f}"
            progress.set_postfix(shown, refresh=False)
            if closes_step and self.preempted and micro_step + 1 < micro_steps:
                totals["seconds"] = time.perf_counter() - started
                self._preempt(epoch, micro_step + 1, totals)
        elapsed = time.perf_counter() - started
        images = sum_over_ranks(totals["images"])
        trained = max(totals["trained"], 1)
        return {
            "epoch": epoch + 1,
            "step": self.step,
            "loss": totals["loss"] / trained,
            "lr": lr,
            "tau": tau if self.weighted else None,
            "fg_weight_share": totals["fg_weight_share"] / trained if self.guided else None,
            "imgs_per_s": images / elapsed,
            "missing_maps": int(sum_over_ranks(totals["missing_maps"])),
            "unreadable_skipped": len(self.unreadable) + int(sum_over_ranks(len(totals["unreadable"]))),
            "unreadable_examples": [self.index.keys[i] for i in list(self.unreadable)[:3]] + totals["unreadable"][:3],
        }

    def train_step(self, batch: dict, tau: float, closes_step: bool = True) -> tuple[float, float, bool]:
        """Forward and backward one micro-batch; step the optimizer when it `closes_step`.

        A micro-batch whose images all became unreadable runs a stand-in batch with loss weight 0, so every
        rank takes part in the same collectives (the loss's denominator, DDP's all-reduce); a step in which no
        rank trained an image clears its gradients without moving the weights, and still counts, so the lr
        and τ stay bound to the run's progress. Returns the loss (mean over ranks), the foreground share of
        the loss weight, and whether any rank trained an image; the ranks' agreement on a preemption request
        is left in `self.preempted`."""
        weight = 1.0 if "img" in batch else 0.0
        loss, share = self._forward(batch if weight else self._stand_in(), tau, weight)
        # one device synchronisation (and one all-reduce) fetches every number the ranks must agree on
        flags = loss.new_tensor([weight, float(preemption.requested())])
        loss_value, share_sum, trained, preempt = mean_over_ranks(
            torch.cat([torch.stack([loss.detach(), share * weight]), flags])).tolist()
        share_value = share_sum / trained if trained else 0.0
        self.preempted = preempt > 0
        if trained:
            self.guard.check(loss_value, f"epoch {self.epoch + 1}, step {self.step}")
        self.window_weight += trained
        self.optimization.backward(loss, closes_step, step=self.window_weight > 0)
        if closes_step:
            self.step += 1
            self.window_weight = 0.0
        return loss_value, share_value, trained > 0

    def _stand_in(self) -> dict:
        """Zeros in the shapes of a training batch (uint8 images, masking noise, maps): a forward and backward
        for a rank whose micro-batch was lost."""
        size, patches, count = self.model.encoder_kwargs["img_size"], self.model.num_patches, self.cfg.batch_size
        batch = {"img": torch.zeros(count, 3, size, size, dtype=torch.uint8), "noise": torch.zeros(count, patches)}
        if self.guided:
            batch["attn"] = torch.zeros(count, patches)
        return batch

    def _forward(self, batch: dict, tau: float, weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one micro-batch, and the share of its loss weight on the foreground (0 without maps).
        `weight` 0: a stand-in batch, whose loss is 0 and adds nothing to the ranks' common denominator."""
        cfg, device = self.cfg, self.device
        # every copy non-blocking: one blocking copy would wait for the previous step's backward
        # and stop the CPU from queueing this step's kernels meanwhile
        imgs, noise = (batch[name].to(device, non_blocking=True) for name in ("img", "noise"))
        imgs = normalise_images(imgs)  # the loader's uint8 crops, normalised here on the device
        attn = batch["attn"].to(device, non_blocking=True) if self.guided else None
        noise = masking_noise(cfg.masking, noise, attn)
        with self.optimization.autocast():
            pred, mask = self.ddp(imgs, cfg.mask_ratio, noise)
        loss = guided_mae_loss(
            pred, self.model.patchify(imgs), mask, attn if self.weighted else None, tau=tau,
            weight_norm=cfg.weight_norm, gamma=cfg.gamma,
            sync_denominator=(lambda local: mean_over_ranks(local * weight)) if self.env.distributed else None,
        )
        if not weight:  # zero, yet a function of every parameter, so the backward reaches them all
            loss = pred.float().sum() * 0
        share = (foreground_weight_share(mask, attn, tau if self.weighted else None, FOREGROUND_THRESHOLD)
                 if self.guided else torch.zeros_like(loss))
        return loss, share


def train(cfg: TrainConfig) -> dict | None:
    """Join the launcher's process group (if any), train holding the run directory's lock, leave the group;
    returns the last epoch's metrics."""
    env, device = distributed.init(cfg.device)
    try:
        with training.hold_run_dir(cfg.resolved().out, env, "agmae-train"):
            return Trainer(cfg, env, device).run()
    finally:
        distributed.shutdown()
