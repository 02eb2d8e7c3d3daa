"""`agmae-eval`: frozen-feature evaluation of a checkpoint (docs/METHOD.md#evaluation-protocols).

A thin adapter over `agmae.eval.jobs`: each subcommand builds the steps of an `EvalJob` from options defined once
in agmae.eval. With no --data it runs on the built-in demo dataset (train = bank / probe set, `original` =
queries). Every command updates its own key of RUN_DIR/results.json (atomically) and prints a compact table.
Distributed: launch with torchrun/srun; extraction and the augmented linear probe use every rank, rank 0 writes.
"""
from pathlib import Path

import click

from agmae import distributed, options
from agmae.cli.errors import demo_data_at_the_door, user_errors
from agmae.eval import jobs, visualize
from agmae.eval.finetune import FinetuneOptions
from agmae.eval.protocols import AttentionOptions, FeatureOptions, KnnOptions, ProbeOptions
from agmae.eval.segment import SegmentOptions
from agmae.eval.visualize import VisualizeOptions
from agmae.options import click_option, click_options, compose, run_dir_option

checkpoint_option = click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help=(
    "agmae-train checkpoint or exported timm ViT state dict. [default: RUN_DIR/checkpoint-last.pth]"))
run_dir_opt = click_option("run_dir", run_dir_option(
    "Where results.json is written (and the default checkpoint and map stores are found). [default: the checkpoint's "
    "folder if --checkpoint is given, else AGMAE_RUN_DIR, else AGMAE_HOME/runs/default]"))
dataset_options = compose(options.dataset_options, click.option(
    "--demo-correlation", type=click.FloatRange(0, 1), default=0.0, show_default=True,
    help="Background-class correlation of the demo dataset used when --data is not given (> 0 adds the mixed-same "
         "split and the BG-gap)."))
test_split_option = click.option("--test-split", help=(
    "Split used as queries / test set. [default: 'original' where ROOT has it (demo), else 'val']"))
splits_option = click.option("--splits", multiple=True, help=(
    "Test splits (repeat the option); they must share the train split's class names. [default: those of original, "
    "mixed-rand, only-fg, mixed-same that exist under the dataset root]"))
robustness_options = compose(splits_option, click.option(
    "--clean-fg/--no-clean-fg", default=True, show_default=True,
    help="Also the clean-fg k-NN diagnostic (only-fg queries against the training objects on black, train-fg), where "
         "the dataset has both splits: one more pass over a training-sized split."))
encoder_options = compose(checkpoint_option, run_dir_opt, dataset_options, click_options(FeatureOptions))
common_options = compose(encoder_options, test_split_option)


def take(opts: dict, cls):
    """The options of dataclass `cls` out of a subcommand's keyword arguments, as an instance."""
    return cls(**{name: opts.pop(name) for name in cls.__dataclass_fields__ if name in opts})


def run(steps, opts: dict, device: str | None = None) -> None:
    """Run `steps` as one EvalJob on --data (or the demo dataset, chosen here); device: when the steps take no
    feature options (whose --device then decides)."""
    features = take(opts, FeatureOptions) if "pool" in opts else None
    env, device = distributed.init(device or (features.device if features else "auto"))
    try:
        with user_errors():
            root = demo_data_at_the_door(opts["data"], correlation=opts["demo_correlation"])
            jobs.EvalJob(root, opts.get("checkpoint"), opts["run_dir"], opts["train_split"], opts.get("test_split"),
                         features, env, device).run(steps, click.echo)
    finally:
        distributed.shutdown()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate a frozen encoder: k-NN, linear probe, retrieval, background robustness, attention quality, dense
    probe, fine-tuning, and the figure of what the MAEs reconstruct and attend to."""


@main.command()
@common_options
@click_options(KnnOptions)
def knn(**opts):
    """Weighted k-NN (DINO protocol): top-1/top-5 for each --k."""
    run([jobs.knn_step(take(opts, KnnOptions))], opts)


@main.command()
@common_options
@click_options(ProbeOptions)
def linear(**opts):
    """Linear probe (MAE protocol: BN + Linear, LARS, warm-up + cosine); --mode cached for the fast variant."""
    run([jobs.linear_step(take(opts, ProbeOptions))], opts)


@main.command()
@common_options
def retrieval(**opts):
    """Retrieval of the train split by each test image: mAP, Recall@1, Recall@5 (same class = relevant)."""
    run([jobs.retrieval_step()], opts)


@main.command()
@encoder_options
@robustness_options
@click_options(KnnOptions)
@click_options(ProbeOptions, exclude=("mode",))
def robustness(**opts):
    """Accuracy on background-changed splits (k-NN + cached-feature linear), BG-gap, clean-fg k-NN."""
    run([jobs.robustness_step(opts.pop("splits"), opts.pop("clean_fg"), take(opts, KnnOptions),
                              take(opts, ProbeOptions))], opts)


@main.command()
@run_dir_opt
@dataset_options
@click_options(AttentionOptions)
def attention(**opts):
    """Mean IoU and pointing accuracy of map stores against ground-truth masks, plus a centre-prior row."""
    run([jobs.attention_step(take(opts, AttentionOptions))], opts, "cpu")


@main.command()
@checkpoint_option
@run_dir_opt
@dataset_options
@test_split_option
@click_options(FinetuneOptions)
def finetune(**opts):
    """MAE fine-tuning of the whole encoder: layer-wise lr decay, drop path, Mixup/CutMix, label smoothing,
    RandAugment, random erasing, AdamW, warm-up + cosine; top-1/top-5 on the test split and on every background
    split. Resumes RUN_DIR/finetune/checkpoint-last.pth; SIGTERM/SIGUSR1 save and exit 75. Not part of `all`."""
    finetune_opts = take(opts, FinetuneOptions)
    with user_errors():  # a bare command fine-tunes the demo with the demo's recipe, chosen here
        finetune_opts = finetune_opts.resolved("imagenet" if opts["data"] else "demo")
    run([jobs.finetune_step(finetune_opts)], opts, finetune_opts.device)


@main.command()
@checkpoint_option
@run_dir_opt
@dataset_options
@splits_option
@click_options(FeatureOptions, exclude=("pool", "no_cache"))
@click_options(SegmentOptions)
def segment(**opts):
    """Dense linear probe on the frozen patch tokens (fg/bg and per-class foreground), trained on the train
    split's masks, mIoU on each test split; needs ROOT/masks/<split>. Not part of `all`."""
    opts["pool"] = "cls"  # patch tokens are read whole; the pool is not an option here
    run([jobs.segment_step(opts.pop("splits"), take(opts, SegmentOptions))], opts)


@main.command(name="visualize", help="Reconstructions and attention of one or more MAEs, side by side, as a PNG. "
                                     + visualize.COLUMNS_HELP)
@run_dir_opt
@dataset_options
@click_options(VisualizeOptions)
def visualize_command(**opts):
    from agmae.train.model import load_mae  # the MAE is training's model; only a command line may join two stages

    visualize_opts = take(opts, VisualizeOptions)
    opts["checkpoint"] = visualize_opts.checkpoints[0] if visualize_opts.checkpoints else None  # its RUN_DIR

    def step(job):
        if job.env.is_main:
            out = visualize.write(visualize_opts, job.root, load_mae, job.run_dir, job.train_split, job.device)
            return f"figure: {out}"
    run([step], opts, visualize_opts.device)


@main.command(name="all")
@common_options
@click_options(KnnOptions)
@click_options(ProbeOptions)
@robustness_options
@click_options(AttentionOptions)
def run_all(**opts):
    """Every protocol that applies: knn, linear, retrieval; robustness where the dataset has background
    splits; attention where the run has map stores and the dataset has masks. Says what it skipped and why."""
    knn_opts, probe_opts = take(opts, KnnOptions), take(opts, ProbeOptions)
    run([jobs.knn_step(knn_opts), jobs.linear_step(probe_opts), jobs.retrieval_step(),
         jobs.robustness_step(opts.pop("splits"), opts.pop("clean_fg"), knn_opts, probe_opts, only_if_present=True),
         jobs.attention_step(take(opts, AttentionOptions), only_if_present=True)], opts)


if __name__ == "__main__":
    main()
