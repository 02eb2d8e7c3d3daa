"""How much of a guided − vanilla k-NN difference is the choice of test images?

For runs trained on the same data (one or more guided ones and their vanilla pair), classifies every test image
with each run's weighted k-NN (k = 20, the demo's headline metric: mean-pooled by default) and prints, per guided
run and test split, the difference of their top-1 accuracies, the share of test images on which exactly one of
them is right, and the standard error of the difference that this disagreement implies, sqrt((d − Δ²) / n) for
paired proportions. A per-seed difference within about two standard errors says nothing on its own
(docs/results/README.md). Each run's features are extracted once, whatever the number of splits.

    python -m experiments.paired_noise GUIDED_RUN... VANILLA_RUN [--data DEMO_ROOT] [--test-split original ...]
"""
from pathlib import Path

import click

from agmae.eval.features import POOLS, FeatureSource
from agmae.eval.knn import HEADLINE_K, knn_correct, paired_difference

from experiments.plan import require_splits


def correct_per_image(checkpoint: Path, root: Path, test_splits: tuple, pool: str, workers: int,
                      precision: str) -> dict:
    """{test split: [n] bool}: whether the run's k-NN classifies each test image correctly."""
    source = FeatureSource(checkpoint, pool=pool, workers=workers, use_cache=False, progress=False,
                           precision=precision)
    bank = source.features(root / "train")
    return {split: knn_correct(bank, source.features(root / split)) for split in test_splits}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("guided", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("vanilla", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset root with train/ and the test split. [default: the built-in demo dataset]")
@click.option("--test-split", "test_splits", multiple=True, default=["original"], show_default=True,
              help="Test split (repeatable).")
@click.option("--pool", type=click.Choice(POOLS), default="mean", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Feature extraction autocast.")
def main(guided, vanilla, data, test_splits, pool, workers, precision):
    from agmae.data.demo import ensure_demo

    root = data or ensure_demo()
    require_splits(root, ("train", *test_splits))

    def correct(run):
        return correct_per_image(run / "checkpoint-last.pth", root, test_splits, pool, workers, precision)

    baseline = correct(vanilla)
    for run in guided:
        hits = correct(run)
        for split in test_splits:
            result = paired_difference(hits[split], baseline[split])
            click.echo(f"{run.name} - {vanilla.name} on {split} ({len(hits[split])} images, k-NN k={HEADLINE_K}, "
                       f"{pool}): {result['difference']:+.2f} points; they disagree on "
                       f"{result['disagreement']:.1f} % of the images, standard error {result['standard_error']:.2f}")


if __name__ == "__main__":
    main()
