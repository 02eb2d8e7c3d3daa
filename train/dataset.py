"""The training dataset: augmented images plus, from the attention store, each image's raw map.

Every random choice for a sample (crop box, flip, masking noise) is drawn from a generator
seeded by (seed, epoch, index), so a sample is the same whichever process, worker or batch
position handles it: resuming mid-run and splitting a batch over ranks both reproduce a
single uninterrupted run exactly.

The image is returned as a uint8 crop (`JointRandomResizedCrop.crop_file`: JPEGs on a fast path, decoded at a
reduced scale where the crop allows it, resampled by torch's uint8 kernel otherwise); the training step normalises
the batch on its device with `data.transforms.normalise_images`, to the values torchvision's ToTensor + Normalize
give.
The map is returned uncropped, at the store's resolution; `CropMapsCollate` crops the whole
batch onto the patch grid at once with `data.transforms.crop_maps`, using the box and flip
returned here, inside the loader's workers (off the training step's critical path).
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from agmae.data.folder import ImageFolderIndex, UnreadableImageError
from agmae.data.transforms import JointRandomResizedCrop, crop_maps
from agmae.store import STATUS_DONE, MapStore, open_maps, validate
from agmae.errors import UserError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a pure function of (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


def check_store(path, index: ImageFolderIndex, require_maps: bool = False,
                allow_missing_maps: bool = False) -> tuple[MapStore, dict]:
    """The store at `path`, validated against the dataset (`store.validate`), and its status counts.

    Raises ValueError naming both fingerprints when the store's keys differ from the dataset's, when
    the store is an unmerged shard, when maps are still pending (unless `allow_missing_maps`: those
    images then train unguided), or (with `require_maps`) when a map failed.
    """
    store = validate(path, index.keys)
    if store.attrs["shard"] is not None or len(store) != len(index):
        raise UserError(
            f"{store.path}: holds {len(store)} of the dataset's {len(index)} maps (a shard?); "
            f"join the shards with `agmae-discover merge` and train on the merged store"
        )
    counts = store.counts()
    if counts["pending"] and not allow_missing_maps:
        raise UserError(
            f"{store.path}: {counts['pending']} of {len(store)} maps are still pending (discovery has not "
            f"finished); rerun the same agmae-discover command, it resumes, or pass --allow-missing-maps to "
            f"train those images unguided"
        )
    if counts["failed"] and require_maps:
        raise UserError(
            f"{store.path}: {counts['failed']} of {len(store)} maps failed (unreadable images or non-finite "
            f"maps; `agmae-discover inspect` lists them), which resuming does not recompute: fix those images "
            f"and rerun agmae-discover with --overwrite, or drop --require-maps to train them unguided"
        )
    return store, counts


class GuidedMAEDataset(Dataset):
    """Items are addressed by `(epoch, index)` (see `EpochSampler`) and are dicts:

    - `img`: [3, S, S] uint8 crop (normalise with `normalise_images`), `box`: [4] (x0, y0, x1, y1) relative to the whole image,
      `flip`: bool, `noise`: [L] masking noise in [0, 1)
    - with a store: `map`: [h, w] float32 raw map (zeros when the image has no map, which is
      uniform weights and random masking, i.e. plain MAE for that image) and `has_map`: bool

    The store is opened lazily in each DataLoader worker (memory-mapped, no h5py handle kept).
    """

    def __init__(self, index: ImageFolderIndex, input_size: int, num_patches: int, seed: int,
                 maps_path: Path | None = None, positions=None):
        self.index = index
        # the dataset indices trained on (all but the unreadable images); item j is image positions[j]
        self.positions = np.arange(len(index)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.transform = JointRandomResizedCrop(input_size)
        self.num_patches = num_patches
        self.seed = seed
        self.maps_path = maps_path
        self._maps: np.ndarray | None = None
        self._status: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_status": None}

    def _open_store(self) -> None:
        # Plain ndarray views of the memmaps: indexing an np.memmap builds a memmap object per item,
        # a cost the demo's loader felt on its small images.
        store = open_maps(self.maps_path)
        self._maps, self._status = np.asarray(store.maps), np.asarray(store.status)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, i = item[0], int(self.positions[item[1]])
        # The transform draws from torch's global generator; seed it per sample and put it back after.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            try:
                img, box, flip = self.transform.crop_file(self.index.path(i))
            except UnreadableImageError:  # became unreadable after the check: skipped by the collate
                return {"unreadable": self.index.keys[i]}
            noise = torch.rand(self.num_patches)
        sample = {"img": img, "box": box, "flip": flip, "noise": noise}
        if self.maps_path is not None:
            if self._maps is None:
                self._open_store()
            has_map = bool(self._status[i] == STATUS_DONE)
            raw = self._maps[i].astype(np.float32) if has_map else np.zeros(self._maps.shape[1:], np.float32)
            sample.update(map=torch.from_numpy(raw), has_map=has_map)
        return sample


class EpochSampler(Sampler):
    """Wraps a sampler with `set_epoch` (DistributedSampler) and yields `(epoch, index)`, so
    persistent workers see the epoch without re-pickling the dataset."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class CropMapsCollate:
    """Stack the samples, then cut every raw map to its image's crop on the patch grid:
    `map: [B, h, w]` becomes `attn: [B, gh*gw]` (row-major, the order of the MAE's patches)."""

    def __init__(self, grid_hw: tuple[int, int]):
        self.grid_hw = tuple(grid_hw)

    def __call__(self, samples: list[dict]) -> dict:
        unreadable = [sample["unreadable"] for sample in samples if "unreadable" in sample]
        samples = [sample for sample in samples if "unreadable" not in sample]
        if not samples:
            return {"unreadable": unreadable}
        batch = {**default_collate(samples), "unreadable": unreadable}
        if "map" in batch:
            batch["attn"] = crop_maps(batch.pop("map"), batch["box"], batch["flip"], self.grid_hw).flatten(1)
        return batch
