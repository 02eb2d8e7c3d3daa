"""Overhead of attention guidance on the training step and on the data loader.

For each model: a guided and a vanilla `Trainer` on the same synthetic image folder (same
seed, so the same initial weights), training steps interleaved (guided, vanilla, vanilla,
guided, ... so drift in machine load hits both alike), median step time of each, and the
loader's time per batch with maps / without maps (workers=0, so it is the per-batch work of
the process itself). Targets (SPEC: "negligible overhead"): step ratio <= 1.02, loader <= 1.05.
To tell cost from noise, each adjacent guided/vanilla pair gives a ratio (median and 10-90 % spread
printed), beside the same figures for a second vanilla trainer against the first (an A/A control: its
spread is the noise), and the guided step's own extra work, timed alone: the loss with the maps'
weights plus the foreground share against the unweighted loss, on the step's real shapes.
Also the vanilla step with timm's fused attention (scaled_dot_product_attention) on / off, which
decides the engine's default per device, and with --compile the compiled step (`agmae-train --compile`)
against the eager step with plain attention, the official MAE's (target <= 0.75), and the compile time.

    python benchmarks/train_bench.py                      # base/16 at 224 (batch 8) and the demo model
    python benchmarks/train_bench.py --quick              # fewer steps, smaller demo batch: checks it runs
    python benchmarks/train_bench.py --models mae_vit_base_patch16 --base-batch 32 --steps 60   # guidance cost
    python benchmarks/train_bench.py --compile            # adds compiled vs eager (minutes of compiling)
    python benchmarks/train_bench.py --profile            # where the demo's fp32 step spends its time

--profile: the demo MAE's guided step (fp32, --demo-batch, 64 px) under torch.profiler: the top operators by self CPU
time and the shares of matrix products, normalisation, elementwise work, the optimizer and copies/allocation; then
the step at 1 thread against all of this process's threads, and AdamW's foreach and fused implementations against
the default one (bit-identical weights after a few steps? step time ratio). Then what bounds the demo on this CPU:
the floating-point rate (torch's FLOP counter over measured seconds) of the training step in fp32 and, where the
CPU computes bf16 natively, in bf16 (what `make demo` trains in there), and of the evaluation's forward (the frozen
encoder on all 64 patches, fp32, batch 128, as agmae-eval extracts); and the share of a trainer's time its own
loading takes when it has no loader workers, as each demo run pinned to one core has.
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
from agmae.data.transforms import normalise_images
from agmae.train import engine
from agmae.train.engine import TrainConfig, Trainer
from agmae.train.loss import foreground_weight_share, guided_mae_loss

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


def interleaved_times(first, second, repeats: int) -> tuple[list, list]:
    """Seconds of each call of two callables, alternating which one goes first."""
    times = ([], [])
    for i in range(repeats):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            started = time.perf_counter()
            (first, second)[which]()
            times[which].append(time.perf_counter() - started)
    return times


def interleaved_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, alternating which one goes first."""
    times = interleaved_times(first, second, repeats)
    return statistics.median(times[0]), statistics.median(times[1])


def pair_ratios(times) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) of the ratios of the pairs run back to back."""
    ratios = sorted(a / b for a, b in zip(*times))
    deciles = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
    return statistics.median(ratios), deciles[0], deciles[-1]


def guidance_extra_seconds(trainer, batch, tau: float, repeats: int) -> tuple[float, float]:
    """Median seconds of the guided step's loss (weights exp(a/τ)) plus its foreground share, and of the
    unweighted loss, on one forward's real prediction, target, mask and maps, without autograd."""
    device = trainer.device
    imgs = normalise_images(batch["img"].to(device))
    attn = batch["attn"].to(device)
    with torch.no_grad():
        pred, mask = trainer.model(imgs, trainer.cfg.mask_ratio, batch["noise"].to(device))
        target = trainer.model.patchify(imgs)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def guided():
        guided_mae_loss(pred, target, mask, attn, tau=tau)
        foreground_weight_share(mask, attn, tau)
        sync()

    def vanilla():
        guided_mae_loss(pred, target, mask)
        sync()

    return interleaved_medians(guided, vanilla, repeats)


def bench_model(model: str, batch_size: int, steps: int, tmp: Path, device_name: str, compiled: bool) -> dict:
    input_size, size_hw, image_format, grid = CASES[model]
    n_images = batch_size * (steps + 2)
    maps_path = make_dataset(tmp / model, n_images, size_hw, image_format, grid)
    env, device = distributed.init(device_name)
    common = dict(data=str(tmp / model), train_split="images", model=model, input_size=input_size, batch_size=batch_size,
                  workers=0, epochs=1, warmup_epochs=0, device=device.type)
    guided = Trainer(TrainConfig(out=str(tmp / model / "guided"), maps=str(maps_path), **common), env, device)
    vanilla = Trainer(TrainConfig(out=str(tmp / model / "vanilla"), **common), env, device)
    control = Trainer(TrainConfig(out=str(tmp / model / "control"), **common), env, device)

    batches = {}
    for name, trainer in (("guided", guided), ("vanilla", vanilla), ("control", control)):
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

    pairs = interleaved_times(step("guided", guided), step("vanilla", vanilla), steps)
    guided_step, vanilla_step = statistics.median(pairs[0]), statistics.median(pairs[1])
    control_pairs = interleaved_times(step("control", control), step("vanilla", vanilla), steps)
    extra_loss, plain_loss = guidance_extra_seconds(guided, batches["guided"], 0.75, steps)

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
               "pair_ratio": pair_ratios(pairs), "control_pair_ratio": pair_ratios(control_pairs),
               "guided_loss_s": extra_loss, "plain_loss_s": plain_loss,
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


# Operator groups of the profile, by the aten names they run as.
PROFILE_GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                        "aten::convolution_backward"),
    "layer norm, softmax, gelu": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::_softmax",
                                  "aten::_softmax_backward_data", "aten::gelu", "aten::gelu_backward"),
    "copies and allocation": ("aten::copy_", "aten::empty", "aten::empty_strided", "aten::clone", "aten::fill_",
                              "aten::zero_", "aten::cat", "aten::stack", "aten::gather", "aten::scatter_add_",
                              "aten::empty_like", "aten::_to_copy"),
}


def demo_trainer(tmp: Path, batch_size: int, name: str, optimizer: str | None = None,
                 precision: str = "fp32") -> tuple:
    """A guided demo-MAE Trainer (fp32 unless told) on 64-px PNGs with 8x8 maps, its first batch, and, with
    `optimizer` ("for-loop" or "fused"), AdamW switched from the trainer's `foreach` to that implementation over
    the same parameter groups."""
    data = tmp / "demo-data"
    maps_path = data / "maps-oracle.h5"
    if not maps_path.exists():
        make_dataset(data, batch_size * 2, (64, 64), "PNG", (8, 8))
    env, device = distributed.init("cpu")
    cfg = TrainConfig(data=str(data), train_split="images", model="mae_vit_demo_patch8", input_size=64,
                      batch_size=batch_size, workers=0, epochs=1, warmup_epochs=0, device="cpu", precision=precision,
                      maps=str(maps_path), out=str(tmp / name))
    trainer = Trainer(cfg, env, device)
    if optimizer:
        trainer.optimizer = torch.optim.AdamW(
            [{"params": group["params"], "weight_decay": group["weight_decay"]}
             for group in trainer.optimizer.param_groups], lr=trainer.lr, betas=engine.ADAMW_BETAS,
            **({"foreach": False} if optimizer == "for-loop" else {optimizer: True}))
    trainer.sampler.set_epoch(0)
    trainer.ddp.train()
    return trainer, next(iter(trainer.loader))


def profile_demo_step(batch_size: int, steps: int, tmp: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    trainer, batch = demo_trainer(tmp, batch_size, "profiled")
    for _ in range(2):
        trainer.train_step(batch, tau=0.75)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step(batch, tau=0.75)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"mae_vit_demo_patch8 guided step, fp32, batch {batch_size}, {torch.get_num_threads()} threads, "
          f"{steps} profiled steps: {total / steps / 1e3:.0f} ms self CPU per step, "
          f"{sum(e.count for e in events) / steps:.0f} operator calls per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=36))
    optimizer_ops = {e.key for e in events if e.key.startswith("aten::_foreach") or e.key.startswith("aten::_fused")}
    groups = {**PROFILE_GROUPS, "optimizer (foreach/fused kernels)": tuple(optimizer_ops)}
    for name, keys in groups.items():
        print(f"  {name:36s} {sum(e.self_cpu_time_total for e in events if e.key in keys) / total:6.1%}")

    def timed(trainer, batch):
        def run():
            trainer.train_step(batch, tau=0.75)
        return run

    threads = torch.get_num_threads()

    def at_threads(n):
        def run():
            torch.set_num_threads(n)
            trainer.train_step(batch, tau=0.75)
        return run

    if threads > 1:
        one, many = interleaved_medians(at_threads(1), at_threads(threads), steps)
        torch.set_num_threads(threads)
        print(f"  step at 1 thread / at {threads}: {one / many:.2f}")
    runs = {}
    for kind in (None, "for-loop", "fused"):
        trainer, batch = demo_trainer(tmp, batch_size, f"opt-{kind}", kind)
        for _ in range(3):
            trainer.train_step(batch, tau=0.75)
        runs[kind] = (trainer, batch, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    for kind in ("for-loop", "fused"):
        same = all(torch.equal(runs[None][2][k], runs[kind][2][k]) for k in runs[None][2])
        seconds = interleaved_medians(timed(*runs[kind][:2]), timed(*runs[None][:2]), steps)
        print(f"  AdamW {kind} / foreach (the default) step: {seconds[0] / seconds[1]:.3f}; weights after 3 steps "
              f"{'bit-identical' if same else 'differ'}")
    compute_rates(tmp, batch_size, steps)


def flops_and_seconds(run, repeats: int) -> tuple[int, float]:
    """Floating-point operations of one call (torch's FLOP counter) and its median seconds over `repeats` calls."""
    from torch.utils.flop_counter import FlopCounterMode

    run()
    with FlopCounterMode(display=False) as counter:
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return counter.get_total_flops(), statistics.median(times)


def compute_rates(tmp: Path, batch_size: int, steps: int) -> None:
    """GFLOP/s of the demo's training step (fp32, and bf16 where native) and of its evaluation forward, and the
    loader's share of a trainer without loader workers."""
    from timm.models.vision_transformer import VisionTransformer

    from agmae.hardware import resolve_precision
    from agmae.train.model import MODELS

    threads = torch.get_num_threads()
    precisions = dict.fromkeys(["fp32", resolve_precision("native", torch.device("cpu"))])
    for precision in precisions:
        trainer, batch = demo_trainer(tmp, batch_size, f"rate-{precision}", precision=precision)
        flops, seconds = flops_and_seconds(lambda: trainer.train_step(batch, tau=0.75), steps)
        _, loading = flops_and_seconds(lambda: [None for _ in trainer.loader], steps)
        loading /= len(trainer.loader)
        print(f"  training step, {precision}: {flops / batch_size / 1e6:.0f} MFLOP an image, "
              f"{flops / seconds / 1e9:.1f} GFLOP/s on {threads} threads ({batch_size / seconds:.0f} images/s); "
              f"loading in the trainer's process {loading * 1e3:.0f} ms a batch, "
              f"{loading / (loading + seconds):.0%} of a trainer's time with no loader workers")
    encoder_options = {k: v for k, v in MODELS["mae_vit_demo_patch8"].items() if not k.startswith("decoder_")}
    encoder = VisionTransformer(**encoder_options, num_classes=0).eval()
    images = torch.randn(128, 3, encoder_options["img_size"], encoder_options["img_size"])
    with torch.inference_mode():
        flops, seconds = flops_and_seconds(lambda: encoder.forward_features(images), steps)
    print(f"  evaluation forward, fp32 (all patches): {flops / len(images) / 1e6:.0f} MFLOP an image, "
          f"{flops / seconds / 1e9:.1f} GFLOP/s on {threads} threads ({len(images) / seconds:.0f} images/s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (and loader batches) per variant")
    parser.add_argument("--base-batch", type=int, default=8, help="batch size for mae_vit_base_patch16 at 224")
    parser.add_argument("--demo-batch", type=int, default=256, help="batch size for the demo model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="6 steps, demo batch 64: a check that it runs")
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--profile", action="store_true",
                        help="profile the demo MAE's fp32 step (--demo-batch, --steps profiled steps) instead")
    parser.add_argument("--compile", action="store_true",
                        help="also agmae-train --compile against the eager step with plain attention (the "
                             "official MAE's), and the compile time; target <= 0.75")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.demo_batch = 6, 64
    torch.manual_seed(0)
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            profile_demo_step(args.demo_batch, min(args.steps, 10), Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        batches = {"mae_vit_base_patch16": args.base_batch, "mae_vit_demo_patch8": args.demo_batch}
        for model in args.models:
            batch = batches[model]
            r = bench_model(model, batch, args.steps, Path(tmp), args.device, args.compile)
            print(f"{model} batch {batch}, {args.steps} steps each, {torch.get_num_threads()} CPU threads, "
                  f"device {args.device}:")
            print(f"  step   guided {r['guided_step_s'] * 1e3:8.1f} ms  vanilla {r['vanilla_step_s'] * 1e3:8.1f} ms"
                  f"  ratio {r['step_ratio']:.3f} (target <= 1.02)")
            print("  pairs  guided / vanilla {:.3f} (10-90 %: {:.3f}-{:.3f}); A/A control vanilla / vanilla {:.3f} "
                  "({:.3f}-{:.3f})".format(*r["pair_ratio"], *r["control_pair_ratio"]))
            print(f"  guidance's own work: loss with map weights + foreground share {r['guided_loss_s'] * 1e3:.2f} ms, "
                  f"unweighted loss {r['plain_loss_s'] * 1e3:.2f} ms "
                  f"({(r['guided_loss_s'] - r['plain_loss_s']) / r['vanilla_step_s']:.2%} of the vanilla step)")
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
