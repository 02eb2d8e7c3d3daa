"""`agmae-eval`: frozen-feature evaluation of a checkpoint (docs/METHOD.md#evaluation-protocols).

Subcommands knn, linear, retrieval, robustness, attention, and all. With no options they
evaluate the default run directory's last checkpoint on the built-in demo dataset (train =
bank / probe training set, `original` = queries); `--data ROOT` takes an image-folder dataset
with ROOT/train and ROOT/val. Features are cached per checkpoint hash + dataset fingerprint +
options, so re-running with other k, T or probe settings does not re-extract. Every command
updates its own key of RUN_DIR/results.json (atomically) and prints a compact table.
Distributed: launch with torchrun/srun; extraction and the augmented linear probe use every
rank, rank 0 writes the results.
"""
from pathlib import Path

import click

from agmae import distributed
from agmae.cli.errors import demo_data_at_the_door, environment_error
from agmae.eval import protocols
from agmae.eval.protocols import AttentionOptions, FeatureOptions, FinetuneOptions, KnnOptions, ProbeOptions
from agmae.eval.segment import SegmentOptions
from agmae.eval import visualize
from agmae.eval.visualize import VisualizeOptions
from agmae import options
from agmae.options import click_option, click_options, compose, run_dir_option
from agmae.paths import default_run_dir, last_checkpoint
from agmae.errors import UserError


checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="agmae-train checkpoint or exported timm ViT state dict. Default: RUN_DIR/checkpoint-last.pth.")
run_dir_opt = click_option("run_dir", run_dir_option(
    "Where results.json is written (and the default checkpoint and map stores are found). Default: the "
    "checkpoint's folder if --checkpoint is given, else the default run directory (AGMAE_RUN_DIR or "
    "AGMAE_HOME/runs/default)."))
dataset_options = compose(
    options.dataset_options,
    click.option("--demo-correlation", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="Background-class correlation of the demo dataset to use when --data is not given "
                      "(> 0 adds the mixed-same split and the BG-gap)."),
)
test_split_option = click.option(
    "--test-split", default=None,
    help="Split used as queries / test set. Default: 'original' where ROOT has it (demo), else 'val'.")
splits_option = click.option(
    "--splits", multiple=True,
    help="Test splits for robustness (repeat the option); they must share the train split's class names. "
         "Default: those of original, mixed-rand, only-fg, mixed-same that exist under the dataset root.")
clean_fg_option = click.option(
    "--clean-fg/--no-clean-fg", default=True, show_default=True,
    help="Also the clean-fg k-NN diagnostic (only-fg queries against the training objects on black, train-fg), "
         "where the dataset has both splits: one more pass over a training-sized split.")
robustness_options = compose(splits_option, clean_fg_option)
encoder_options = compose(checkpoint_option, run_dir_opt, dataset_options, click_options(FeatureOptions))
common_options = compose(encoder_options, test_split_option)


def _take(opts: dict, cls):
    """The options of dataclass `cls` out of a subcommand's keyword arguments, as an instance."""
    return cls(**{name: opts.pop(name) for name in cls.__dataclass_fields__ if name in opts})


class Command:
    """What one agmae-eval invocation shares: the process group, the run directory, the dataset root, and
    (built on first use) the encoder's features."""

    def __init__(self, opts: dict, env, device):
        self.opts, self.env, self.device = opts, env, device
        checkpoint = opts.get("checkpoint")
        self.run_dir = Path(opts["run_dir"] or (checkpoint.parent if checkpoint else default_run_dir()))
        self.checkpoint = checkpoint or last_checkpoint(self.run_dir)
        self.recipe = "imagenet" if opts["data"] else "demo"  # a bare command runs the demo with its recipe
        self.root = Path(demo_data_at_the_door(opts["data"], correlation=opts["demo_correlation"]))
        self._evaluation = None

    @property
    def evaluation(self) -> protocols.Evaluation:
        if self._evaluation is None:
            self._evaluation = protocols.Evaluation(self.checkpoint, self.root, self.opts["features"],
                                                    self.opts["train_split"], self.opts.get("test_split"),
                                                    self.env, self.device)
        return self._evaluation


def _run(steps, opts: dict, device: str = "cpu") -> None:
    """Run each step (Command -> Outcome, or None where it has nothing to record on this rank) and record
    every outcome through the one results path; a step may also return a note saying why it was skipped.
    device: where the steps run when they take no feature options (whose --device then decides)."""
    if "pool" in opts:
        opts["features"] = _take(opts, FeatureOptions)
    env, device = distributed.init(opts["features"].device if "features" in opts else device)
    try:
        command = Command(opts, env, device)
        for step in steps:
            outcome = step(command)
            if isinstance(outcome, str):
                click.echo(outcome)
            elif outcome is not None and env.is_main:
                path = protocols.record(command.run_dir, outcome)
                click.echo(f"\n{outcome.key} — {outcome.title}\n{outcome.table}\nresults: {path}")
    except UserError as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:
        raise environment_error(err) from err
    finally:
        distributed.shutdown()


def knn_step(opts):
    knn_opts = _take(opts, KnnOptions)
    return lambda command: protocols.run_knn(command.evaluation, knn_opts)


def linear_step(opts):
    probe_opts = _take(opts, ProbeOptions)
    return lambda command: protocols.run_linear(command.evaluation, probe_opts)


def retrieval_step(opts):
    return lambda command: protocols.run_retrieval(command.evaluation)


def robustness_step(opts, knn_opts, probe_opts, only_if_present=False):
    splits, clean_fg = opts.pop("splits"), opts.pop("clean_fg")

    def step(command):
        if only_if_present and not protocols.robustness_splits(command.evaluation, splits):
            return f"[all] skipped robustness: {command.root} has none of the background splits"
        return protocols.run_robustness(command.evaluation, splits, knn_opts, probe_opts, clean_fg)
    return step


def attention_step(opts, only_if_present=False):
    attention_opts = _take(opts, AttentionOptions)

    def step(command):
        if not command.env.is_main:
            return None
        stores = protocols.attention_stores(command.run_dir, attention_opts)
        split = command.opts["train_split"]
        if only_if_present and not stores:
            return f"[all] skipped attention: no map stores (maps-*.h5) in {command.run_dir}"
        if only_if_present and not protocols.has_masks(command.root, split):
            return f"[all] skipped attention: {command.root} has no ground-truth masks (masks/{split})"
        if not stores:
            raise UserError(f"no map stores in {command.run_dir} (maps-*.h5); run agmae-discover or pass --maps FILE")
        return protocols.run_attention(command.root, split, stores, attention_opts)
    return step


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Evaluate a frozen encoder: k-NN, linear probe, retrieval, background robustness, attention quality."""


@main.command()
@common_options
@click_options(KnnOptions)
def knn(**opts):
    """Weighted k-NN (DINO protocol): top-1/top-5 for each --k; k=20 is the headline."""
    _run([knn_step(opts)], opts)


@main.command()
@common_options
@click_options(ProbeOptions)
def linear(**opts):
    """Linear probe (MAE protocol: BN + Linear, LARS, warm-up + cosine); --mode cached for the fast variant."""
    _run([linear_step(opts)], opts)


@main.command()
@common_options
def retrieval(**opts):
    """Retrieval of the train split by each test image: mAP, Recall@1, Recall@5 (same class = relevant)."""
    _run([retrieval_step(opts)], opts)


@main.command()
@encoder_options
@robustness_options
@click_options(KnnOptions)
@click_options(ProbeOptions, exclude=("mode",))
def robustness(**opts):
    """Accuracy on background-changed splits (k-NN + cached-feature linear), BG-gap, clean-fg k-NN."""
    _run([robustness_step(opts, _take(opts, KnnOptions), _take(opts, ProbeOptions))], opts)


@main.command()
@run_dir_opt
@dataset_options
@click_options(AttentionOptions)
def attention(**opts):
    """Mean IoU and pointing accuracy of map stores against ground-truth masks, plus a centre-prior row."""
    _run([attention_step(opts)], opts)


@main.command()
@checkpoint_option
@run_dir_opt
@dataset_options
@test_split_option
@click_options(FinetuneOptions)
def finetune(**opts):
    """MAE fine-tuning of the whole encoder: layer-wise lr decay, drop path, Mixup/CutMix, label smoothing,
    RandAugment, random erasing, AdamW, warm-up + cosine; top-1/top-5 on the test split and on every background
    split. Resumes RUN_DIR/finetune/checkpoint-last.pth. Not part of `all` (it trains the encoder)."""
    finetune_opts = _take(opts, FinetuneOptions)
    _run([lambda command: protocols.run_finetune(command.checkpoint, command.root, opts["train_split"],
                                                 opts["test_split"], finetune_opts.resolved(command.recipe),
                                                 command.run_dir,
                                                 command.env, command.device)],
         opts, finetune_opts.device)


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
    features, segment_opts, splits = _take(opts, FeatureOptions), _take(opts, SegmentOptions), opts.pop("splits")
    _run([lambda command: protocols.run_segment(command.checkpoint, command.root, opts["train_split"], splits,
                                                features, segment_opts, command.env, command.device)],
         opts, features.device)


@main.command(name="visualize", help="Reconstructions and attention of one or more MAEs, side by side, as a PNG. "
                                     + visualize.COLUMNS_HELP)
@run_dir_opt
@dataset_options
@click_options(VisualizeOptions)
def visualize_command(**opts):
    visualize_opts = _take(opts, VisualizeOptions)
    opts["checkpoint"] = Path(visualize_opts.checkpoints[0]) if visualize_opts.checkpoints else None  # its RUN_DIR

    def step(command):
        from agmae.train.model import load_mae  # the MAE is training's model; only the command line may join them

        if not command.env.is_main:
            return None
        out = visualize.write(visualize_opts, command.root, load_mae, command.run_dir, opts["train_split"],
                              command.device)
        return f"figure: {out}"
    _run([step], opts, visualize_opts.device)


@main.command(name="all")
@common_options
@click_options(KnnOptions)
@click_options(ProbeOptions)
@robustness_options
@click_options(AttentionOptions)
def run_all(**opts):
    """Every protocol that applies: knn, linear, retrieval; robustness where the dataset has background
    splits; attention where the run has map stores and the dataset has masks. Says what it skipped and why."""
    knn_opts = KnnOptions(**{name: opts[name] for name in KnnOptions.__dataclass_fields__})
    probe_opts = ProbeOptions(**{name: opts[name] for name in ProbeOptions.__dataclass_fields__})
    steps = [knn_step(opts), linear_step(opts), retrieval_step(opts),
             robustness_step(opts, knn_opts, probe_opts, only_if_present=True),
             attention_step(opts, only_if_present=True)]
    _run(steps, opts)


if __name__ == "__main__":
    main()
