"""TokenCut's cut against its backbone's forward, exact vs iterative Fiedler solver, measured in one run.

For ViT-S/16 and ViT-S/8 at 224 px (196 and 784 tokens, random weights: speed does not depend on them)
and EfficientNet-Lite0's blocks.5 at 448 px (196 cells, the CNN default; on noise and on demo images), one
batch: the backbone forward that makes the graph nodes, the exact solve (float64: one batched eigh on a GPU,
LAPACK's single-eigenvector driver per graph on a CPU), the iterative one (float32 subspace iteration, exact
fallback included) and one batched float64 torch eigh of all eigenvectors (`fiedler_batched`). Prints ms per
batch and the ratios TokenCut / forward = (forward + graph + solve) / forward for both solvers, iterative / exact
and batched / exact.
Targets (issue 15): TokenCut <= 1.15x forward at 196 tokens, <= 1.5x at 784.

    python benchmarks/fiedler_bench.py [--batch 32] [--iters 3] [--device auto] [--vits-only]
    python benchmarks/fiedler_bench.py --smoke        # batch 4, one iteration, ViT-S/16 only: checks it runs
"""
import statistics
import time
import warnings

import click
import torch

from agmae import discovery
from agmae.data.demo import ensure_demo
from agmae.data.folder import load_rgb, scan
from agmae.data.transforms import discovery_transform
from agmae.discovery.backbones import RandomInitWarning
from agmae.discovery.tokencut import fiedler, fiedler_batched, graph_weights

# Solve times depend on the graph: a random-weight ViT on noise gives near-complete graphs, whose repeated
# eigenvalues a full eigendecomposition deflates cheaply. The real-weight backbone is also timed on demo images.
CASES = {  # name -> (backbone, image size, build options, demo images instead of noise)
    "ViT-S/16 @224 (196 tokens)": ("vit_small_patch16_224", 224, dict(random_init=True), False),
    "ViT-S/8 @224 (784 tokens)": ("vit_small_patch8_224", 224, dict(random_init=True), False),
    "Lite0 blocks.5 @448 (196 cells)": ("tf_efficientnet_lite0", 448, {}, False),
    "Lite0 blocks.5 @448, demo images": ("tf_efficientnet_lite0", 448, {}, True),
}


def demo_images(batch, size, discoverer):
    """`batch` training images of the demo dataset, spread over its classes, as the discoverer reads them."""
    root = ensure_demo() / "train"
    transform = discovery_transform(size, discoverer.mean, discoverer.std)
    return torch.stack([transform(load_rgb(root / key)) for key in scan(root).spread(batch)])


def median_seconds(fn, device, iters):
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@click.command()
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--vits-only", is_flag=True, help="the random-weight ViT cases only (no EfficientNet weights needed)")
@click.option("--smoke", is_flag=True, help="batch 4, one iteration, the ViT-S/16 case only")
def main(batch, iters, device, vits_only, smoke):
    warnings.simplefilter("ignore", RandomInitWarning)
    cases = dict(list(CASES.items())[:1 if smoke else 2 if vits_only else len(CASES)])
    if smoke:
        batch, iters = 4, 1
    print(f"{'case':32s} {'forward':>9s} {'exact':>9s} {'iter.':>9s} {'batched':>9s} {'TC/fwd exact':>13s} "
          f"{'TC/fwd iter.':>13s} {'iter./exact':>11s} {'batched/exact':>12s}")
    for name, (backbone, size, options, real_images) in cases.items():
        d = discovery.build("tokencut", backbone=backbone, device=device, **options)
        dev = d.backbone.device
        imgs = (demo_images(batch, size, d) if real_images else torch.randn(batch, 3, size, size)).to(dev)
        with torch.no_grad():
            tokens = d.tokens(imgs)
            forward = median_seconds(lambda: d.tokens(imgs), dev, iters)
            tau = d.options["tau"]
            dtypes = {"exact": torch.float64, "iterative": torch.float32}
            solve = {solver: median_seconds(lambda s=solver: fiedler(graph_weights(tokens, tau, dtype=dtypes[s]), s),
                                            dev, iters) for solver in dtypes}
            solve["batched eigh"] = median_seconds(lambda: fiedler_batched(graph_weights(tokens, tau)), dev, iters)
        ms = {key: 1000 * value for key, value in (("forward", forward), *solve.items())}
        print(f"{name:32s} {ms['forward']:8.1f}ms {ms['exact']:8.1f}ms {ms['iterative']:8.1f}ms "
              f"{ms['batched eigh']:8.1f}ms {(forward + solve['exact']) / forward:12.2f}x "
              f"{(forward + solve['iterative']) / forward:12.2f}x {solve['iterative'] / solve['exact']:10.2f}x "
              f"{solve['batched eigh'] / solve['exact']:11.2f}x")


if __name__ == "__main__":
    main()
