"""`agmae-discover`: compute an attention store (default action), merge shards, inspect a store."""
import json
import os
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from agmae import discovery
from agmae.data.demo import ensure_demo
from agmae.data.folder import load_rgb, scan, split_folder
from agmae.data.transforms import discovery_transform
from agmae import store
from agmae import options
from agmae.cli.errors import environment_error
from agmae.hardware import INFERENCE_PRECISIONS
from agmae.options import click_option
from agmae.paths import default_run_dir, maps_path

IMAGE_ERRORS = (OSError, ValueError, SyntaxError)
INSPECT_BINS = 10


def path_type(**kwargs):
    return click.Path(path_type=Path, **kwargs)


# Method options: default None means "the method's own default"; each applies to the methods whose
# `discovery.build` accepts it (discovery.method_options).
METHOD_OPTIONS = {
    "heads": click.option("--heads", type=click.Choice(["mean", "max"]),
                          help="dino: combine the CLS attention of the heads by mean (default) or max."),
    "mass_threshold": click.option("--mass-threshold", type=click.FloatRange(0, 1, min_open=True),
                                   help="dino: keep per head the patches holding this fraction of the attention "
                                        "mass (DINO's rule), map = mean of the keep-masks. Default: off."),
    "tau": click.option("--tau", type=click.FloatRange(-1, 1, max_open=True),
                        help="tokencut: similarity threshold τ_tc of the graph (default 0.2 ViT, 0 CNN)."),
    "eps": click.option("--eps", type=click.FloatRange(0, min_open=True), help="tokencut: weight of edges below τ_tc (default 1e-5)."),
    "graph": click.option("--graph", type=click.Choice(["binary", "weighted"]),
                          help="tokencut: edges above τ_tc weigh 1 (binary, default) or their similarity."),
    "output": click.option("--output", type=click.Choice(["soft", "mask"]),
                           help="tokencut: the aligned Fiedler vector (soft, default) or the seed's 4-connected "
                                "foreground component as 0/1 (mask)."),
    "fg_rule": click.option("--fg-rule", type=click.Choice(["seed", "border"]),
                            help="tokencut: the foreground side holds argmax|v| (seed) or touches fewer border "
                                 "cells (border). Default: seed for ViTs, border for CNNs (measured better there)."),
    "center": click.option("--center/--no-center", default=None,
                           help="tokencut: subtract each image's mean feature first (default: on for CNNs, off "
                                "for ViT keys)."),
    "layer": click.option("--layer",
                          help="tokencut / gradcam: module name of the feature layer, e.g. blocks.5 "
                               "(default: tokencut on EfficientNets blocks.5, other CNNs their head features, "
                               "ViTs the last block's keys, `norm` their final tokens; gradcam the head "
                               "features for CNNs, blocks[-1].norm1 for ViTs)."),
    "solver": click.option("--solver", type=click.Choice(["exact", "iterative"]),
                           help="tokencut: Fiedler vectors by one batched float64 eigh (exact, default) or by "
                                "float32 subspace iteration made of batched matmuls, exact where it does not "
                                "converge (iterative; far cheaper at 784 tokens, see benchmarks)."),
    "target": click.option("--target", type=click.Choice(["predicted", "label"]),
                           help="gradcam: explain the top-1 predicted class (default) or the dataset label."),
    "masks": click.option("--masks", type=path_type(exists=True, file_okay=False),
                          help="oracle: mask folder mirroring the data keys (default: DATA/../masks/<DATA name>)."),
    "patch": click.option("--patch", type=click.IntRange(min=1), help="oracle: grid cell size in pixels (default 16)."),
}


def method_options(func):
    for option in reversed(list(METHOD_OPTIONS.values())):
        func = option(func)
    return func


def parse_shard(text):
    """'K/N' (K counted from 0), else the SLURM array variables, else None."""
    if text is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return None
        k, n = int(task) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(count)
    else:
        try:
            k, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not K/N (e.g. 0/4)", param_hint="--shard") from None
    if not 0 <= k < n:
        raise click.BadParameter(f"shard {k}/{n}: need 0 <= K < N", param_hint="--shard")
    return k, n


def shard_range(k, n, total):
    """Contiguous index range [lo, hi) of shard k of n."""
    return k * total // n, (k + 1) * total // n


def shard_path(out, k, n) -> Path:
    return out.with_name(f"{out.stem}.shard-{k}-of-{n}{out.suffix}")


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


def chosen_options(method, given):
    """The method options given on the command line, rejecting those that belong to other methods."""
    accepted = discovery.method_options(method)
    stray = [name for name, value in given.items() if value is not None and name not in accepted]
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise click.UsageError(f"{flags} does not apply to --method {method}")
    return {name: value for name, value in given.items() if value is not None}


def compute_store(d, index, out, size, batch_size, workers, shard, overwrite):
    """Fill the store at `out` (resuming); returns the store's counts."""
    lo, hi = shard_range(*shard, len(index)) if shard else (0, len(index))
    identity = dict(method=d.method, backbone=d.backbone_name, weights_sha256=d.weights_sha256,
                    image_size=size, method_options={**d.options, "precision": d.backbone.precision})
    if shard:
        identity.update(keys_sha256=index.keys_sha256, shard=shard, index_range=(lo, hi))
    with store.create(out, index.keys[lo:hi], d.grid(size), overwrite=overwrite, image_root=index.root,
                      **identity) as writer:
        start = writer.first_pending()
        if start == hi - lo:
            click.echo(f"{out} is already complete; nothing recomputed (pass --overwrite to start over)")
            return writer.counts()
        if start:
            click.echo(f"resuming {out} at image {start} of {hi - lo}")
        dataset = ImageLoading(index, lo + start, hi, discovery_transform(size, d.mean, d.std), size,
                               read=d.reads_images)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                             persistent_workers=False)
        position = start
        with tqdm(total=hi - lo, initial=start, unit="img", desc=f"{d.method} -> {out.name}") as bar:
            for imgs, errors in loader:
                readable = torch.tensor([not err for err in errors])
                maps = torch.zeros(len(imgs), *d.grid(size))
                if readable.any():
                    ids = lo + position + torch.arange(len(imgs))[readable]
                    maps[readable] = d(imgs[readable], keys=[index.keys[i] for i in ids],
                                       labels=torch.as_tensor(index.labels[ids.numpy()]))
                status = np.where(readable.numpy(), store.STATUS_DONE, store.STATUS_FAILED)
                reasons = getattr(d, "failures", {})  # why a method gave no map (oracle: the missing mask file)
                errors = [err or reasons.pop(index.keys[lo + position + j], "") for j, err in enumerate(errors)]
                writer.write(position, maps.numpy(), status, errors)
                position += len(imgs)
                bar.update(len(imgs))
        return writer.counts()


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--method", type=click.Choice(list(discovery.METHODS)),
              help="Discovery method; required unless a subcommand is given.")
@click.option("--backbone", help="timm model name (default: vit_small_patch16_224.dino; gradcam: "
                                 "tf_efficientnet_lite0). Any timm ViT or CNN, or an agmae-train checkpoint "
                                 "(RUN/checkpoint-last.pth, or an exported encoder): the project's own encoder.")
@click.option("--weights", type=path_type(exists=True, dir_okay=False),
              help="Checkpoint for the backbone: official DINO (teacher/student, module./backbone. prefixes) "
                   "or a timm state dict. Default: timm's pretrained weights (offline: the installed "
                   "EfficientNet-Lite0 only).")
@click.option("--random-init", is_flag=True, help="Random backbone weights from --seed, for smoke tests only.")
@click_option("seed", options.seed_option("Seed of --random-init."))
@options.dataset_options
@click.option("--out", type=path_type(dir_okay=False),
              help="Store to write (default: RUN_DIR/maps-<method>.h5). A shard writes OUT with "
                   ".shard-K-of-N before the suffix.")
@click.option("--image-size", type=click.IntRange(min=1),
              help="Images are resized whole to S×S; S must be a multiple of the patch (CNN: of 32). "
                   "Default: 224; 448 for tokencut on a CNN (measured best).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per forward pass.")
@click_option("workers", options.workers_option(4, "DataLoader processes decoding images."))
@click_option("device", options.device_option())
@click_option("precision", options.precision_option("Backbone autocast, recorded in the store's method options.",
                                                  choices=INFERENCE_PRECISIONS))
@click.option("--shard", help="K/N: compute only the K-th of N contiguous index ranges (K from 0). Default: "
                              "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set, else everything.")
@click.option("--overwrite", is_flag=True, help="Start over even if OUT exists (default: resume or report "
                                                "it complete).")
@click.option("--max-failures", type=click.FloatRange(0, 1), default=0.001, show_default=True,
              help="Exit non-zero when more than this fraction of the images failed (unreadable, non-finite map).")
@method_options
@click.pass_context
def main(ctx, method, backbone, weights, random_init, seed, data, train_split, out, image_size, batch_size, workers,
         device, precision, shard, overwrite, max_failures, **given):
    """Compute attention maps for every image of a folder into an attention store (HDF5).

    `agmae-discover --method tokencut` works as typed on the demo dataset. A killed run resumes where it
    stopped when re-run. Subcommands: `merge` (join shard stores) and `inspect` (summary, overlay PNG).
    """
    if ctx.invoked_subcommand is not None:
        return
    if method is None:
        raise click.UsageError("--method is required (tokencut, dino, gradcam or oracle)")
    options = chosen_options(method, given)
    shard = parse_shard(shard)
    out = out or maps_path(default_run_dir(), method)
    if shard:
        out = shard_path(out, *shard)
    try:
        images = split_folder(data, train_split) if data else None
        if method == "oracle" and "masks" not in options:
            options["masks"] = (data or ensure_demo()) / "masks" / train_split
        # The backbone comes first so that missing weights fail before the demo dataset is built.
        d = discovery.build(method, backbone=backbone, weights=weights, device=device,
                            random_init=random_init, seed=seed, precision=precision, **options)
        index = scan(images or split_folder(ensure_demo(), train_split))
        counts = compute_store(d, index, out, image_size or d.default_image_size, batch_size, workers, shard,
                               overwrite)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise environment_error(err) from None
    total = sum(counts.values())
    click.echo(f"{counts['done']} done, {counts['failed']} failed -> {out}")
    if counts["failed"] > max_failures * total:
        raise click.ClickException(f"{counts['failed']} of {total} images failed, more than --max-failures "
                                   f"{max_failures:g}; the reasons are in {out} (agmae-discover inspect)")


@main.command()
@click.argument("shards", nargs=-1, required=True, type=path_type(exists=True, dir_okay=False))
@click.option("--out", required=True, type=path_type(dir_okay=False), help="Merged store to write.")
def merge(shards, out):
    """Join finished shard stores SHARD... into one store OUT (checks they agree and cover every index once)."""
    try:
        store.merge(shards, out)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"merged {len(shards)} shards -> {out}")


def overlay_png(maps, images, path, columns=8):
    """Write a grid of maps (bilinear, jet) over their images; images may hold None (map alone)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return overlay_png_pil(maps, images, path, columns)
    rows = (len(maps) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, heat, image in zip(axes.flat, maps, images):
        extent = (0, 1, 1, 0)
        if image is not None:
            ax.imshow(image, extent=extent)
        ax.imshow(heat, cmap="jet", alpha=0.5 if image is not None else 1.0, vmin=0, vmax=1,
                  interpolation="bilinear", extent=extent)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def overlay_png_pil(maps, images, path, columns, tile=128):
    rows = (len(maps) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * tile))
    for i, (heat, image) in enumerate(zip(maps, images)):
        heat = Image.fromarray(np.uint8(np.asarray(heat, dtype=np.float32) * 255)).resize((tile, tile),
                                                                                          Image.BILINEAR)
        red = Image.merge("RGB", (heat, Image.new("L", heat.size), Image.new("L", heat.size)))
        base = image.resize((tile, tile)) if image is not None else Image.new("RGB", heat.size)
        sheet.paste(Image.blend(base, red, 0.5), ((i % columns) * tile, (i // columns) * tile))
    sheet.save(path)


def images_of(file, maps, data, split) -> Path:
    """The image folder the store's maps were computed on: --data's split, else the folder the store
    recorded; refused when its images are not the store's (drawing maps over other images says nothing)."""
    root = split_folder(data, split) if data else maps.attrs.get("image_root")
    if root is None:
        raise click.ClickException(f"{file} does not record its image folder; pass --data ROOT and "
                                   "--train-split, the split it was computed on")
    index = scan(root)
    lo, hi = maps.attrs["index_range"] or (0, len(index))
    if index.keys[lo:hi] != maps.keys:
        raise click.ClickException(f"{root} holds other images than {file} was computed on (keys differ); "
                                   "pass the --data and --train-split given to agmae-discover")
    return Path(root)


@main.command()
@click.argument("file", type=path_type(exists=True, dir_okay=False))
@click.option("--png", type=path_type(dir_okay=False), help="Also write a grid of maps overlaid on their images, "
                                                            "spread evenly over the store (so over its classes).")
@click.option("--count", type=click.IntRange(min=1), default=16, show_default=True, help="Maps in the --png grid.")
@options.dataset_options
def inspect(file, png, count, data, train_split):
    """Summarise an attention store: counts by status, histogram of map values, method options."""
    try:
        maps = store.open_maps(file)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    attrs = maps.attrs
    status = np.asarray(maps.status)
    counts = maps.counts()
    click.echo(f"{file}: {len(maps)} maps {attrs['grid'][0]}x{attrs['grid'][1]}, method {attrs['method']}, "
               f"backbone {attrs['backbone']}, image size {attrs['image_size']}"
               + (f", shard {attrs['shard']} of indices {attrs['index_range']}" if attrs["shard"] else ""))
    click.echo(f"status: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending")
    click.echo(f"method options: {json.dumps(attrs['method_options'], sort_keys=True)}")
    done = np.flatnonzero(status == store.STATUS_DONE)
    if done.size:
        histogram, edges = np.histogram(np.asarray(maps.maps[done], dtype=np.float32), bins=INSPECT_BINS,
                                        range=(0, 1))
        click.echo("map values:")
        for lo, hi, n in zip(edges[:-1], edges[1:], histogram):
            click.echo(f"  {lo:.1f}-{hi:.1f} {n:9d} {'#' * round(40 * n / histogram.max())}")
    failed = np.flatnonzero(status == store.STATUS_FAILED)
    for i in failed[:5]:
        click.echo(f"failed: {maps.keys[i]}: {maps.errors[i]}")
    if png:
        try:
            root = images_of(file, maps, data, train_split)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        shown = done[np.unique(np.linspace(0, len(done) - 1, min(count, len(done))).round().astype(int))]
        images = []
        for i in shown:
            try:
                images.append(load_rgb(root / maps.keys[i]))
            except IMAGE_ERRORS:
                images.append(None)
        overlay_png(np.asarray(maps.maps[shown], dtype=np.float32), images, png)
        click.echo(f"wrote {png}")


if __name__ == "__main__":
    main()
