"""`agmae-train`: guided (or vanilla) MAE pre-training, and `agmae-train export` of the encoder.

With no arguments it trains the demo model on the built-in demo dataset, guided by the map
store that `agmae-discover` left in the default run directory, and resumes a run found there.
Under `torchrun` or `srun` every process runs this same command (rank 0 writes the files).
"""
from pathlib import Path

import click

from agmae.checkpoint import export_encoder
from agmae.cli.errors import demo_data_at_the_door, user_errors
from agmae.options import click_options
from agmae.paths import default_maps, default_run_dir, last_checkpoint
from agmae.train.config import RECIPES, TrainConfig


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--no-guidance", is_flag=True,
              help="Train the vanilla MAE (uniform weights, no store), through the same code.")
@click_options(TrainConfig)
@click.pass_context
def main(ctx, no_guidance, **options):
    """Pre-train an MAE whose reconstruction loss is weighted by attention maps (AttG).

    Run with no arguments to train the demo model on the demo dataset with the maps that
    `agmae-discover` wrote to the default run directory.
    """
    if ctx.invoked_subcommand is not None:
        return
    from agmae.train.engine import train  # torch-heavy: not needed for export or --help

    with user_errors():
        metrics = train(config_from_options(no_guidance, **options))
    if metrics is None:
        click.echo("nothing to train: the checkpoint in the run directory already reached --epochs")


def config_from_options(no_guidance: bool, **options) -> TrainConfig:
    """TrainConfig from the command line: --no-guidance, or the given store, or the default run directory's."""
    if options["maps"] is not None and no_guidance:
        raise click.UsageError("--maps and --no-guidance exclude each other")
    if not no_guidance and options["maps"] is None:
        options["maps"] = str(default_maps(default_run_dir()))
    config = TrainConfig(**options)  # every option checked before the demo dataset is built
    if options["data"] is not None:
        return config
    recipe = {name: value for name, value in RECIPES["demo"].items() if options[name] is None}
    config = TrainConfig(**{**options, **recipe, "data": demo_data_at_the_door(None)})
    click.echo("the demo recipe: " + ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in recipe.items()),
               err=True)
    return config


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path, dir_okay=False),
              help="Training checkpoint. [default: the default run directory's checkpoint-last.pth]")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Output file: a timm VisionTransformer state dict carrying its kwargs (also written to OUT.json).")
def export(checkpoint, out):
    """Write the encoder alone, loadable by timm.create_model(..., num_classes=0).load_state_dict."""
    checkpoint = checkpoint or last_checkpoint(default_run_dir())
    with user_errors():
        export_encoder(checkpoint, out)
    click.echo(f"wrote {out} (+ {out.name}.json)")


if __name__ == "__main__":
    main()
