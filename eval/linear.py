"""Linear probe on a frozen encoder (MAE protocol, docs/METHOD.md#linear).

Head: BatchNorm1d(affine=False, eps=1e-6) + Linear (trunc-normal std 0.01, zero bias).
Optimiser: timm's LARS, momentum 0.9, no weight decay, the trust ratio applied to the weight
matrix only (as in MAE's LARS, which skips 1-D parameters); lr = blr × effective batch / 256
(blr = 0.1 on ImageNet, scaled to the training set's size: probe_blr), per-iteration linear warm-up then half-cycle
cosine (timm CosineLRScheduler).

Two modes:
- `augmented` (the protocol): every step embeds a RandomResizedCrop + flip view of each
  training image with the frozen encoder; distributed with DistributedSampler + DDP.
- `cached`: trains on the cached eval-view features, no augmentation. Much faster, not the
  paper's protocol; results carry `"mode": CACHED_MODE` so the two are never confused.
"""
import logging

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from agmae.data.folder import ImageFolderIndex
from agmae.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from agmae.eval.features import FolderImages, pool_tokens
from agmae.eval.knn import check_bank_labels, topk_accuracy

AUGMENTED_MODE = "augmented (RandomResizedCrop + flip)"
CACHED_MODE = "cached-features (no augmentation)"
MODES = {"augmented": AUGMENTED_MODE, "cached": CACHED_MODE}
MAE_BLR = 0.1
IMAGENET_TRAIN_IMAGES = 1_281_167


def probe_blr(train_images: int) -> float:
    """The probe's default base lr: MAE's 0.1, tuned on ImageNet-1k, scaled up for a smaller training set.

    LARS moves the weights by lr x 0.001 x |w| per step whatever the gradient's size, so a probe's total
    travel is proportional to blr x training images x epochs / 256; at MAE's blr the demo's 10,000 images
    leave the probe at chance loss (top-1 14.7 against 29.5 at 12.8 on one demo encoder, an L-BFGS fit
    reaching 32.2). The blr that travels as far as on ImageNet is 0.1 x 1,281,167 / N (12.8 for 10k);
    never below MAE's. Three significant digits."""
    return float(f"{MAE_BLR * max(1.0, IMAGENET_TRAIN_IMAGES / train_images):.3g}")


def probe_batch_size(batch_size: int, train_images: int, world_size: int = 1) -> int:
    """The per-rank batch a probe trains with: the one asked for, capped so that every rank has one full batch."""
    return max(1, min(batch_size, train_images // world_size))


def build_probe(dim: int, num_classes: int) -> nn.Sequential:
    """BatchNorm1d(affine=False, eps=1e-6) + Linear(dim, num_classes): feats [B, D] -> logits [B, C]."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def build_optimizer(probe: nn.Module, lr: float) -> Lars:
    matrices = [p for p in probe.parameters() if p.ndim > 1]
    vectors = [p for p in probe.parameters() if p.ndim <= 1]
    return Lars([dict(params=matrices, always_adapt=True), dict(params=vectors, always_adapt=False)],
                lr=lr, momentum=0.9, weight_decay=0.0)


def build_scheduler(optimizer, total_steps: int, warmup_steps: int, lr_min: float = 0.0) -> CosineLRScheduler:
    """Per-step lr: linear from 0 over warmup_steps, then half-cycle cosine to lr_min at total_steps."""
    # timm logs that a 1-step cosine phase "will have no effect"; for a warm-up-only probe that is the
    # intent, and a log line of timm's inside agmae-eval's output says nothing to its user.
    timm_log = logging.getLogger(CosineLRScheduler.__module__)
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup_steps, 1), warmup_t=warmup_steps,
                                 warmup_lr_init=0.0, warmup_prefix=True, lr_min=lr_min, t_in_epochs=False)
    finally:
        timm_log.setLevel(level)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _fit(probe, batches_per_epoch, epoch_batches, epochs: int, warmup_epochs: float, lr: float,
         progress: bool, desc: str) -> list[float]:
    """Train probe on epoch_batches(epoch) -> iterable of (feats [B, D], labels [B]); returns epoch losses."""
    optimizer = build_optimizer(probe, lr)
    total_steps = epochs * batches_per_epoch
    scheduler = build_scheduler(optimizer, total_steps, round(warmup_epochs * batches_per_epoch))
    criterion = nn.CrossEntropyLoss()
    losses, step = [], 0
    probe.train()
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
        running = 0.0
        for feats, labels in epoch_batches(epoch):
            scheduler.step_update(step)
            loss = criterion(probe(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        losses.append(running / batches_per_epoch)
    return losses


def train_probe_cached(train_feats, train_labels, num_classes: int, *, epochs: int = 90, warmup_epochs: float = 10,
                       batch_size: int = 256, blr: float = MAE_BLR, seed: int = 0, progress: bool = True):
    """Fit the probe on fixed features (no augmentation); returns (probe, per-epoch losses, lr).

    train_feats: [N, D] (numpy/memmap/torch, any float dtype), train_labels: [N] int.
    The batch is capped at N; the last incomplete batch of an epoch is dropped (as MAE's loader does).
    """
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    check_bank_labels(labels, "the linear probe")
    num_items = len(labels)
    batch_size = probe_batch_size(batch_size, num_items)
    batches_per_epoch = num_items // batch_size
    lr = blr * batch_size / 256
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = build_probe(train_feats.shape[1], num_classes)

    def epoch_batches(epoch):
        order = torch.randperm(num_items, generator=generator)
        for b in range(batches_per_epoch):
            rows = order[b * batch_size : (b + 1) * batch_size].sort().values.numpy()
            yield torch.as_tensor(np.asarray(train_feats[rows], dtype=np.float32)), labels[rows]

    losses = _fit(probe, batches_per_epoch, epoch_batches, epochs, warmup_epochs, lr, progress, "linear (cached)")
    return probe.eval(), losses, lr


def train_probe_augmented(encoder, index: ImageFolderIndex, image_size: int, num_classes: int, *, pool: str = "cls",
                          epochs: int = 90, warmup_epochs: float = 10, batch_size: int = 256, blr: float = MAE_BLR,
                          seed: int = 0, workers: int = 4, device="cpu", progress: bool = True):
    """Fit the probe on RandomResizedCrop + flip views through the frozen encoder (the MAE protocol).

    batch_size is per rank; lr = blr × batch_size × world size / 256. Returns (probe, losses, lr).
    """
    transform = T.Compose([
        T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    check_bank_labels(index.labels, "the linear probe")
    dataset = FolderImages(index, transform)
    distributed = torch.distributed.is_initialized()
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if distributed else None
    batch_size = probe_batch_size(batch_size, len(dataset), _world_size())
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        num_workers=workers, generator=generator, pin_memory=torch.device(device).type == "cuda")
    labels = torch.as_tensor(index.labels, dtype=torch.long)
    lr = blr * batch_size * _world_size() / 256
    torch.manual_seed(seed)
    probe = build_probe(encoder.num_features, num_classes).to(device)
    trained = torch.nn.parallel.DistributedDataParallel(probe) if distributed else probe
    encoder = encoder.to(device).eval()

    def epoch_batches(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for imgs, idx in loader:
            with torch.no_grad():
                feats = pool_tokens(encoder, imgs.to(device, non_blocking=True), pool).float()
            yield feats, labels[idx].to(device)

    show = progress and not (distributed and torch.distributed.get_rank() != 0)
    losses = _fit(trained, len(loader), epoch_batches, epochs, warmup_epochs, lr, show, "linear (augmented)")
    return probe.eval(), losses, lr


@torch.no_grad()
def probe_accuracy(probe, test_feats, test_labels, batch_size: int = 4096) -> dict:
    """Top-1/top-5 percent of the probe on features test_feats: [M, D] against test_labels: [M]."""
    device = next(probe.parameters()).device
    logits = [
        probe(torch.as_tensor(np.asarray(test_feats[s : s + batch_size], dtype=np.float32), device=device)).cpu()
        for s in range(0, len(test_feats), batch_size)
    ]
    return topk_accuracy(torch.cat(logits), test_labels)
