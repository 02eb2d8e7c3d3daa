"""Reading an attention store back: a text summary and a grid of maps drawn over their images."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from agmae import store
from agmae.data.folder import load_rgb, scan, split_folder
from agmae.discovery.run import IMAGE_ERRORS
from agmae.errors import UserError

HISTOGRAM_BINS = 10


def summary(file) -> list[str]:
    """Lines describing a store: its shape and source, counts by status, method options, a histogram of the done
    maps' values, the first failures with their reasons."""
    maps = store.open_maps(file)
    attrs, status, counts = maps.attrs, np.asarray(maps.status), maps.counts()
    lines = [f"{file}: {len(maps)} maps {attrs['grid'][0]}x{attrs['grid'][1]}, method {attrs['method']}, "
             f"backbone {attrs['backbone']}, image size {attrs['image_size']}"
             + (f", shard {attrs['shard']} of indices {attrs['index_range']}" if attrs["shard"] else ""),
             f"status: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending",
             f"method options: {json.dumps(attrs['method_options'], sort_keys=True)}"]
    done = np.flatnonzero(status == store.STATUS_DONE)
    if done.size:
        histogram, edges = np.histogram(np.asarray(maps.maps[done], dtype=np.float32), bins=HISTOGRAM_BINS,
                                        range=(0, 1))
        lines.append("map values:")
        lines += [f"  {lo:.1f}-{hi:.1f} {n:9d} {'#' * round(40 * n / histogram.max())}"
                  for lo, hi, n in zip(edges[:-1], edges[1:], histogram)]
    lines += [f"failed: {maps.keys[i]}: {maps.errors[i]}" for i in np.flatnonzero(status == store.STATUS_FAILED)[:5]]
    return lines


def images_of(file, data=None, split="train") -> Path:
    """The image folder a store's maps were computed on: `data`'s split, else the folder the store recorded;
    refused when its images are not the store's (drawing maps over other images says nothing)."""
    maps = store.open_maps(file)
    root = split_folder(data, split) if data else maps.attrs.get("image_root")
    if root is None:
        raise UserError(f"{file} does not record its image folder; pass --data ROOT and --train-split, the split it "
                        "was computed on")
    index = scan(root)
    lo, hi = maps.attrs["index_range"] or (0, len(index))
    if index.keys[lo:hi] != maps.keys:
        raise UserError(f"{root} holds other images than {file} was computed on (keys differ); pass the --data and "
                        "--train-split given to agmae-discover")
    return Path(root)


def overlay_png(file, png, count=16, data=None, split="train", columns=8) -> None:
    """Write to `png` a grid of `count` done maps spread evenly over the store (so over its classes), each drawn
    (bilinear, jet) over its image; an image that cannot be read leaves its map alone."""
    maps = store.open_maps(file)
    root = images_of(file, data, split)
    done = np.flatnonzero(np.asarray(maps.status) == store.STATUS_DONE)
    shown = done[np.unique(np.linspace(0, len(done) - 1, min(count, len(done))).round().astype(int))]
    images = []
    for i in shown:
        try:
            images.append(load_rgb(root / maps.keys[i]))
        except IMAGE_ERRORS:
            images.append(None)
    draw(np.asarray(maps.maps[shown], dtype=np.float32), images, png, columns)


def draw(heat, images, png, columns=8) -> None:
    """Write a grid of maps `heat` [n, h, w] drawn (bilinear, jet) over their images (None: the map alone)."""
    try:
        import matplotlib
    except ImportError:
        return _overlay_pil(heat, images, png, columns)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(heat) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, one, image in zip(axes.flat, heat, images):
        extent = (0, 1, 1, 0)
        if image is not None:
            ax.imshow(image, extent=extent)
        ax.imshow(one, cmap="jet", alpha=0.5 if image is not None else 1.0, vmin=0, vmax=1,
                  interpolation="bilinear", extent=extent)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def _overlay_pil(maps, images, path, columns, tile=128) -> None:
    """overlay_png without matplotlib: each map in red, blended half over its image."""
    rows = (len(maps) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    for i, (heat, image) in enumerate(zip(maps, images)):
        heat = Image.fromarray(np.uint8(heat * 255)).resize((tile, tile), Image.BILINEAR)
        red = Image.merge("RGB", (heat, Image.new("L", heat.size), Image.new("L", heat.size)))
        base = image.resize((tile, tile)) if image is not None else Image.new("RGB", heat.size)
        sheet.paste(Image.blend(base, red, 0.5), ((i % columns) * tile, (i // columns) * tile))
    sheet.save(path)
