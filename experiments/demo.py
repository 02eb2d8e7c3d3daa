"""`make demo`: the whole pipeline on the built-in demo dataset, as a user would run it.

Builds the demo dataset, discovers oracle maps (from the masks), trains a vanilla MAE and, with the same compute,
two guided MAEs: one on the oracle maps and one on maps that need no outside weights, TokenCut on a vanilla MAE's
own tokens (the two-round pipeline). By default all three continue one 16-epoch vanilla MAE, the first round whose
tokens the own maps are cut from, for 10 epochs each (`--recipe light-b256-continue`); `--recipe light-b256-e32`
trains them 32 epochs from scratch. Then it evaluates them (mean-pooled k-NN and cached linear probe on every
background split, the dense probe on the frozen patch tokens, map quality), prints one comparison table with the
guided − vanilla differences and the verdict on the recipe's headline metric, and writes report.png (the
differences with their standard errors, the table, the maps, and the runs' reconstructions and attention under one
mask).

The demo is the study's plan (experiments.plan) for one seed and three rows: every step is a stage's own command
line in a subprocess, two side by side on a 2-core machine, each on its own core; a second `make demo` (or one after
a crash) skips the steps finished with the same command and redoes those whose options or inputs changed. In the
same --out, the study (`python -m experiments.study`) reuses these runs as its own of that seed.
"""
import time
from pathlib import Path

import click

from agmae.eval.knn import HEADLINE_K
from agmae.eval.report import format_table, load_results
from agmae.options import click_option, seed_option
from agmae.train.config import TrainConfig

from experiments import plots
from experiments.plan import Config, build_plan, dataset_root, make_config
from experiments.recipes import DEFAULT_RECIPE, RECIPES
from experiments.results import LABELS, read_run
from experiments.stats import differences, headline_errors, verdict
from experiments.steps import cpu_set, execute, interrupt_on_sigterm, log_runner

# The demo's table: {results field: column header}, every number of mean-pooled features.
COLUMNS = {
    "original_knn_mean": "k-NN original",
    "mixed_rand_knn_mean": "k-NN mixed-rand",
    "only_fg_knn_mean": "k-NN only-fg",
    "original_linear_mean": "linear original",
    "mixed_rand_linear_mean": "linear mixed-rand",
}
EVALUATIONS = ("robustness-mean", "segment")
SEGMENT_COLUMNS = ("segment_fg", "segment_classes", "mixed_rand_segment_fg")


def demo_config(recipe: str, seed: int = 0, out: Path | None = None, epochs: int | None = None, keep_every: int = 0,
                **options) -> Config:
    """The study's plan of the demo: one seed of the recipe's demo rows, the mean-pooled evaluations and the dense
    probe, the map quality and the figure of the runs side by side; `options`: further make_config options."""
    return make_config(recipe=recipe, epochs=epochs, seeds=1, claim_seeds=0, ablation_seeds=0,
                       rows=RECIPES[recipe].demo_rows(), out=out, first_seed=seed, evaluations=EVALUATIONS,
                       keep_every=keep_every, map_quality=True, visualize=True, **options)


def format_comparison(table: dict) -> str:
    """The runs' scores ({run: RunResults}), then one row per guided run with its difference to vanilla."""
    rows = [[name, *(getattr(row, field) for field in COLUMNS)] for name, row in table.items()]
    rows += [[f"{name} - vanilla", *delta.values()] for name, delta in differences(table, COLUMNS).items()]
    return format_table(["run", *COLUMNS.values()], rows)


def map_quality(results_dir: Path, stores: dict) -> dict:
    """{map source (or the centre prior): AttentionScores} from the map-quality step's results.json."""
    source_of = {str(Path(store).resolve()): source for source, store in stores.items()}
    rows = load_results(results_dir)["attention"].metrics.rows
    return {source_of.get(scores.path, name): scores for name, scores in rows.items()}


def step_times(steps: list, reused: set) -> str:
    """Recorded seconds per finished step, for the timing lines the README quotes; a step whose id is in `reused`
    finished before this invocation and is marked so, since its seconds were spent then."""
    return "\n".join(f"  {step.id:60s} {step.seconds():7.1f} s" + ("  (reused)" if step.id in reused else "")
                     for step in steps if step.done())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="What the demo trains. " + "; ".join(f"{name}: {recipe.summary} ({recipe.page})"
                                                        for name, recipe in RECIPES.items())
                   + ". Times on 2 CPU cores: docs/PERFORMANCE.md#the-demo.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Where the maps, the runs, their logs and report.png go, shared with the study. "
                   "[default: AGMAE_HOME/experiments]")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Pre-training epochs of every compared MAE (equal compute for vanilla and guided; the warm-up "
                   "keeps its share of them; a recipe's first round keeps its own). [default: the recipe's]")
@click_option("seed", seed_option("Training seed of every run."))
@click_option("keep_every", TrainConfig.__dataclass_fields__["keep_every"])  # agmae-train's own definition
def main(recipe, out, epochs, seed, keep_every):
    """Run discover -> train -> eval on the demo dataset and print the comparison."""
    started = time.time()
    chosen = RECIPES[recipe]
    rows = chosen.demo_rows()
    config = demo_config(recipe, seed, out, epochs, keep_every)
    plan = build_plan(config)
    click.echo(f"[demo] recipe {recipe}, seed {seed}: steps, map stores and runs in {config.out}")
    reused = {step.id for step in plan.steps if step.done()}
    interrupt_on_sigterm()
    try:
        failed = execute(plan.steps, log_runner, echo=lambda line: click.echo(f"[demo] {line}"), cpus=cpu_set())
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; the running steps were stopped and resume on the next "
                                   "`make demo`") from None
    if failed:
        raise click.ClickException(f"{len(failed)} demo steps failed or were skipped (first: {failed[0]}); "
                                   "fix the cause shown above and re-run `make demo` to continue")

    root = dataset_root(config)
    run_dirs = {name: plan.runs[name, seed].run_dir for name in rows}
    table = {name: read_run(run_dir) for name, run_dir in run_dirs.items()}
    click.echo(f"\n[demo] recipe {recipe}, {chosen.epochs_text(config.epochs)}, seed {seed}; top-1 % of "
               f"mean-pooled features (k-NN k={HEADLINE_K}, linear = cached-feature probe)")
    click.echo(format_comparison(table))
    headline = chosen.headline
    gains = {name: delta[headline] for name, delta in differences(table, [headline]).items()}
    errors = headline_errors(run_dirs, root, headline)
    for line in verdict(gains, seed, errors, headline):
        click.echo(f"[demo] {line}")
    click.echo(f"[demo] one seed is one draw: the spread over seeds, with paired tests, is in {chosen.page} "
               "(python -m experiments.study)")

    quality = plan.quality[root.name, seed]
    attention = map_quality(quality.run_dir, quality.stores)
    click.echo("\n[demo] map quality against the ground-truth masks (demo train split)")
    width = max(map(len, attention))
    for name, entry in attention.items():
        click.echo(f"  {name:{width}s}  mean IoU {entry.mean_iou:5.1f} %   pointing {entry.pointing:5.1f} %")
    click.echo("\n[demo] dense probe on the frozen patch tokens, mIoU % against the masks")
    click.echo(format_table(["run", *(LABELS[field] for field in SEGMENT_COLUMNS)],
                            [[name, *(getattr(row, field) for field in SEGMENT_COLUMNS)] for name, row in table.items()]))
    report = plots.demo_report(
        config.out / "demo" / f"{recipe}-s{seed}" / "report.png",
        f"recipe {recipe}, seed {seed}: top-1 % of mean-pooled features", COLUMNS, table, gains, errors, headline,
        {name: entry.mean_iou for name, entry in attention.items()}, quality.stores, root,
        quality.figure.stale_output)
    click.echo(f"\n[demo] seconds per step (reused: finished by an earlier invocation)\n"
               f"{step_times(plan.steps, reused)}")
    click.echo(f"[demo] report: {report}\n[demo] total {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
