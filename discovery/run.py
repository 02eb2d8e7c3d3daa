"""Discovery over an image folder: every image's map into an attention store, resumable, shardable, preemptible.

    from agmae.discovery import DiscoveryConfig, discover
    counts = discover(DiscoveryConfig(method="tokencut", data="/datasets/imagenet", out="maps-tokencut.h5"))

A killed or preempted job resumes at the first pending map when run again (the store flushes each batch's maps
before the status that marks them done); a shard K of N computes one contiguous index range into its own store,
which `agmae.store.merge` joins.
"""
import os
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from agmae import preemption, store
from agmae.data.folder import load_rgb, scan, split_folder
from agmae.data.transforms import discovery_transform
from agmae.discovery.methods import METHODS, options_of
from agmae.errors import UserError
from agmae.hardware import INFERENCE_PRECISIONS
from agmae.options import (POSITIVE_INT, data_option, device_option, max_failures_option, option, precision_option,
                           seed_option, train_split_option, validate, workers_option)
from agmae.paths import default_run_dir, maps_path

IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


@dataclass
class DiscoveryConfig:
    """One discovery job: the method and its backbone, the images, the store, how to run. `method_options`: the
    method's own options (its options dataclass, e.g. `TokenCutOptions`, or a dict of its fields)."""
    method: str = option(None, "Discovery method: tokencut, dino, gradcam or oracle.",
                         type=click.Choice(["tokencut", "dino", "gradcam", "oracle"]))
    backbone: str | None = option(None, "timm model name, or an agmae-train checkpoint (RUN/checkpoint-last.pth, or "
                                        "an exported encoder): the project's own encoder. Any timm ViT or CNN. "
                                        "[default: vit_small_patch16_224.dino; gradcam: tf_efficientnet_lite0]")
    weights: str | None = option(None, "Checkpoint for the backbone: official DINO (teacher/student, module./"
                                       "backbone. prefixes) or a timm state dict. [default: timm's pretrained "
                                       "weights; offline, the installed EfficientNet-Lite0 only]",
                                 type=click.Path(exists=True, dir_okay=False))
    random_init: bool = option(False, "Random backbone weights from --seed, for smoke tests only.")
    seed: int = seed_option("Seed of --random-init.")
    data: str | None = data_option()
    train_split: str = train_split_option()
    out: str | None = option(None, "Store to write. A shard writes OUT with .shard-K-of-N before the suffix. "
                                   "[default: RUN_DIR/maps-<method>.h5]", type=click.Path(dir_okay=False))
    image_size: int | None = option(None, "Images are resized whole to S×S; S must be a multiple of the patch (CNN: "
                                          "of 32). [default: 224; 448 for tokencut on a CNN, measured best]",
                                    type=POSITIVE_INT)
    batch_size: int = option(32, "Images per forward pass.", type=POSITIVE_INT)
    workers: int = workers_option(4, "DataLoader processes decoding images.")
    device: str = device_option()
    precision: str = precision_option("Backbone autocast, recorded in the store's method options.",
                                      choices=INFERENCE_PRECISIONS)
    shard: str | None = option(None, "K/N: compute only the K-th of N contiguous index ranges (K from 0). "
                                     "[default: SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set, else everything]")
    overwrite: bool = option(False, "Start over even if OUT exists (default: resume, or report it complete).")
    max_failures: float = max_failures_option("the images", " (unreadable, or no map), naming them in the store")
    method_options: object = field(default_factory=dict)

    def __post_init__(self):
        validate(self)
        if self.method is None:
            raise UserError("no discovery method: pass --method tokencut, dino, gradcam or oracle")
        if isinstance(self.method_options, dict):
            options = dict(self.method_options)
            if self.method == "oracle" and options.get("masks") is None and self.data is not None:
                split_folder(self.data, self.train_split)  # a missing split is named as such, not as its masks
                options["masks"] = str(Path(self.data) / "masks" / self.train_split)
            self.method_options = options_of(self.method, **options)

    def shards(self) -> tuple[int, int] | None:
        """(K, N) from --shard, else from the SLURM array variables, else None."""
        return parse_shard(self.shard)

    def store_path(self) -> Path:
        out = Path(self.out) if self.out else maps_path(default_run_dir(), self.method)
        shard = self.shards()
        return out.with_name(f"{out.stem}.shard-{shard[0]}-of-{shard[1]}{out.suffix}") if shard else out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' (K counted from 0), else the SLURM array variables, else None."""
    if text is None:
        task, count = os.environ.get("SLURM_ARRAY_TASK_ID"), os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return None
        k, n = int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(count)
    else:
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise UserError(f"--shard {text!r} is not K/N (e.g. 0/4)") from None
    if not 0 <= k < n:
        raise UserError(f"--shard {k}/{n}: need 0 <= K < N")
    return k, n


def shard_range(k: int, n: int, total: int) -> tuple[int, int]:
    """Contiguous index range [lo, hi) of shard k of n."""
    return k * total // n, (k + 1) * total // n


class ImageLoading(torch.utils.data.Dataset):
    """Images lo..hi-1 of an index, transformed; a file that cannot be read gives a zero image and its reason
    instead of raising, so one bad file fails one map, not the job. With read=False (a method that reads
    no images) every image is the zero placeholder and no file is opened."""

    def __init__(self, index, lo, hi, transform, size, read=True):
        self.index, self.lo, self.hi, self.transform, self.size, self.read = index, lo, hi, transform, size, read

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        if not self.read:
            return torch.zeros(3, self.size, self.size), ""
        try:
            return self.transform(load_rgb(self.index.path(self.lo + i))), ""
        except IMAGE_ERRORS as err:
            return torch.zeros(3, self.size, self.size), f"{type(err).__name__}: {err}".replace("\n", " ")


def load_method(config: DiscoveryConfig):
    """The configured discovery callable (its backbone loaded): missing weights fail here, before any image."""
    return METHODS[config.method].build(config.method_options, backbone=config.backbone, weights=config.weights,
                                        device=config.device, random_init=config.random_init, seed=config.seed,
                                        precision=config.precision)


def discover(config: DiscoveryConfig, method=None) -> dict:
    """Fill the store `config.store_path()` (resuming it), and return its counts {done, failed, pending}. method:
    `load_method(config)`'s result when the caller loaded it already. Raises UserError when more than --max-failures
    of the images got no map, and `preemption.Preempted` (exit code PREEMPTED) after a SIGTERM/SIGUSR1, once the
    batch in flight is written."""
    if config.data is None:
        raise UserError("no dataset: pass --data ROOT, the folder holding ROOT/<split>/<class>/<image>")
    images = split_folder(config.data, config.train_split)
    d = method or load_method(config)
    index = scan(images)
    out, shard = config.store_path(), config.shards()
    size = config.image_size or d.default_image_size
    lo, hi = shard_range(*shard, len(index)) if shard else (0, len(index))
    identity = dict(method=d.method, backbone=d.backbone_name, weights_sha256=d.weights_sha256, image_size=size,
                    method_options={**d.options, "precision": d.backbone.precision})
    if shard:
        identity.update(keys_sha256=index.keys_sha256, shard=shard, index_range=(lo, hi))
    with store.create(out, index.keys[lo:hi], d.grid(size), overwrite=config.overwrite, image_root=index.root,
                      **identity) as writer:
        start = writer.first_pending()
        if start == hi - lo:
            print(f"{out} is already complete; nothing recomputed (pass --overwrite to start over)")
        else:
            if start:
                print(f"resuming {out} at image {start} of {hi - lo}")
            _fill(writer, d, index, (lo, hi), start, size, config, out)
        counts = writer.counts()
    total = sum(counts.values())
    print(f"{counts['done']} done, {counts['failed']} failed -> {out}")
    if counts["failed"] > config.max_failures * total:
        raise UserError(f"{counts['failed']} of {total} images failed, more than --max-failures "
                        f"{config.max_failures:g}; the reasons are in {out} (agmae-discover inspect)")
    return counts


def _fill(writer, d, index, index_range, start, size, config, out) -> None:
    """Compute and write the maps of the store's images start.. (index_range: the store's [lo, hi) of the index),
    batch by batch, stopping cleanly after the batch in flight on a preemption."""
    lo, hi = index_range
    dataset = ImageLoading(index, lo + start, hi, discovery_transform(size, d.mean, d.std), size, read=d.reads_images)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.workers,
                                         persistent_workers=False)
    position = start
    with preemption.notice(), tqdm(total=hi - lo, initial=start, unit="img", desc=f"{d.method} -> {out.name}") as bar:
        for imgs, errors in loader:
            readable = torch.tensor([not err for err in errors])
            maps = torch.zeros(len(imgs), *d.grid(size))
            if readable.any():
                ids = lo + position + torch.arange(len(imgs))[readable]
                maps[readable] = d(imgs[readable], keys=[index.keys[i] for i in ids],
                                   labels=torch.as_tensor(index.labels[ids.numpy()]))
            status = np.where(readable.numpy(), store.STATUS_DONE, store.STATUS_FAILED)
            # why a method made no map of a readable image (oracle: its missing mask file)
            errors = [err or d.failures.pop(index.keys[lo + position + j], "") for j, err in enumerate(errors)]
            writer.write(position, maps.numpy(), status, errors)
            position += len(imgs)
            bar.update(len(imgs))
            if preemption.requested() and position < hi - lo:
                message = (f"{preemption.signal_name()}: stopped at image {position} of {hi - lo}, every map before "
                           f"it saved in {out}; the same command resumes there")
                print(message)
                raise preemption.Preempted(message)
