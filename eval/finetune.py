"""End-to-end fine-tuning of a pre-trained encoder: MAE's protocol (docs/METHOD.md#finetune).

Every part is timm's or torch's, put together as MAE's `main_finetune.py` does:
- the classifier: timm's `VisionTransformer` holding the encoder's weights, with global average pooling
  of the patch tokens and a fresh `fc_norm` (MAE's `--global_pool`; the pre-training's final norm is
  left out, as MAE does), drop path, a linear head initialised N(0, 2e-5);
- layer-wise lr decay: timm's `param_groups_layer_decay` (the head at scale 1, block i at
  decay^(depth - i), the patch embedding, class token and positions at decay^(depth + 1)), no weight
  decay on 1-D parameters and tokens; AdamW;
- the lr: per optimiser step, linear warm-up then half-cycle cosine to `min_lr` (timm
  `CosineLRScheduler`, which applies each group's `lr_scale`); lr = blr × effective batch / 256;
- the data: RandomResizedCrop, flip, RandAugment and random erasing (timm `create_transform`),
  Mixup/CutMix with label smoothing (timm `Mixup`, `SoftTargetCrossEntropy`); the eval view of the
  other protocols for testing;
- gradient accumulation, autocast (bf16, or fp16 with loss scaling, on CUDA; bf16 on a CPU that has it
  natively), DistributedDataParallel under torchrun/srun.

Resume is exact: every random stream of an epoch (the sampler's order, the loader workers' seeds, Mixup's
numpy draws, augmentations and drop path in the main process) is seeded from (seed, epoch, rank) when the
epoch starts, so an epoch's checkpoint needs only the weights, the optimiser, the loss scaler and the epoch;
a kill loses at most the epoch in progress. A preempted run (SIGTERM, SIGUSR1: `agmae.preemption`) saves at
the next step with its position in the epoch and the main process's random streams; the resumed run replays
the loader up to that position (loading, not training: the workers' augmentation streams then continue as
they would have) and goes on from there. The scaffold (lock, seeding, AMP, DDP, accumulation, the divergence
guard) is `agmae.training`, shared with pre-training.
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from agmae import distributed, preemption, training
from agmae.checkpoint import atomic_save, file_sha256, load_checkpoint, load_encoder
from agmae.data.folder import ImageFolderIndex
from agmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from agmae.eval.features import FolderImages, embed_folder
from agmae.eval.knn import topk_accuracy
from agmae.eval.linear import build_scheduler
from agmae.options import (POSITIVE_INT, SHARE, device_option, max_failures_option, option, precision_option,
                           seed_option, validate, verify_images_option, workers_option)
from agmae.errors import UserError

HEAD_INIT_STD = 2e-5  # MAE's: the fresh head starts near zero, so the first steps do not wreck the encoder
ADAMW_BETAS = (0.9, 0.999)

# MAE's ImageNet-1k recipe for ViT-B/16 (FINETUNE.md: 32 images × 4 accumulation steps × 8 GPUs =
# 1024 per step), and a short recipe that fits the demo dataset on a CPU.
RECIPES = {
    "imagenet": dict(epochs=100, warmup_epochs=5.0, batch_size=32, accum_iter=4, blr=5e-4, min_lr=1e-6,
                     layer_decay=0.65, weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1,
                     randaugment="rand-m9-mstd0.5-inc1", reprob=0.25),
    "demo": dict(epochs=10, warmup_epochs=1.0, batch_size=128, accum_iter=1, blr=1e-3, min_lr=1e-6,
                 layer_decay=0.75, weight_decay=0.05, drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1,
                 randaugment="rand-m9-mstd0.5-inc1", reprob=0.25),
}


NON_NEGATIVE = click.FloatRange(min=0)


# How a run executes, not what it computes: the options a resume may change.
EXECUTION_SETTINGS = frozenset({"workers", "device", "verify_images", "max_failures"})


def _recipe(name: str, text: str) -> str:
    return f"{text} [default: {RECIPES['demo'][name]} on the demo dataset, {RECIPES['imagenet'][name]} otherwise]"


@dataclass
class FinetuneOptions:
    """Every fine-tuning option, defined once; None takes the recipe's value (`resolved`). The fields not in
    EXECUTION_SETTINGS are what a run computes: a resume must match them."""

    epochs: int | None = option(None, _recipe("epochs", "Fine-tuning epochs."), type=POSITIVE_INT)
    warmup_epochs: float | None = option(None, _recipe("warmup_epochs", "Linear lr warm-up epochs."),
                                         type=NON_NEGATIVE)
    batch_size: int | None = option(None, _recipe("batch_size", "Images per step per rank (before "
                                                                "accumulation); even when mixing."),
                                    type=POSITIVE_INT)
    accum_iter: int | None = option(None, _recipe("accum_iter", "Gradient accumulation: batches per optimiser "
                                                                "step."), type=POSITIVE_INT)
    blr: float | None = option(None, _recipe("blr", "Base lr: lr = blr × effective batch / 256."),
                               type=click.FloatRange(min=0, min_open=True))
    min_lr: float | None = option(None, _recipe("min_lr", "The cosine schedule's final lr."), type=NON_NEGATIVE)
    layer_decay: float | None = option(None, _recipe("layer_decay", "Layer-wise lr decay: block i of D trains at "
                                                                    "lr × decay^(D - i)."),
                                       type=click.FloatRange(0, 1, min_open=True))
    weight_decay: float | None = option(None, _recipe("weight_decay", "AdamW weight decay (not on norms, biases, "
                                                                      "tokens)."), type=NON_NEGATIVE)
    drop_path: float | None = option(None, _recipe("drop_path", "Stochastic depth rate."),
                                     type=click.FloatRange(0, 1, max_open=True))
    mixup: float | None = option(None, _recipe("mixup", "Mixup alpha; 0 turns Mixup off."), type=NON_NEGATIVE)
    cutmix: float | None = option(None, _recipe("cutmix", "CutMix alpha; 0 turns CutMix off."), type=NON_NEGATIVE)
    smoothing: float | None = option(None, _recipe("smoothing", "Label smoothing."),
                                     type=click.FloatRange(0, 1, max_open=True))
    randaugment: str | None = option(None, _recipe("randaugment", "timm auto-augment policy; 'none' for none."))
    reprob: float | None = option(None, _recipe("reprob", "Random-erasing probability."), type=SHARE)
    seed: int = seed_option("Seed of the head's init, the data order, augmentation, Mixup and drop path.")
    precision: str = precision_option("Autocast precision.")
    workers: int = workers_option(8, "DataLoader worker processes per rank.")
    device: str = device_option()
    verify_images: bool = verify_images_option("leave out those that do not")
    max_failures: float = max_failures_option("a split's images")

    def __post_init__(self):
        validate(self)

    def resolved(self, recipe: str = "imagenet") -> "FinetuneOptions":
        """These options with the values of `recipe` (a RECIPES key: MAE's ImageNet one, or the demo's, which a
        bare command fills in where it picks the demo dataset) in the fields left None."""
        done = replace(self, **{name: value for name, value in RECIPES[recipe].items() if getattr(self, name) is None})
        if done.warmup_epochs > done.epochs:
            if self.warmup_epochs is not None:
                raise UserError(f"--warmup-epochs {done.warmup_epochs:g} is longer than the run's --epochs "
                                f"{done.epochs}: the lr would never reach its peak; lower --warmup-epochs or raise "
                                "--epochs")
            # the recipe's warm-up outlasts this shorter run: its share of the run (recorded with the options)
            share = RECIPES[recipe]["warmup_epochs"] / RECIPES[recipe]["epochs"]
            done = replace(done, warmup_epochs=round(done.epochs * share, 4))
        if done.mixing and done.batch_size % 2:
            raise UserError(f"--batch-size {done.batch_size}: Mixup/CutMix pair the images of a batch, so it "
                             "must be even (or pass --mixup 0 --cutmix 0)")
        return done

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def identity(self) -> dict:
        return {name: value for name, value in asdict(self).items() if name not in EXECUTION_SETTINGS}


def build_classifier(checkpoint, num_classes: int, drop_path: float) -> tuple[VisionTransformer, dict]:
    """The encoder of `checkpoint` as a timm classifier (mean-pooled patch tokens -> fc_norm -> head), and the
    `VisionTransformer` kwargs that rebuild it."""
    timm_kwargs, state = load_encoder(checkpoint)
    kwargs = {**timm_kwargs, "num_classes": num_classes, "global_pool": "avg", "drop_path_rate": drop_path}
    model = VisionTransformer(**kwargs)
    encoder = {name: value for name, value in state.items() if not name.startswith(("norm.", "head."))}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if set(missing) != {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} or unexpected:
        raise UserError(f"{checkpoint}: encoder weights do not fit a VisionTransformer{timm_kwargs} (missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    nn.init.trunc_normal_(model.head.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(model.head.bias)
    return model, kwargs


def build_optimizer(model: VisionTransformer, lr: float, opts: FinetuneOptions) -> torch.optim.AdamW:
    groups = param_groups_layer_decay(model, opts.weight_decay, model.no_weight_decay(),
                                      layer_decay=opts.layer_decay)
    return training.adamw(groups, lr, ADAMW_BETAS)


def build_criterion(opts: FinetuneOptions) -> nn.Module:
    """Mixed soft targets need the soft-target loss; label smoothing alone has timm's own."""
    if opts.mixing:
        return SoftTargetCrossEntropy()
    if opts.smoothing > 0:
        return LabelSmoothingCrossEntropy(opts.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(opts: FinetuneOptions, num_classes: int) -> Mixup | None:
    """MAE's Mixup: per batch, Mixup or CutMix (switch probability 0.5), label smoothing folded in."""
    if not opts.mixing:
        return None
    return Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=opts.smoothing, num_classes=num_classes)


class PosterizeToBlackAtZeroBits:
    """timm's posterize op, with 0 bits kept giving a black image as Pillow gave before it refused 0 (Pillow 13
    raises "bits must be between or equal to 1 and 8"). MAE's rand-m9-mstd0.5-inc1 asks for 0 bits whenever its
    magnitude draw reaches 10, about 2 % of its draws, so without this a fine-tune dies within an epoch."""

    def __init__(self, posterize):
        self.posterize = posterize

    def __call__(self, img, bits_to_keep, **kwargs):
        if bits_to_keep < 1:
            return Image.new(img.mode, img.size)
        return self.posterize(img, bits_to_keep, **kwargs)


def train_transform(image_size: int, opts: FinetuneOptions):
    policy = None if opts.randaugment == "none" else opts.randaugment
    transform = create_transform(image_size, is_training=True, color_jitter=None, auto_augment=policy,
                                 interpolation="bicubic", re_prob=opts.reprob, re_mode="pixel", re_count=1,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment's ops
            if op.name.startswith("Posterize"):
                op.aug_fn = PosterizeToBlackAtZeroBits(op.aug_fn)
    return transform


class FineTuning:
    """One fine-tuning run: `run()` trains (resuming RUN_DIR's checkpoint) and returns the classifier."""

    def __init__(self, checkpoint, train_index: ImageFolderIndex, opts: FinetuneOptions, out_dir, *, env=None,
                 device="cpu", progress: bool = True):
        """opts: resolved (`FinetuneOptions.resolved`); out_dir: where checkpoint-last.pth is kept."""
        self.opts, self.out_dir = opts, Path(out_dir)
        self.env = env or distributed.DistEnv()
        self.device = torch.device(device)
        self.progress = progress and self.env.is_main
        self.num_classes = len(train_index.classes)
        torch.manual_seed(opts.seed)  # the head's initialisation
        self.model, self.model_kwargs = build_classifier(checkpoint, self.num_classes, opts.drop_path)
        self.model.to(self.device)
        self.image_size = self.model.patch_embed.img_size[0]
        self.identity = dict(options=opts.identity(), encoder_sha256=file_sha256(checkpoint),
                             keys_sha256=train_index.keys_sha256, world_size=self.env.world_size)
        batches_per_epoch = len(train_index) // (opts.batch_size * self.env.world_size)
        self.steps_per_epoch = batches_per_epoch // opts.accum_iter
        if self.steps_per_epoch == 0:
            raise UserError(f"{train_index.root}: {len(train_index)} images make no full step of --batch-size "
                             f"{opts.batch_size} x --accum-iter {opts.accum_iter} x "
                             f"{self.env.world_size} ranks; lower them")
        self.lr = opts.blr * opts.batch_size * opts.accum_iter * self.env.world_size / 256
        self.optimizer = build_optimizer(self.model, self.lr, opts)
        self.scheduler = build_scheduler(self.optimizer, opts.epochs * self.steps_per_epoch,
                                         round(opts.warmup_epochs * self.steps_per_epoch),
                                         lr_min=opts.min_lr)
        self.optimization = training.Optimization(self.model, self.optimizer, self.env, self.device, opts.precision,
                                                  opts.accum_iter)
        self.trained = self.optimization.wrapped
        self.criterion, self.mixup = build_criterion(opts), build_mixup(opts, self.num_classes)
        self.labels = torch.as_tensor(train_index.labels, dtype=torch.long)
        self.dataset = FolderImages(train_index, train_transform(self.image_size, opts))
        self.guard = training.LossGuard(self.checkpoint_path, "lower --blr or use --precision fp32")
        self.epoch, self.losses = 0, []
        # a run preempted mid-epoch: the batches of self.epoch done, their loss sum, the random streams after them
        self.position, self.running, self.rng, self.preempted = 0, 0.0, None, False

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint-last.pth"

    def _resume(self) -> None:
        if not self.checkpoint_path.is_file():
            return
        state = load_checkpoint(self.checkpoint_path)
        changed = training.changed_settings(state["identity"], self.identity)
        if changed:
            raise UserError(f"{self.checkpoint_path} was fine-tuned with other {', '.join(changed)} "
                             f"({json.dumps(state['identity'], sort_keys=True)[:300]}); pass another --run-dir, "
                             "or delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimization.load_state_dict(state)
        self.epoch, self.losses = state["epoch"], state["losses"]
        self.position, self.running, self.rng = state.get("position", 0), state.get("running", 0.0), state.get("rng")
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])

    def _save(self, position: int = 0, running: float = 0.0) -> None:
        if self.env.is_main:
            atomic_save(dict(model=self.model.state_dict(), model_kwargs=self.model_kwargs,
                             **self.optimization.state_dict(), epoch=self.epoch,
                             losses=self.losses, identity=self.identity, guard=self.guard.state_dict(),
                             position=position, running=running, rng=training.rng_state() if position else None),
                        self.checkpoint_path)
        distributed.barrier()

    def _preempt(self, position: int = 0, running: float = 0.0):
        """Save a resumable state (an epoch's end is saved already) and raise Preempted on every rank."""
        if position:
            self._save(position, running)
        where = f"epoch {self.epoch + 1}, batch {position}" if position else f"the end of epoch {self.epoch}"
        message = (f"{preemption.signal_name() or 'preempted'}: saved {self.checkpoint_path} at {where}; run the "
                   f"same command to resume (exit code {preemption.PREEMPTED})")
        if self.env.is_main:
            tqdm.write(message)
        raise preemption.Preempted(message)

    def _loader(self, epoch: int) -> DataLoader:
        generator = training.seed_epoch(self.opts.seed, epoch, self.env.rank)
        if self.env.distributed:
            sampler = DistributedSampler(self.dataset, shuffle=True, seed=self.opts.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(self.dataset, generator=generator)
        return DataLoader(self.dataset, batch_size=self.opts.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.opts.workers, generator=generator,
                          pin_memory=self.device.type == "cuda")

    def _train_one_epoch(self, epoch: int) -> float:
        self.model.train()
        accum, start, running = self.opts.accum_iter, self.position, self.running
        batches = self.steps_per_epoch * accum  # a trailing part-step would skew the next epoch's first step
        bar = tqdm(total=batches, initial=start, desc=f"finetune {epoch + 1}/{self.opts.epochs}", unit="batch",
                   disable=not self.progress)
        loader = iter(self._loader(epoch))
        if start:  # replay what the preempted run trained, then take up its random streams
            for _ in range(start):
                next(loader)
            training.set_rng_state(self.rng)
        for i, (imgs, rows) in zip(range(start, batches), loader):
            imgs, targets = imgs.to(self.device, non_blocking=True), self.labels[rows].to(self.device)
            if self.mixup is not None:
                imgs, targets = self.mixup(imgs, targets)
            closes_step = (i + 1) % accum == 0
            if i % accum == 0:
                self.scheduler.step_update(epoch * self.steps_per_epoch + i // accum)
            with self.optimization.autocast():
                loss = self.criterion(self.trained(imgs), targets)
            # the ranks agree on the guard's loss and on a preemption request in one all-reduce
            agreed, preempt = distributed.mean_over_ranks(
                torch.stack([loss.detach(), loss.new_tensor(float(preemption.requested()))])).tolist()
            self.guard.check(agreed, f"epoch {epoch + 1}, batch {i}")
            self.optimization.backward(loss, closes_step)
            running += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[-1]['lr']:.2e}")
            self.preempted = preempt > 0
            if closes_step and self.preempted and i + 1 < batches:
                bar.close()
                self._preempt(i + 1, running)
        bar.close()
        self.position, self.running = 0, 0.0
        return running / batches

    def run(self) -> VisionTransformer:
        """Train to opts.epochs holding the run directory's lock, resuming its checkpoint; a preemption signal
        saves and raises `agmae.preemption.Preempted`."""
        with training.hold_run_dir(self.out_dir, self.env, "agmae-eval finetune"), preemption.notice():
            self._resume()
            while self.epoch < self.opts.epochs:
                self.losses.append(self._train_one_epoch(self.epoch))
                self.epoch += 1
                self._save()
                if self.preempted and self.epoch < self.opts.epochs:
                    self._preempt()
        return self.model.eval()


def classify(model, index: ImageFolderIndex, image_size: int, batch_size: int = 128, workers: int = 4,
             device="cpu", progress: bool = True, precision: str = "fp32") -> dict:
    """Top-1 (and top-5 where there are more than 5 classes) percent of the classifier on the eval view."""
    logits = embed_folder(model, model.num_classes, index, image_size, batch_size, workers, device, progress,
                          precision, desc="classify")
    return topk_accuracy(logits, index.labels)
