"""Overhead of attention guidance on the training step and on the data loader.

For each model: a guided and a vanilla `Trainer` on the same synthetic image folder (same
seed, so the same initial weights), training steps interleaved (guided, vanilla, vanilla,
guided, ... so drift in machine load hits both alike), median step time of each, and the
loader's time per batch with maps / without maps (workers=0, so it is the per-batch work of
the process itself). Targets (SPEC: "negligible overhead"): step ratio <= 1.02, loader <= 1.05.
Also the vanilla step with timm's fused attention (scaled_dot_product_attention) on / off, which
decides the engine's default per device, and with --compile the compiled step (`agmae-train --compile`)
against the eager step with plain attention, the official MAE's (target <= 0.75), and the compile time.

    python benchmarks/train_bench.py                      # base/16 at 224 (batch 8) and the demo model
    python benchmarks/train_bench.py --quick              # fewer steps, smaller demo batch: checks it runs
    python benchmarks/train_bench.py --compile            # adds compiled vs eager (minutes of compiling)
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agmae.data.folder import scan
from agmae import distributed, store
from agmae.train.engine import TrainConfig, Trainer

CASES = {
    # model: (input size, source image size (h, w), image format, map grid of the store)
    "mae_vit_base_patch16": (224, (300, 400), "JPEG", (14, 14)),
    "mae_vit_demo_patch8": (64, (64, 64), "PNG", (8, 8)),
}


def make_dataset(root: Path, n_images: int, size_hw, image_format: str, grid) -> Path:
    """Textured random images in two classes, and a store of random maps for them."""
    rng = np.random.default_rng(0)
    suffix = ".jpg" if image_format == "JPEG" else ".png"
    for i in range(n_images):
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size_hw[0] // 8, size_hw[1] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size_hw[::-1], Image.BICUBIC).save(folder / f"{i:05d}{suffix}", image_format)
    index = scan(root / "images")
    maps_path = root / "maps-oracle.h5"
    with store.create(maps_path, index.keys, grid, method="oracle", backbone=None, weights_sha256=None,
                      image_size=max(size_hw), method_options={}) as writer:
        writer.write(0, rng.random((n_images, *grid), dtype=np.float32), np.ones(n_images, np.uint8))
    return maps_path


def interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, alternating which one goes first."""
    times = ([], [])
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            started = time.perf_counter()
            (first, second)[which]()
            times[which].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_model(model: str, batch_size: int, steps: int, tmp: Path, device_name: str, compiled: bool) -> dict:
    input_size, size_hw, image_format, grid = CASES[model]
    n_images = batch_size * (steps + 2)
    maps_path = make_dataset(tmp / model, n_images, size_hw, image_format, grid)
    env, device = distributed.init(device_name)
    common = dict(data=str(tmp / model), train_split="images", model=model, input_size=input_size, batch_size=batch_size,
                  workers=0, epochs=1, device=device.type)
    guided = Trainer(TrainConfig(out=str(tmp / model / "guided"), maps=str(maps_path), **common), env, device)
    vanilla = Trainer(TrainConfig(out=str(tmp / model / "vanilla"), **common), env, device)

    batches = {}
    for name, trainer in (("guided", guided), ("vanilla", vanilla)):
        trainer.sampler.set_epoch(0)
        batches[name] = next(iter(trainer.loader))
        trainer.ddp.train()
        trainer.train_step(batches[name], tau=0.75)  # warm-up: allocations, optimizer state

    def step(name, trainer):
        def run():
            trainer.train_step(batches[name], tau=0.75)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    guided_step, vanilla_step = interleaved_medians(step("guided", guided), step("vanilla", vanilla), steps)

    def vanilla_with_fused_attn(enabled):
        def run():
            vanilla.model.set_fused_attn(enabled)
            step("vanilla", vanilla)()
        return run

    fused_step, plain_attn_step = interleaved_medians(vanilla_with_fused_attn(True), vanilla_with_fused_attn(False),
                                                      steps)
    iterators = {}

    def next_batch(name, trainer):
        def run():
            if name not in iterators:
                iterators[name] = iter(trainer.loader)
            next(iterators[name])
        return run

    loader_maps, loader_plain = interleaved_medians(next_batch("guided", guided), next_batch("vanilla", vanilla),
                                                    min(steps, len(guided.loader)))
    results = {"guided_step_s": guided_step, "vanilla_step_s": vanilla_step, "step_ratio": guided_step / vanilla_step,
               "fused_attn_ratio": fused_step / plain_attn_step,
               "loader_maps_s": loader_maps, "loader_plain_s": loader_plain, "loader_ratio": loader_maps / loader_plain}
    if compiled:
        vanilla.model.set_fused_attn(False)  # the reference's plain attention, this engine's CPU default
        compiled_trainer = Trainer(TrainConfig(out=str(tmp / model / "compiled"), compile=True, **common), env, device)
        compiled_trainer.ddp.train()
        batches["compiled"] = batches["vanilla"]
        started = time.perf_counter()
        step("compiled", compiled_trainer)()  # the compilation happens on the first call
        results["compile_s"] = time.perf_counter() - started
        compiled_step, eager_step = interleaved_medians(step("compiled", compiled_trainer), step("vanilla", vanilla),
                                                        steps)
        results.update(compiled_step_s=compiled_step, eager_plain_step_s=eager_step,
                       compile_ratio=compiled_step / eager_step)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (and loader batches) per variant")
    parser.add_argument("--base-batch", type=int, default=8, help="batch size for mae_vit_base_patch16 at 224")
    parser.add_argument("--demo-batch", type=int, default=256, help="batch size for the demo model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="6 steps, demo batch 64: a check that it runs")
    parser.add_argument("--compile", action="store_true",
                        help="also agmae-train --compile against the eager step with plain attention (the "
                             "official MAE's), and the compile time; target <= 0.75")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.demo_batch = 6, 64
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for model, batch in (("mae_vit_base_patch16", args.base_batch), ("mae_vit_demo_patch8", args.demo_batch)):
            r = bench_model(model, batch, args.steps, Path(tmp), args.device, args.compile)
            print(f"{model} batch {batch}, {args.steps} steps each, {torch.get_num_threads()} CPU threads, "
                  f"device {args.device}:")
            print(f"  step   guided {r['guided_step_s'] * 1e3:8.1f} ms  vanilla {r['vanilla_step_s'] * 1e3:8.1f} ms"
                  f"  ratio {r['step_ratio']:.3f} (target <= 1.02)")
            print(f"  loader maps   {r['loader_maps_s'] * 1e3:8.1f} ms  plain   {r['loader_plain_s'] * 1e3:8.1f} ms"
                  f"  ratio {r['loader_ratio']:.3f} (target <= 1.05)")
            print(f"  vanilla step fused attention on / off: {r['fused_attn_ratio']:.3f}")
            if args.compile:
                print(f"  compiled {r['compiled_step_s'] * 1e3:8.1f} ms  eager (plain attention) "
                      f"{r['eager_plain_step_s'] * 1e3:8.1f} ms  ratio {r['compile_ratio']:.3f} (target <= 0.75); "
                      f"compiling took {r['compile_s']:.0f} s")
    distributed.shutdown()


if __name__ == "__main__":
    main()
