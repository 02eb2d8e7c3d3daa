"""`agmae-train`: guided (or vanilla) MAE pre-training, and `agmae-train export` of the encoder.

With no arguments it trains the demo model on the built-in demo dataset, guided by the map
store that `agmae-discover` left in the default run directory, and resumes a run found there.
Under `torchrun` or `srun` every process runs this same command (rank 0 writes the files).
"""
from pathlib import Path

import click

from agmae.checkpoint import export_encoder
from agmae.hardware import cpu_has_native_bf16, default_workers
from agmae.paths import default_maps, default_run_dir, last_checkpoint

# Recipe defaults: the demo dataset's calibration (ARCHITECTURE.md) and the MAE paper's recipe
# for user datasets. Options left unset take the value of the recipe that fits --data.
DEMO_RECIPE = dict(model="mae_vit_demo_patch8", epochs=30, warmup_epochs=2.0, batch_size=256, blr=1e-3)
PAPER_RECIPE = dict(model="mae_vit_base_patch16", epochs=800, warmup_epochs=40.0, batch_size=64, blr=1.5e-4)


def _recipe_help(name: str, text: str) -> str:
    return f"{text} [default: {DEMO_RECIPE[name]} on the demo dataset, {PAPER_RECIPE[name]} with --data]"


TRAIN_OPTIONS = [
    click.option("--maps", type=click.Path(path_type=Path, dir_okay=False),
                 help="Attention store (agmae-discover's output) that weights the loss. "
                      "[default: the best store in the default run directory]"),
    click.option("--no-guidance", is_flag=True,
                 help="Train the vanilla MAE (uniform weights, no store), through the same code."),
    click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False),
                 help="Image folder ROOT/<class>/<image> the maps were computed on. "
                      "[default: the built-in demo dataset's train split]"),
    click.option("--model", help=_recipe_help("model", "MAE preset, mae_vit_{tiny,small,base,large,huge}_patch{16,14,8} "
                                                       "or mae_vit_demo_patch8.")),
    click.option("--input-size", type=click.IntRange(min=1),
                 help="Training image size in pixels. [default: the preset's, 224 or 64 for the demo preset]"),
    click.option("--patch-size", type=click.IntRange(min=1), help="Override the preset's patch size."),
    click.option("--embed-dim", type=click.IntRange(min=4), help="Override the preset's encoder width."),
    click.option("--depth", type=click.IntRange(min=1), help="Override the preset's encoder depth."),
    click.option("--num-heads", type=click.IntRange(min=1), help="Override the preset's encoder head count."),
    click.option("--decoder-embed-dim", type=click.IntRange(min=4), help="Override the decoder width (default 512)."),
    click.option("--decoder-depth", type=click.IntRange(min=1), help="Override the decoder depth (default 8)."),
    click.option("--decoder-num-heads", type=click.IntRange(min=1), help="Override the decoder head count (default 16)."),
    click.option("--fused-attn/--no-fused-attn", default=None,
                 help="Use torch's scaled_dot_product_attention. [default: on for CUDA, off on CPU, where "
                      "matmul-softmax attention is faster at a few dozen tokens]"),
    click.option("--epochs", type=click.IntRange(min=1), help=_recipe_help("epochs", "Training epochs.")),
    click.option("--warmup-epochs", type=click.FloatRange(min=0),
                 help=_recipe_help("warmup_epochs", "Epochs of linear learning-rate warm-up (per iteration).")),
    click.option("--batch-size", type=click.IntRange(min=1),
                 help=_recipe_help("batch_size", "Images per process and step.")),
    click.option("--accum-iter", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Gradient accumulation: micro-batches per optimizer step."),
    click.option("--blr", type=click.FloatRange(min=0, min_open=True),
                 help=_recipe_help("blr", "Base learning rate; lr = blr x effective batch / 256.")),
    click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True,
                 help="AdamW weight decay (none on norms, biases and tokens)."),
    click.option("--clip-grad", type=click.FloatRange(min=0, min_open=True),
                 help="Clip the gradient norm to this value. [default: no clipping]"),
    click.option("--mask-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True,
                 help="Share of patches masked per image."),
    click.option("--tau-start", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                 help="Temperature τ of the loss weights exp(a/τ) at the first step."),
    click.option("--tau-end", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
                 help="τ at the last step (cosine schedule)."),
    click.option("--tau-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
                 help="Half-cycle cosine from --tau-start to --tau-end, or --tau-start throughout."),
    click.option("--weight-norm", type=click.Choice(["batch", "sample", "none"]), default="batch", show_default=True,
                 help="Loss normalisation: Σmwe/Σmw over the batch, per image then averaged, or γΣmwe/Σm (paper)."),
    click.option("--gamma", type=float, default=1.0, show_default=True, help="γ of --weight-norm none."),
    click.option("--require-maps", is_flag=True,
                 help="Fail when a training image's map is missing or failed (default: train it unguided)."),
    click.option("--save-every", type=click.IntRange(min=1), default=5, show_default=True,
                 help="Write RUN_DIR/checkpoint-last.pth every this many epochs (and at the end)."),
    click.option("--keep-every", type=click.IntRange(min=0), default=0, show_default=True,
                 help="Also keep RUN_DIR/checkpoint-<epoch>.pth every this many epochs, for evaluating the "
                      "encoder along training (0: keep only checkpoint-last.pth)."),
    click.option("--out", type=click.Path(path_type=Path, file_okay=False),
                 help="Run directory for checkpoints, metrics.jsonl, config.json. [default: AGMAE_RUN_DIR, "
                      "else AGMAE_HOME/runs/default]"),
    click.option("--resume", type=click.Path(path_type=Path, dir_okay=False),
                 help="Checkpoint to resume from. [default: RUN_DIR/checkpoint-last.pth when present]"),
    click.option("--workers", type=click.IntRange(min=0), default=default_workers(), show_default=True,
                 help="DataLoader worker processes per training process."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seeds initialisation, data order, crops, flips and masks (runs are reproducible)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="auto = CUDA when available."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                 help="Autocast precision. auto: bf16 (else fp16 with loss scaling) on CUDA, fp32 on CPU. "
                      "[default: auto; on the demo dataset, training on a CPU with native bf16 (AVX512-BF16/AMX): bf16, "
                      "which halves the step time there]"),
]


def train_options(func):
    for option in reversed(TRAIN_OPTIONS):
        func = option(func)
    return func


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@train_options
@click.pass_context
def main(ctx, **options):
    """Pre-train an MAE whose reconstruction loss is weighted by attention maps (AttG).

    Run with no arguments to train the demo model on the demo dataset with the maps that
    `agmae-discover` wrote to the default run directory.
    """
    if ctx.invoked_subcommand is not None:
        return
    from agmae.train.engine import NonFiniteLossError, train  # torch-heavy: not needed for export or --help

    try:
        metrics = train(_config(**options))
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        raise click.ClickException(str(err)) from err
    if metrics is None:
        click.echo("nothing to train: the checkpoint in the run directory already reached --epochs")


def demo_precision(device: str) -> str:
    """The demo dataset's precision when none is given: bf16 where training runs on a CPU with native
    bf16 (half the step time there), else auto (bf16, or fp16 with loss scaling, on a GPU)."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return "bf16" if on_cpu and cpu_has_native_bf16() else "auto"


def _config(maps, no_guidance, data, out, **options):
    """TrainConfig from the CLI options: recipe defaults, default paths, the demo dataset."""
    from agmae.data.demo import ensure_demo
    from agmae.train.engine import TrainConfig

    if maps is not None and no_guidance:
        raise click.UsageError("--maps and --no-guidance exclude each other")
    recipe = DEMO_RECIPE if data is None else PAPER_RECIPE
    for name, value in recipe.items():
        if options[name] is None:
            options[name] = value
    if data is None:
        data = ensure_demo() / "train"
        options["precision"] = options["precision"] or demo_precision(options["device"])
    options["precision"] = options["precision"] or "auto"
    if not no_guidance and maps is None:
        maps = default_maps(default_run_dir())
    return TrainConfig(data=str(data), out=str(out or default_run_dir()), maps=None if no_guidance else str(maps),
                       **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False),
              help="Training checkpoint. [default: the default run directory's checkpoint-last.pth]")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Output file: a timm VisionTransformer state dict (its kwargs go to OUT.json).")
def export(checkpoint, out):
    """Write the encoder alone, loadable by timm.create_model(..., num_classes=0).load_state_dict."""
    checkpoint = checkpoint or last_checkpoint(default_run_dir())
    try:
        export_encoder(checkpoint, out)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out} (+ {out.name}.json)")


if __name__ == "__main__":
    main()
