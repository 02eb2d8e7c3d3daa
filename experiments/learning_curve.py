"""k-NN top-1 along training: when do guided and vanilla MAEs separate?

Evaluates every kept checkpoint (`agmae-train --keep-every N` writes RUN_DIR/checkpoint-<epoch>.pth)
of each run directory with the weighted k-NN protocol (k = 20; mean-pooled patch tokens by default,
the demo's headline metric, or CLS; train split as the bank, each test split as queries) and prints,
per test split, one row per epoch and one column per run; `--json` also writes the numbers as
{"top1": {split: {run: {epoch: top-1}}}}. Features are not cached: a checkpoint's bank is extracted
once and scored against every test split.

    python -m experiments.learning_curve RUN_A RUN_B [--data DEMO_ROOT] [--every 4] \
        [--test-split original --test-split mixed-rand] [--json curve.json]
"""
import json
import re
from pathlib import Path

import click

from agmae.eval.features import POOLS, FeatureSource
from agmae.eval.knn import HEADLINE_K, knn_evaluate
from agmae.checkpoint import atomic_write_text

from experiments.plan import require_splits

KEPT = re.compile(r"checkpoint-(\d+)\.pth")


def kept_checkpoints(run_dir: Path) -> dict:
    """{epoch: path} of the run's kept checkpoints."""
    found = {int(m.group(1)): path for path in run_dir.glob("checkpoint-*.pth") if (m := KEPT.fullmatch(path.name))}
    return dict(sorted(found.items()))


def knn_top1(checkpoint: Path, root: Path, test_splits: tuple, pool: str, workers: int, precision: str) -> dict:
    """{test split: k-NN top-1} of one checkpoint, against one extraction of its train bank."""
    source = FeatureSource(checkpoint, pool=pool, workers=workers, use_cache=False, progress=False,
                           precision=precision)
    bank = source.features(root / "train")
    top1 = {}
    for split in test_splits:
        queries = source.features(root / split)
        results = knn_evaluate(bank.feats, bank.index.labels, queries.feats, queries.index.labels,
                               len(bank.index.classes), ks=(HEADLINE_K,))
        top1[split] = results[f"k={HEADLINE_K}"]["top1"]
    return top1


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset root with ROOT/train and the test split. [default: the built-in demo dataset]")
@click.option("--test-split", "test_splits", multiple=True, default=("original",), show_default=True,
              help="Query split; repeat it to score several against one extraction of the bank.")
@click.option("--pool", type=click.Choice(POOLS), default="mean", show_default=True,
              help="Feature: mean of the patch tokens (the demo's headline metric) or the CLS token.")
@click.option("--workers", type=int, default=1, show_default=True, help="Extraction DataLoader workers.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate only the kept epochs that are multiples of this.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Extraction autocast (bf16 on a CPU with native bf16 halves the time).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the curves here.")
def main(run_dirs, data, test_splits, pool, workers, every, precision, json_out):
    """Print k-NN top-1 (k = 20) of every kept checkpoint of each run."""
    names = [run_dir.name for run_dir in run_dirs]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise click.BadParameter(f"two run directories are named {twice}; the curves are labelled by directory "
                                 "name, so pass runs with distinct names", param_hint="RUN_DIRS")
    if data is None:
        from agmae.data.demo import ensure_demo

        data = ensure_demo()
    require_splits(data, ("train", *test_splits))
    curves = {split: {} for split in test_splits}
    for run_dir in run_dirs:
        kept = {epoch: path for epoch, path in kept_checkpoints(run_dir).items() if epoch % every == 0}
        if not kept:
            raise click.ClickException(f"{run_dir}: no checkpoint-<epoch>.pth (at multiples of --every {every}); "
                                       "train with agmae-train --keep-every N")
        with click.progressbar(kept.items(), label=run_dir.name) as progress:
            for epoch, path in progress:
                for split, top1 in knn_top1(path, data, test_splits, pool, workers, precision).items():
                    curves[split].setdefault(run_dir.name, {})[epoch] = top1
    for split, split_curves in curves.items():
        epochs = sorted({epoch for curve in split_curves.values() for epoch in curve})
        click.echo(f"{split}\nepoch | " + " | ".join(split_curves))
        for epoch in epochs:
            click.echo(f"{epoch:>5} | " + " | ".join(f"{curve[epoch]:.1f}" if epoch in curve else "—"
                                                    for curve in split_curves.values()))
    if json_out:
        atomic_write_text(json.dumps({"pool": pool, "k": HEADLINE_K, "top1": curves}, indent=1) + "\n", json_out)


if __name__ == "__main__":
    main()
