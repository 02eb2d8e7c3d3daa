"""Map quality of discovery settings on the demo dataset's `original` test split.

With the offline ImageNet EfficientNet-Lite0: `tokencut` over input sizes (64 px images up-sampled),
feature stages and both foreground rules, and `gradcam`; with `--encoder RUN/checkpoint-last.pth`, also
`tokencut` (last-block keys; and the mean-centred tokens of each `--encoder-layers` layer, border rule) and `dino`
(CLS attention) of the project's own encoder at `--encoder-sizes`;
each scored against the ground-truth masks
(ROOT/masks/original) by mean IoU (map up-sampled to the mask, thresholded at its mean) and pointing
accuracy (argmax on the object), next to a centre-prior baseline (eval.attention).

    python -m experiments.discovery_quality [--limit 500] [--sizes 224,448] [--stages bn2,blocks.5,blocks.4]
    python -m experiments.discovery_quality --encoder RUN/checkpoint-last.pth --stages blocks.5 --sizes 224,448
"""
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from agmae import discovery
from agmae.data.demo import ensure_demo, load_mask
from agmae.data.folder import load_rgb, scan
from agmae.data.transforms import discovery_transform
from agmae.discovery.base import normalise_maps, to_grid
from agmae.discovery.tokencut import FG_RULES, ncut
from agmae.eval.attention import centre_prior, map_scores

BACKBONE = "tf_efficientnet_lite0"


def batches(keys, root, size, mean, std, batch_size):
    transform = discovery_transform(size, mean, std)
    for lo in range(0, len(keys), batch_size):
        yield torch.stack([transform(load_rgb(root / key)) for key in keys[lo:lo + batch_size]])


def tokencut_maps(keys, root, size, stage, batch_size):
    """{fg_rule: maps [N, h, w]} for one (size, stage); the features are computed once for both rules."""
    d = discovery.build("tokencut", backbone=BACKBONE, layer=stage)
    grid = d.grid(size)
    maps = {rule: [] for rule in FG_RULES}
    for imgs in tqdm(batches(keys, root, size, d.mean, d.std, batch_size), total=-(-len(keys) // batch_size),
                     desc=f"tokencut {size}px {stage}", leave=False):
        with torch.no_grad():
            tokens = d.tokens(imgs)
        for rule in FG_RULES:
            eigvec, _ = ncut(tokens, tau=d.options["tau"], eps=d.options["eps"], fg_rule=rule, grid=grid)
            maps[rule].append(normalise_maps(to_grid(eigvec, grid)))
    return {rule: torch.cat(m) for rule, m in maps.items()}


# The own encoder's settings scored: each method's defaults, and TokenCut on the tokens of each --encoder-layers
# layer, mean-centred, with the border rule (an MAE's most distinctive token is often background, which misleads the
# seed rule).
def own_encoder_settings(layers):
    """{row name: (method, options)}."""
    cut = {f"tokencut {layer} centred border": ("tokencut", dict(layer=layer, center=True, fg_rule="border"))
           for layer in layers}
    return {"tokencut keys": ("tokencut", {}), **cut, "dino": ("dino", {})}


def encoder_label(checkpoint: Path) -> str:
    """RUN, or RUN/checkpoint-<epoch> for a kept checkpoint: the rows of two epochs of one run stay apart."""
    return checkpoint.parent.name + ("" if checkpoint.name == "checkpoint-last.pth" else f"/{checkpoint.stem}")


def own_encoder_maps(keys, root, checkpoint, method, size, batch_size, **options):
    """Maps of the project's own encoder (`--backbone RUN/checkpoint-last.pth`)."""
    d = discovery.build(method, backbone=str(checkpoint), **options)
    return torch.cat([d(imgs) for imgs in tqdm(batches(keys, root, size, d.mean, d.std, batch_size),
                                                total=-(-len(keys) // batch_size), desc=f"{method} {size}px",
                                                leave=False)])


def gradcam_maps(keys, root, size, batch_size):
    d = discovery.build("gradcam", backbone=BACKBONE)
    return torch.cat([d(imgs) for imgs in tqdm(batches(keys, root, size, d.mean, d.std, batch_size),
                                                total=-(-len(keys) // batch_size), desc=f"gradcam {size}px",
                                                leave=False)])


@click.command()
@click.option("--limit", type=click.IntRange(min=0), default=0,
              help="Score N test images, every k-th of the split so that all ten classes count (0: all).")
@click.option("--sizes", default="224,448", show_default=True, help="Input sizes S (64 px images up-sampled).")
@click.option("--stages", default="bn2,blocks.5,blocks.4", show_default=True, help="TokenCut feature layers.")
@click.option("--batch-size", type=int, default=50, show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Demo dataset root (default: the built-in one).")
@click.option("--encoder", "encoders", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also score tokencut and dino maps of this agmae-train checkpoint (repeatable).")
@click.option("--encoder-sizes", default="64,128", show_default=True, help="Input sizes for --encoder.")
@click.option("--encoder-layers", default="norm,blocks.3", show_default=True,
              help="Layers of --encoder whose tokens TokenCut cuts (norm: the final tokens; blocks.3: the demo "
                   "MAE's last block, before the final LayerNorm).")
@click.option("--no-cnn", is_flag=True, help="Skip the EfficientNet-Lite0 settings.")
def main(limit, sizes, stages, batch_size, data, encoders, encoder_sizes, encoder_layers, no_cnn):
    root = data or ensure_demo()
    keys = scan(root / "original").spread(limit)
    masks = np.stack([load_mask(root, "original", key) for key in keys])
    rows = []

    def score(name, maps):
        scores = map_scores(maps, masks)
        rows.append((name, scores["iou"].mean(), scores["pointing"].mean()))
        click.echo(f"{name:40s} IoU {rows[-1][1]:.3f}  pointing {rows[-1][2]:.3f}", err=True)

    score("centre prior (Gaussian, sigma 0.25)", np.broadcast_to(centre_prior(14, 14), (len(keys), 14, 14)))
    for checkpoint in encoders:
        for size in (int(s) for s in encoder_sizes.split(",")):
            for name, (method, options) in own_encoder_settings(encoder_layers.split(",")).items():
                maps = own_encoder_maps(keys, root / "original", checkpoint, method, size, batch_size, **options)
                score(f"{name} {size}px own {encoder_label(checkpoint)}", maps)
    for size in (() if no_cnn else (int(s) for s in sizes.split(","))):
        for stage in stages.split(","):
            for rule, maps in tokencut_maps(keys, root / "original", size, stage, batch_size).items():
                score(f"tokencut {size}px {stage} fg={rule}", maps)
        score(f"gradcam {size}px bn2 predicted", gradcam_maps(keys, root / "original", size, batch_size))
    print(f"\n{len(keys)} images of {root / 'original'}; CNN rows: {BACKBONE} (offline ImageNet weights)")
    print(f"{'setting':40s} {'mean IoU':>8s} {'pointing':>8s}")
    for name, iou, pointing in rows:
        print(f"{name:40s} {iou:8.3f} {pointing:8.3f}")


if __name__ == "__main__":
    main()
