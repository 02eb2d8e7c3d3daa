"""`oracle`: ground-truth object masks, area-averaged onto the token grid (no backbone)."""
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from agmae.discovery.base import Discoverer
from agmae.errors import UserError
from agmae.options import option, validate


def area_matrix(n_in, n_out):
    """[n_out, n_in]: row i holds the fraction of output cell i that each input pixel covers."""
    cell = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    pixel = torch.arange(n_in + 1, dtype=torch.float64)
    overlap = (torch.minimum(cell[1:, None], pixel[None, 1:]) - torch.maximum(cell[:-1, None], pixel[None, :-1]))
    return overlap.clamp(min=0) / (n_in / n_out)


def area_average(mask, grid):
    """mask: [H, W] -> [h, w], every cell the mean of the mask over the area it covers (exact, any ratio)."""
    rows, cols = area_matrix(mask.shape[0], grid[0]), area_matrix(mask.shape[1], grid[1])
    return rows @ mask.double() @ cols.T


@dataclass
class OracleOptions:
    masks: str | None = option(None, "Mask folder mirroring the data keys (a greyscale mask per image, object = "
                                     "bright). [default: ROOT/masks/<train split> of --data]",
                               type=click.Path(exists=True, file_okay=False))
    patch: int = option(16, "Grid cell size in pixels.", type=click.IntRange(min=1))

    def __post_init__(self):
        validate(self)


class _NoBackbone:
    name = "none"
    weights_sha256 = ""
    precision = "fp32"
    mean = tuple(IMAGENET_DEFAULT_MEAN)
    std = tuple(IMAGENET_DEFAULT_STD)


class Oracle(Discoverer):
    """The mask of image `key` is `masks/key` (a greyscale image, object = bright)."""

    method = "oracle"
    reads_images = False

    def __init__(self, options: OracleOptions):
        if options.masks is None:
            raise UserError("oracle needs the ground-truth masks: pass masks=DIR (--masks DIR)")
        super().__init__(_NoBackbone(), {"masks": str(options.masks), "patch": options.patch})

    def grid(self, size):
        patch = self.options["patch"]
        if size <= 0 or size % patch:
            raise UserError(f"image size {size} is not a positive multiple of the oracle patch {patch}")
        return (size // patch,) * 2

    def compute(self, imgs, keys=None, labels=None):
        """A missing or unreadable mask gives a NaN map, which the caller records as failed with the reason
        `failures[key]` holds."""
        if keys is None or len(keys) != len(imgs):
            raise UserError("oracle needs the images' dataset keys to find their masks")
        grid = self.grid(imgs.shape[-1])
        maps = torch.full((len(keys), *grid), float("nan"))
        for i, key in enumerate(keys):
            path = Path(self.options["masks"]) / key
            try:
                with Image.open(path) as mask:
                    pixels = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
            except FileNotFoundError:
                self.failures[key] = f"missing mask file {path}"
                continue
            except OSError as err:
                self.failures[key] = f"unreadable mask file {path} ({err})"
                continue
            maps[i] = area_average(torch.from_numpy(pixels), grid).float()
        return maps


def build(options: OracleOptions, backbone=None, weights=None, device="auto", random_init=False, seed=0,
          precision="auto"):
    if backbone is not None or weights is not None:
        raise UserError("oracle uses ground-truth masks and takes no --backbone/--weights")
    return Oracle(options)
