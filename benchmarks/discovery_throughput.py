"""End-to-end discovery throughput (agmae-discover's own path) against the backbone's forward, in one run.

Builds once under --work an ImageNet-like dataset ROOT/train/<class>/<image>.jpg: --images JPEGs in 4
classes, 400-500 px a side (random per image), quality 90, cut (random crop, resize, flip) from
scikit-image's bundled photographs, with a random elliptic mask per image for oracle. Then, per method:

- end-to-end img/s: `agmae.discovery.discover`, what `agmae-discover` runs once the method is built and the folder
  indexed, over every image (--workers DataLoader processes, fresh store). Wall time from the call to its
  return, nothing subtracted: the DataLoader's worker start-up and the store writes count.
- in-memory img/s: the method on one batch of those images already decoded (median of --iters).
- forward img/s: the backbone forward alone on that batch (ViT: forward_features; CNN: the whole forward),
  the ceiling of any method built on it; oracle has no backbone.
- decode+resize img/s of one loader worker: `ImageLoading.__getitem__` (load_rgb + discovery_transform,
  exactly what each agmae-discover worker does per image) in this process, and the same with PIL's JPEG
  draft mode (DCT-domain downscaling to the smallest 1/2^k scale keeping both sides >= S), a what-if
  that agmae's loader does not use.

Target (issue 15): end-to-end >= 0.9x forward on CPU. Each method costs about one forward: tokencut
<= 1.15x, dino <= 1.05x (benchmarks/discovery_bench.py), gradcam on a CNN backpropagates only from the
logits to its layer (by default the head features); e2e / in-memory is the loader's and store's share of
the gap. Random-init ViT-S/16 for tokencut and dino, EfficientNet-Lite0 for gradcam (speed does not
depend on the weights).

    python benchmarks/discovery_throughput.py [--images 2000] [--workers 1] [--methods tokencut,dino]
"""
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np
import skimage.data
import torch
from PIL import Image, ImageDraw

from agmae import discovery
from agmae.data.folder import as_rgb, scan
from agmae.data.transforms import discovery_transform
from agmae.discovery.backbones import RandomInitWarning, resolve_device
from agmae.discovery.run import DiscoveryConfig, ImageLoading, discover
from discovery_bench import seconds_per_call

# method -> (backbone, random weights?)
BACKBONES = {
    "tokencut": ("vit_small_patch16_224", True),
    "dino": ("vit_small_patch16_224", True),
    "gradcam": ("tf_efficientnet_lite0", True),
    "oracle": (None, False),
}
FORWARD_TARGET = 0.9
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
CLASSES = 4
SIDES = (400, 500)
JPEG_QUALITY = 90
QUICK = {"images": 40, "image_size": 64, "batch_size": 8, "iters": 1}
CPU = torch.device("cpu")


def random_view(photo, rng):
    """A random crop of half to all of each side, resized to SIDES px a side, mirrored half the time."""
    width, height = photo.size
    crop_w, crop_h = int(width * rng.uniform(0.5, 1)), int(height * rng.uniform(0.5, 1))
    x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    size = tuple(int(side) for side in rng.integers(SIDES[0], SIDES[1] + 1, size=2))
    view = photo.crop((x, y, x + crop_w, y + crop_h)).resize(size, Image.Resampling.BICUBIC)
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def elliptic_mask(size, rng):
    width, height = size
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.15, 0.3) * width, rng.uniform(0.15, 0.3) * height
    mask = Image.new("L", size)
    ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    return mask


def photo_dataset(work: Path, count: int) -> Path:
    """ROOT holding train/<class>/<i>.jpg and masks/train/<same key>; built once per count, then re-used."""
    root = work / f"photos-{count}"
    complete = root / "complete"
    if complete.is_file():
        return root
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
    for i in range(count):
        key = f"class{i % CLASSES}/{i:05d}.jpg"
        for split in ("train", "masks/train"):
            (root / split / key).parent.mkdir(parents=True, exist_ok=True)
        view = random_view(photos[i % len(photos)], rng)
        view.save(root / "train" / key, quality=JPEG_QUALITY)
        # oracle finds a mask by its image's key, extension included: PNG bytes under the .jpg name.
        elliptic_mask(view.size, rng).save(root / "masks" / "train" / key, format="PNG")
    complete.touch()
    return root


def load_rgb_drafted(path, size):
    """load_rgb with a JPEG decoded straight at the smallest 1/2^k scale keeping both sides >= size."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))
        img.load()
        return as_rgb(img)


def images_per_second(load_one, count, iters):
    return count / seconds_per_call(lambda: [load_one(i) for i in range(count)], CPU, iters)


def backbone_forward(backbone, imgs):
    with torch.no_grad(), backbone.autocast():
        model = backbone.model
        (model.forward_features if backbone.kind == "vit" else model)(backbone.prepare(imgs))


def measure(method, root, index, work, size, batch_size, workers, iters, decode_images, device):
    """{rate name: img/s} of one method; rates that do not apply to it are absent."""
    name, random_init = BACKBONES[method]
    options = {"masks": root / "masks" / "train"} if method == "oracle" else {}
    d = discovery.build(method, backbone=name, random_init=random_init, device=device, **options)
    loading = ImageLoading(index, 0, len(index), discovery_transform(size, d.mean, d.std), size,
                           read=d.reads_images)
    first = range(min(batch_size, len(index)))
    imgs = torch.stack([loading[i][0] for i in first])
    keys, labels = index.keys[:len(first)], torch.as_tensor(index.labels[:len(first)])
    rates = {"in_memory": len(imgs) / seconds_per_call(lambda: d(imgs, keys=keys, labels=labels), device, iters)}
    if name is not None:
        rates["forward"] = len(imgs) / seconds_per_call(lambda: backbone_forward(d.backbone, imgs), device, iters)
    if d.reads_images:
        count = min(decode_images, len(index))
        rates["decode"] = images_per_second(loading.__getitem__, count, iters)
        rates["decode_draft"] = images_per_second(
            lambda i: loading.transform(load_rgb_drafted(index.path(i), size)), count, iters)
    started = time.perf_counter()
    config = DiscoveryConfig(method=method, data=str(root), out=str(work / f"maps-{method}.h5"), image_size=size,
                             batch_size=batch_size, workers=workers, overwrite=True, method_options=options)
    counts = discover(config, d)
    rates["end_to_end"] = len(index) / (time.perf_counter() - started)
    if counts["done"] != len(index):
        raise click.ClickException(f"{method}: {counts['failed']} of {len(index)} maps failed")
    return rates


def cell(rates, name, of=None):
    """rates[name] (divided by rates[of] when given) as a table cell, '-' where it does not apply."""
    if name not in rates or (of is not None and of not in rates):
        return "-"
    return f"{rates[name] / rates[of]:.3f}" if of else f"{rates[name]:.1f}"


def parse_methods(_ctx, _param, text):
    methods = text.replace(",", " ").split()
    unknown = [m for m in methods if m not in BACKBONES]
    if unknown or not methods:
        raise click.BadParameter(f"{', '.join(unknown) or 'none given'}; choose from {', '.join(BACKBONES)}")
    return methods


@click.command()
@click.option("--images", type=click.IntRange(min=1), default=2000, show_default=True, help="JPEGs in the dataset.")
@click.option("--methods", default=" ".join(BACKBONES), show_default=True, callback=parse_methods,
              help="Methods to measure, separated by spaces or commas.")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="agmae-discover --workers: DataLoader processes decoding images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repeats of the in-memory, forward and decode measurements (median kept).")
@click.option("--decode-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Images per timed decode+resize pass.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path),
              default=Path(tempfile.gettempdir()) / "agmae-discovery-throughput", show_default=True,
              help="Folder for the dataset (built once per --images) and the stores.")
@click.option("--device", default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Smoke test of this script, not a measurement: "
              + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (overrides those options).")
def main(images, methods, workers, batch_size, image_size, iters, decode_images, work, device, quick):
    if quick:
        images, image_size, batch_size, iters = (QUICK[k] for k in ("images", "image_size", "batch_size", "iters"))
    warnings.simplefilter("ignore", RandomInitWarning)
    torch.manual_seed(0)
    device = resolve_device(device)
    root = photo_dataset(work, images)
    index = scan(root / "train")
    rates = {method: measure(method, root, index, work, image_size, batch_size, workers, iters, decode_images,
                             device) for method in methods}
    print(f"{len(index)} JPEGs {SIDES[0]}-{SIDES[1]} px at {image_size} px, batch {batch_size}, device {device}: "
          f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs usable, {torch.get_num_threads()} torch "
          f"threads, {workers} loader workers; end-to-end from one pass over the images (loader start-up "
          f"included), other rates median of {iters}")
    header = ("method", "e2e img/s", "in-mem img/s", "forward img/s", f"e2e/fwd (>={FORWARD_TARGET})",
              "e2e/in-mem", "decode/worker", "draft decode/worker")
    widths = [max(len(h), 9) for h in header]
    print("  ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for method, r in rates.items():
        cells = (method, cell(r, "end_to_end"), cell(r, "in_memory"), cell(r, "forward"),
                 cell(r, "end_to_end", "forward"), cell(r, "end_to_end", "in_memory"), cell(r, "decode"),
                 cell(r, "decode_draft"))
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    verdicts = [f"{m} {rates[m]['end_to_end'] / rates[m]['forward']:.3f} "
                f"{'ok' if rates[m]['end_to_end'] >= FORWARD_TARGET * rates[m]['forward'] else 'MISSED'}"
                for m in methods if "forward" in rates[m]]
    if verdicts:
        print(f"target end-to-end / forward >= {FORWARD_TARGET}: {', '.join(verdicts)}")
    for method, r in rates.items():
        if "decode" in r and "forward" in r and r["decode"] < r["forward"]:
            print(f"loader bound: one worker decodes {r['decode']:.1f} img/s, {method}'s forward runs "
                  f"{r['forward']:.1f} img/s: it needs >= {math.ceil(r['forward'] / r['decode'])} workers")


if __name__ == "__main__":
    main()
