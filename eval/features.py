"""Frozen-encoder features of an image folder, extracted once (optionally on many ranks) and cached.

The encoder comes from an `agmae-train` checkpoint or an exported timm state dict
(`agmae.checkpoint.load_encoder`) and is a timm VisionTransformer without a head. The
feature of an image is the final-norm CLS token (`pool="cls"`) or the mean of the final-norm
patch tokens (`pool="mean"`), on the eval view: resize S/0.875, centre crop S
(`data.transforms.eval_transform`), S = the encoder's image size.

Cache: AGMAE_HOME/features/<key>.npy (float16 [N, D]) + <key>.json (what the key was made
of). The key hashes the checkpoint file's SHA-256, the dataset's fingerprint (keys_sha256)
and resolved root, and the options, so a k-NN sweep over k or T never re-extracts. The .json
is written last (both via temp file + os.replace): a .npy without its .json is not a hit.
Features are stored as float16 (half the memory at ImageNet scale; cosine similarities move
by < 1e-3) and a fresh extraction returns the same float16 values a later cache hit will.
"""
import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from agmae.data.folder import ImageFolderIndex, load_rgb, scan, unreadable_images
from agmae.data.transforms import eval_transform
from agmae import distributed
from agmae.checkpoint import atomic_write, file_sha256
from agmae.hardware import resolve_precision
from agmae.paths import agmae_home
from agmae.errors import UserError

POOLS = ("cls", "mean")
CACHE_FORMAT = 1


def build_encoder(checkpoint) -> tuple[torch.nn.Module, dict]:
    """Frozen timm VisionTransformer (no head, eval mode) from a checkpoint; returns (model, timm kwargs)."""
    from timm.models.vision_transformer import VisionTransformer

    from agmae.checkpoint import load_encoder

    timm_kwargs, state_dict = load_encoder(checkpoint)
    model = VisionTransformer(**{**timm_kwargs, "num_classes": 0})
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{checkpoint}: encoder weights do not fit a VisionTransformer{timm_kwargs} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); pass the checkpoint "
            "of an agmae-train run or a timm ViT state dict with its kwargs"
        )
    return model.eval().requires_grad_(False), timm_kwargs


def image_size_of(timm_kwargs: dict) -> int:
    size = timm_kwargs.get("img_size", 224)
    return int(size if isinstance(size, int) else size[0])


def pool_tokens(model, imgs: torch.Tensor, pool: str) -> torch.Tensor:
    """imgs: [B, 3, S, S] -> features [B, D] from timm's forward_features (final norm applied)."""
    tokens = model.forward_features(imgs)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean":
        return tokens[:, model.num_prefix_tokens :].mean(dim=1)
    raise UserError(f"unknown pool {pool!r}; use one of {POOLS}")


class FolderImages(Dataset):
    """(image [3, S, S], dataset index) pairs of an ImageFolderIndex under a transform."""

    def __init__(self, index: ImageFolderIndex, transform):
        self.index = index
        self.transform = transform

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.index.path(i))), i


def embed_folder(embed, dim: int, index: ImageFolderIndex, image_size: int, batch_size: int = 128,
                 workers: int = 4, device="cpu", progress: bool = True, precision: str = "fp32",
                 desc: str = "features") -> torch.Tensor:
    """`embed(imgs [B, 3, S, S]) -> [B, dim]` over the eval view of every image: [N, dim] float32 on the
    CPU, in dataset-index order, on every rank; under bf16 autocast when precision is "bf16".

    Under torch.distributed each rank embeds its DistributedSampler share; the padding
    duplicates the sampler adds are harmless because rows are placed by their dataset index.
    """
    dataset = FolderImages(index, eval_transform(image_size))
    sampler = DistributedSampler(dataset, shuffle=False) if torch.distributed.is_initialized() else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=torch.device(device).type == "cuda")
    rows, positions = [], []
    show = progress and not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)
    device_type = torch.device(device).type
    with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for imgs, idx in tqdm(loader, desc=f"{desc} {index.root.name}", unit="batch", disable=not show):
            rows.append(embed(imgs.to(device, non_blocking=True)).float())
            positions.append(idx.to(device))
    local_rows = torch.cat(rows) if rows else torch.empty(0, dim, device=device)
    local_positions = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long, device=device)
    gathered_rows = distributed.all_gather_rows(local_rows).cpu()
    gathered_positions = distributed.all_gather_rows(local_positions).cpu()
    out = torch.empty(len(index), dim)
    out[gathered_positions] = gathered_rows
    return out


def extract_features(model, index: ImageFolderIndex, image_size: int, pool: str = "cls", batch_size: int = 128,
                     workers: int = 4, device="cpu", progress: bool = True, precision: str = "fp32") -> torch.Tensor:
    """Features [N, D] of the frozen encoder (see `embed_folder`)."""
    model = model.to(device)
    return embed_folder(lambda imgs: pool_tokens(model, imgs, pool), model.num_features, index, image_size,
                        batch_size, workers, device, progress, precision)


def readable_index(root, verify_images: bool = True, max_failures: float = 0.001,
                   progress: bool = True) -> tuple[ImageFolderIndex, dict]:
    """The folder's index without its unreadable images, and {key: reason} of those; more than
    max_failures of them is an error."""
    index = scan(root)
    if not verify_images:
        return index, {}
    bad = unreadable_images(index, progress=progress)
    if len(bad) > max_failures * len(index):
        first = next(iter(bad))
        raise UserError(f"{index.root}: {len(bad)} of {len(index)} images cannot be read (e.g. "
                         f"{index.keys[first]}: {bad[first]}), more than --max-failures {max_failures:g}; "
                         "fix or remove them, or raise --max-failures")
    readable = index.without(bad)
    images_per_class = np.bincount(readable.labels, minlength=len(index.classes))
    for label in np.flatnonzero(images_per_class == 0):
        name = index.classes[label]
        example = next(i for i in bad if index.labels[i] == label)
        count = int((index.labels == label).sum())
        raise UserError(f"{index.root / name}: class {name} has no readable image (all {count} cannot be read, e.g. "
                        f"{index.keys[example]}: {bad[example]}); fix them, or move the class folder out of every split")
    return readable, {index.keys[i]: reason for i, reason in bad.items()}


def _cache_error(cache: Path, err: OSError) -> UserError:
    return UserError(f"{cache}: the feature cache cannot be written ({err.strerror or err}); set AGMAE_HOME "
                     f"(now {agmae_home()}) to a writable directory, or pass --no-cache")


def _writable_cache(cache: Path) -> None:
    """Refuse a feature cache folder that cannot be created or written."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cache_error(cache, err) from err
    if not os.access(cache, os.W_OK):
        raise _cache_error(cache, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))


def _everyone_agrees(flag: bool, device) -> bool:
    """True only if flag is true on every rank (a rank with a different cache view must not skip work).

    device: this rank's device (NCCL gathers CUDA tensors only)."""
    return bool(distributed.all_gather_rows(torch.tensor([int(flag)], device=device)).min().item())


@dataclass
class FolderFeatures:
    """Features of one image folder: feats [N, D] float16 (memmap on cache hits), the index it follows."""

    feats: np.ndarray
    index: ImageFolderIndex  # the readable images of the folder
    cache_path: Path | None
    unreadable: dict = field(default_factory=dict)  # {key: reason} of the images left out


class FeatureSource:
    """Features of any image folder under one frozen encoder, cached on disk.

    The checkpoint is hashed once and the encoder is only built on the first cache miss, so
    re-running an evaluation on cached features never loads the model.
    """

    def __init__(self, checkpoint, pool: str = "cls", batch_size: int = 128, workers: int = 4, device="cpu",
                 use_cache: bool = True, progress: bool = True, precision: str = "auto", verify_images: bool = True,
                 max_failures: float = 0.001):
        if pool not in POOLS:
            raise UserError(f"unknown pool {pool!r}; use one of {POOLS}")
        self.checkpoint = Path(checkpoint)
        if not self.checkpoint.is_file():
            raise UserError(
                f"checkpoint {self.checkpoint} does not exist; train one with `agmae-train` or pass --checkpoint FILE"
            )
        self.checkpoint_sha256 = file_sha256(self.checkpoint)
        self.pool, self.batch_size, self.workers, self.device = pool, batch_size, workers, device
        self.use_cache, self.progress = use_cache, progress
        self.verify_images, self.max_failures = verify_images, max_failures
        self.precision = resolve_precision(precision, torch.device(device))
        self._model = None
        self.timm_kwargs = None  # of the encoder, once built or read from a cache entry (head count included)

    def encoder(self):
        if self._model is None:
            self._model, self.timm_kwargs = build_encoder(self.checkpoint)
        return self._model

    def cache_key(self, index: ImageFolderIndex) -> dict:
        return dict(format=CACHE_FORMAT, checkpoint_sha256=self.checkpoint_sha256, root=str(index.root.resolve()),
                    keys_sha256=index.keys_sha256, pool=self.pool, precision=self.precision)

    def readable(self, root) -> tuple[ImageFolderIndex, dict]:
        return readable_index(root, self.verify_images, self.max_failures, self.progress)

    def features(self, root) -> FolderFeatures:
        index, unreadable = self.readable(root)
        key = self.cache_key(index)
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        npy_path = agmae_home() / "features" / f"{name}.npy"
        meta_path = npy_path.with_suffix(".json")
        hit = self.use_cache and meta_path.is_file() and npy_path.is_file()
        if _everyone_agrees(hit, self.device):
            feats = np.load(npy_path, mmap_mode="r")
            if feats.shape[0] == len(index):
                self.timm_kwargs = self.timm_kwargs or json.loads(meta_path.read_text()).get("encoder")
                return FolderFeatures(feats, index, npy_path, unreadable)
        writes = self.use_cache and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0)
        if writes:  # checked before the extraction, which an unwritable cache would throw away
            _writable_cache(npy_path.parent)
        model = self.encoder()
        feats = extract_features(model, index, image_size_of(self.timm_kwargs), self.pool, self.batch_size,
                                 self.workers, self.device, self.progress, self.precision).numpy().astype(np.float16)
        if writes:
            meta = {**key, "checkpoint": str(self.checkpoint.resolve()), "shape": list(feats.shape),
                    "encoder": self.timm_kwargs}
            try:
                atomic_write(npy_path, lambda f: np.save(f, feats))
                atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            except OSError as err:
                raise _cache_error(npy_path.parent, err) from err
        distributed.barrier()
        return FolderFeatures(feats, index, npy_path if self.use_cache else None, unreadable)
