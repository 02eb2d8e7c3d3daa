"""The training input pipeline against the official MAE's, per loader worker, measured side by side in one run.

On ImageNet-like JPEGs (about 500x375, quality 90, cut from scikit-image's photographs) written to a temporary
folder, with a store of random 14x14 maps:

- official: MAE's `main_pretrain.py` input, an ImageFolder-style PIL load (`convert("RGB")`) and
  `RandomResizedCrop(224, scale=(0.2, 1.0), bicubic)`, `RandomHorizontalFlip()`, `ToTensor()`, `Normalize`,
  float32 batches out of the workers;
- agmae: the training loader with maps (`GuidedMAEDataset` + `CropMapsCollate`): uint8 crops (JPEGs decoded at
  a reduced scale where the crop allows it), maps cut with the same box, normalisation left to the device.

Each sample of both is drawn from torch's generator seeded by (seed, epoch, index), so both take the same boxes
and flips, which the run checks before timing. Rounds alternate which loader goes first; each round times
`--batches` batches after a warm-up batch. Prints images/s per worker (median over rounds and their spread) and
agmae / official (goal >= 1.5).

    python benchmarks/loader_bench.py                         # 1 worker, 384 images, batch 64, 5 rounds
    python benchmarks/loader_bench.py --workers 8 --images 2048 --batch 256
    python benchmarks/loader_bench.py --smoke                 # a few small batches: checks it runs
"""
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from skimage import data as photos
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from agmae import store
from agmae.data.folder import scan
from agmae.data.transforms import BICUBIC, IMAGENET_MEAN, IMAGENET_STD, JointRandomResizedCrop
from agmae.train.dataset import CropMapsCollate, EpochSampler, GuidedMAEDataset, sample_seed

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400))  # (width, height), ImageNet's common shapes
GRID = (14, 14)
SEED = 0


def write_images(root: Path, n_images: int, quality: int = 90) -> None:
    """n_images JPEGs in two class folders: random crops (half to the whole photograph) of scikit-image's
    colour photographs, randomly flipped, resized to an ImageNet shape."""
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(getattr(photos, name)()).convert("RGB") for name in PHOTOS]
    for i in range(n_images):
        source = sources[i % len(sources)]
        share = rng.uniform(0.5, 1.0)
        w, h = int(source.width * share), int(source.height * share)
        x, y = rng.integers(0, source.width - w + 1), rng.integers(0, source.height - h + 1)
        img = source.crop((x, y, x + w, y + h)).resize(SIZES[i % len(SIZES)], Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", "JPEG", quality=quality)


def write_store(path: Path, keys) -> Path:
    rng = np.random.default_rng(1)
    with store.create(path, keys, GRID, method="oracle", backbone=None, weights_sha256=None, image_size=500,
                      method_options={}) as writer:
        writer.write(0, rng.random((len(keys), *GRID), dtype=np.float32), np.ones(len(keys), np.uint8))
    return path


def official_transform(size: int):
    """MAE's pre-training transform (main_pretrain.py)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class OfficialDataset(Dataset):
    """ImageFolder's PIL loading and MAE's transform, each sample seeded as GuidedMAEDataset seeds it."""

    def __init__(self, index, size: int):
        self.index, self.transform = index, official_transform(size)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, item):
        epoch, i = item
        with open(self.index.path(i), "rb") as f:
            img = Image.open(f).convert("RGB")
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(SEED, epoch, i))
            return self.transform(img), int(self.index.labels[i])


class Sequential:
    """EpochSampler's interface over the indices in order, so both loaders read the same images."""

    def __init__(self, n):
        self.n = n

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


def check_same_draws(index, size: int, agmae_dataset) -> None:
    """Every image's box and flip in agmae's loader are the official transform's draws for the same seed."""
    official = official_transform(size)
    crop, flip = official.transforms[0], official.transforms[1]
    for i in range(len(index)):
        sample = agmae_dataset[(0, i)]
        width, height = Image.open(index.path(i)).size
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(sample_seed(SEED, 0, i))
            top, left, h, w = crop.get_params(torch.empty(0, height, width), crop.scale, crop.ratio)
            flipped = bool(torch.rand(1) < flip.p)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
        if not (torch.equal(sample["box"], box) and sample["flip"] == flipped):
            raise AssertionError(f"image {i}: agmae drew {sample['box']}, {sample['flip']}; official {box}, {flipped}")


def images_per_second(loader, batches: int) -> float:
    iterator = iter(loader)
    next(iterator)  # warm-up: workers started, first files read
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator)
        images += len(batch["box"] if isinstance(batch, dict) else batch[0])
    return images / (time.perf_counter() - started)


@click.command()
@click.option("--images", type=click.IntRange(min=8), default=384, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help="timed batches per round  [default: what the images allow after the warm-up batch]")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="loader workers (0: in the main process, which is one worker's work without the transfer)")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=224, show_default=True)
@click.option("--smoke", is_flag=True, help="48 images, batch 8, 2 rounds, 112 px: checks that it runs")
def main(images, batch, batches, workers, rounds, size, smoke):
    if smoke:
        images, batch, rounds, size = 48, 8, 2, 112
    batches = batches or max(1, images // batch - 1)
    torch.set_num_threads(1)  # each worker's own setting in a DataLoader
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_images(root, images)
        index = scan(root)
        maps = write_store(Path(tmp) / "maps-oracle.h5", index.keys)
        agmae_dataset = GuidedMAEDataset(index, size, (size // 16) ** 2, SEED, maps)
        check_same_draws(index, size, agmae_dataset)
        common = dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0, drop_last=True)
        loaders = {
            "official": DataLoader(OfficialDataset(index, size), sampler=EpochSampler(Sequential(len(index))), **common),
            "agmae": DataLoader(agmae_dataset, sampler=EpochSampler(Sequential(len(index))),
                                collate_fn=CropMapsCollate((size // 16,) * 2), **common),
        }
        rates = {name: [] for name in loaders}
        for r in range(rounds):
            for name in (("official", "agmae") if r % 2 == 0 else ("agmae", "official")):
                rates[name].append(images_per_second(loaders[name], batches) / max(workers, 1))
    per_worker = {name: statistics.median(values) for name, values in rates.items()}
    ratios = [a / o for a, o in zip(rates["agmae"], rates["official"])]
    print(f"{images} JPEGs (~500x375, quality 90), crop {size}, batch {batch}, {workers} worker(s), "
          f"{rounds} rounds of {batches} batches; same boxes and flips checked on every image")
    for name, values in rates.items():
        print(f"  {name:9s} {per_worker[name]:7.1f} images/s per worker (rounds {min(values):.1f}-{max(values):.1f})")
    print(f"  agmae / official: {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f}; "
          f"goal >= 1.5)")


if __name__ == "__main__":
    main()
