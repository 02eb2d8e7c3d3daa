"""Discovery throughput: ViT-S/16 at 224, batch 32, random weights (speed does not depend on them).

Measures images/s of the backbone forward alone, of `dino`, `tokencut` and `gradcam`, and of a
reference-style TokenCut (one image at a time, scipy's generalised `eigh` per image, as the
original TokenCut code does), and prints the ratios against their targets:
tokencut ≤ 1.15× and dino ≤ 1.05× the forward time, gradcam ≤ 3.5×, tokencut ≥ 2× the reference.

    python benchmarks/discovery_bench.py [--iters 5] [--device auto]
"""
import statistics
import time
import warnings

import click
import numpy as np
import scipy.linalg
import torch

from agmae import discovery
from agmae.discovery.backbones import RandomInitWarning, capture_output

BACKBONE = "vit_small_patch16_224.dino"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, iters, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_tokencut(backbone, image, tau=0.2, eps=1e-5):
    """One image the way the original TokenCut code does it: keys on the device, the cut in scipy."""
    attn = backbone.model.blocks[-1].attn
    with torch.no_grad(), capture_output(attn.qkv) as taken, backbone.autocast():
        backbone.model.forward_features(backbone.prepare(image))
    qkv = taken[0].float()
    keys = qkv.reshape(*qkv.shape[:2], 3, -1)[0, backbone.model.num_prefix_tokens:, 1].cpu().numpy()
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    weights = np.where(keys @ keys.T > tau, 1.0, eps)
    degree = np.diag(weights.sum(1))
    _, vectors = scipy.linalg.eigh(degree - weights, degree, subset_by_index=[1, 2])
    second = vectors[:, 0]
    foreground = second > second.mean()
    if not foreground[np.argmax(np.abs(second))]:
        second = -second
    return second


@click.command()
@click.option("--iters", type=int, default=5, show_default=True, help="Timed batches per method (median kept).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--reference-images", type=int, default=32, show_default=True,
              help="Images for the one-at-a-time reference TokenCut.")
@click.option("--device", default="auto", show_default=True)
def main(iters, batch_size, image_size, reference_images, device):
    warnings.simplefilter("ignore", RandomInitWarning)
    torch.manual_seed(0)
    methods = {name: discovery.build(name, backbone=BACKBONE, random_init=True, device=device)
               for name in ("dino", "tokencut", "gradcam")}
    backbone = methods["dino"].backbone
    device = backbone.device
    imgs = torch.randn(batch_size, 3, image_size, image_size, device=device)

    def forward_only():
        with torch.no_grad(), backbone.autocast():
            backbone.model.forward_features(backbone.prepare(imgs))

    seconds = {"forward": seconds_per_call(forward_only, device, iters)}
    for name, d in methods.items():
        seconds[name] = seconds_per_call(lambda: d(imgs), device, iters)
    reference_imgs = imgs[:1].expand(reference_images, -1, -1, -1)
    reference = seconds_per_call(lambda: [reference_tokencut(backbone, image[None]) for image in reference_imgs],
                                 device, max(1, iters // 2))
    print(f"{BACKBONE} (random init), {image_size}px, batch {batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {iters}")
    for name, value in seconds.items():
        print(f"  {name:10s} {batch_size / value:8.1f} img/s  ({value:.3f} s/batch)")
    print(f"  {'reference':10s} {reference_images / reference:8.1f} img/s  (TokenCut one image at a time, scipy eigh)")
    for name, target in (("dino", 1.05), ("tokencut", 1.15), ("gradcam", 3.5)):
        ratio = seconds[name] / seconds["forward"]
        print(f"{name} / forward time: {ratio:.3f} (target <= {target}) {'ok' if ratio <= target else 'MISSED'}")
    speedup = (batch_size / seconds["tokencut"]) / (reference_images / reference)
    print(f"tokencut / reference img/s: {speedup:.2f} (target >= 2) {'ok' if speedup >= 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
