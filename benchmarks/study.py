"""The AttG study (project issues 6, 12 and 16): vanilla vs guided MAE on the demo dataset.

Rows (a declarative plan, `ROWS`), each trained with `make demo`'s recipe (the same model, epochs and
batch, so rows differ only in their maps, loss and masking options):
- `--seeds` seeds: vanilla, guided with oracle maps, with maps of the same seed's vanilla MAE (TokenCut
  on its final tokens, the two-round pipeline) and with random-weight DINO maps (the negative control);
- `--claim-seeds` seeds: the paper's masking ablation (the map chooses the masked patches, with or without
  the guided loss) and fine-tuning of vanilla and oracle-guided encoders;
- `--ablation-seeds` seeds: fine-tuning of the own-map-guided encoder, the CNN maps (TokenCut, Grad-CAM
  on EfficientNet-Lite0), sampled masking, a temperature ablation (constant τ ∈ {0.25, 0.5, 1, 2}, cosine
  1→0.5 and 0.5→1), the three `--weight-norm` modes, and vanilla / oracle / own maps on the
  background-correlated demo dataset (p = 0.8, the BG-gap).

The study only orchestrates: each step (build a dataset, discover a map store, train a run,
one evaluation protocol) is a subprocess of the console scripts users run (agmae-discover,
agmae-train, agmae-eval), logging to a file beside its output. A step that finished leaves a
marker (command, seconds) and is skipped when the study is run again with the same command; a
step whose command changed (a new discovery recipe, other eval options) is redone, its stale
map store removed first. A killed step resumes (the CLIs resume a half-written store or a
half-trained run by themselves). Rows whose runs
have the same configuration share them (guided-oracle seed 0 is also the τ row `cosine 1→0.5`
and the weight-norm row `batch`); rows that use one discovery method on one dataset share
its map store.

docs/RESULTS.md and docs/results.json are regenerated from whatever runs are complete after
every run, so a partial study gives a partial table that names what is missing. Seeds can be split
across machines (or survive a lost cache): `--record` takes the row-seeds an earlier results.json of
the same plan finished, after checking that each was trained as this plan would train it.

    python benchmarks/study.py --rows vanilla,guided-oracle,guided-mae-tokencut,guided-dino-random  # the headline rows
    python benchmarks/study.py --rows vanilla,guided-oracle --seeds 2   # the core comparison first
    python benchmarks/study.py --report-only    # regenerate the docs (pass the same plan options)
    python benchmarks/study.py --adopt-demo-runs ~/.cache/agmae/demo-run/light-b256  # resume `make demo`'s runs
    python benchmarks/study.py --seeds 5 --record docs/results.json  # add seeds 3-4 to a record of seeds 0-2
    python benchmarks/study.py --quick          # smoke test: tiny dataset, 1 epoch, 2 rows, 1 seed
"""
import json
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

import click

from agmae.cli.demo import DEMO_RECIPES
from agmae.cli.steps import cpu_set, duration, execute, interrupt_on_sigterm, log_runner
from agmae.paths import maps_method
from study_plan import (FULL_DEFAULTS, QUICK_DEFAULTS, QUICK_ROWS, REPO, ROW_NAMES, Config, Plan, build_plan,
                        load_record, make_config)
from study_report import wall_total, write_report

subprocess_runner = partial(log_runner, cwd=REPO)


# What a run's checkpoint directory needs for agmae-train to resume it (train.done.json is the demo's own marker)
RUN_FILES = ("checkpoint-last.pth", "config.json", "metrics.jsonl")


def _training_settings(argv: list) -> dict:
    """The settings a planned agmae-train command trains with, as its config.json records them, less those about
    execution (paths, workers, precision: agmae-train's resume check compares their fingerprints instead) and
    input_size (recorded as the model resolved it)."""
    from agmae.cli.train import config_from_options, main as train_cli
    from agmae.train.engine import EXECUTION_SETTINGS

    # resilient: a path that does not exist yet (the study's dataset before its first step) parses as None; paths are
    # execution settings, left out of the comparison
    params = dict(train_cli.make_context("agmae-train", [str(arg) for arg in argv[1:]], resilient_parsing=True).params)
    config = config_from_options(params.pop("no_guidance"), **params)
    return {name: value for name, value in json.loads(json.dumps(asdict(config))).items()
            if name not in EXECUTION_SETTINGS | {"input_size"}}


def adopt_demo_runs(plan: Plan, demo_run_root: Path, echo=click.echo) -> int:
    """Copy the finished runs of a `make demo` run root (AGMAE_HOME/demo-run/RECIPE) into the plan's runs that
    train the same thing, so that the study resumes them at their last epoch instead of training them again. A demo
    run is the same when its map source (read from the store's name) and every training setting equal the planned
    command's; agmae-train's resume check still compares the data's and the maps' fingerprints, and
    refuses a run whose maps were discovered from another checkpoint file. Returns how many runs were copied."""
    maps_of = {row.name: row.maps for row in plan.rows}
    planned = {}  # run directory -> (map source, training settings); rows that share a run share its directory
    for (row_name, _), run in plan.runs.items():
        if run.run_dir not in planned:
            planned[run.run_dir] = (maps_of[row_name], _training_settings(run.train.argv))
    adopted = 0
    for demo_run in sorted((demo_run_root / "runs").glob("*/train.done.json")):
        demo_run = demo_run.parent
        recorded = json.loads((demo_run / "config.json").read_text())
        source = maps_method(recorded["maps"]) if recorded["maps"] else None
        target = next((run_dir for run_dir, (planned_source, settings) in planned.items()
                       if planned_source == source and all(recorded.get(k) == v for k, v in settings.items())), None)
        if target is None:
            echo(f"adopt: {demo_run.name}: no run of this plan trains the same (seed, maps, recipe); not copied")
        elif (target / "checkpoint-last.pth").exists():
            echo(f"adopt: {demo_run.name}: {target.name} has a checkpoint of its own; not copied")
        else:
            target.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                shutil.copy2(demo_run / name, target / name)
            adopted += 1
            echo(f"adopt: {demo_run} -> {target}")
    return adopted


def results_a_report_would_drop(plan: Plan) -> list:
    """The row-seeds of this plan that the docs' results.json holds finished, as this plan trains them, while
    neither this machine's runs nor the plan's record supply them: writing the report would lose their numbers."""
    published = plan.config.docs / "results.json"
    if not published.is_file() or published == plan.config.record:
        return []
    held = load_record(published, plan.config, plan.runs, strict=False)
    return [f"{name} seed {seed}" for name, seed in held.metrics if (name, seed) not in plan.record.metrics]


def run_study(config: Config, runner=subprocess_runner, echo=click.echo, report_only=False, cpus=None,
              adopt: Path | None = None) -> dict:
    """Run (or, with report_only, only report) the plan; returns the summary written to the docs. cpus: run
    steps side by side on these CPUs (agmae.cli.steps.execute); None, one at a time. adopt: a `make demo` run
    root whose finished runs the study resumes instead of training them again (adopt_demo_runs)."""
    plan = build_plan(config)
    dropped = results_a_report_would_drop(plan)
    if dropped:
        published = config.docs / "results.json"
        raise click.ClickException(f"{published} holds {len(dropped)} finished row-seeds of this plan that are not on "
                                   f"this machine (first: {dropped[0]}); pass --record {published} to keep them, or "
                                   "--docs elsewhere")
    if adopt is not None and not report_only:
        adopt_demo_runs(plan, adopt, echo)
    def report_when_a_run_completes(step):
        if step.kind == "eval" and all(s.done() for s in plan.steps if s.run_dir == step.run_dir):
            write_report(plan)

    failed = [] if report_only else execute(plan.steps, runner, echo, on_step_done=report_when_a_run_completes,
                                              cpus=cpus)
    summary = write_report(plan)
    echo(f"wrote {config.docs / 'RESULTS.md'} and results.json: {sum(len(r['seeds_done']) for r in summary['rows'])}"
         f" row-seeds complete, {len(summary['missing'])} missing; recorded step time "
         f"{duration(wall_total(summary))}")
    if failed:
        raise click.ClickException(f"{len(failed)} steps failed or were skipped (first: {failed[0]}); their logs "
                                   "are in the run directories; fix the cause and re-run to continue")
    return summary


def print_plan(plan: Plan, echo=click.echo) -> None:
    """One line per step (done with its recorded time, or pending with its first estimate), then the total
    estimate of what is pending."""
    for step in plan.steps:
        state, seconds = (("done   ", step.seconds()) if step.done() else
                          ("stale  " if step.stale() else "pending", step.estimate))
        echo(f"{state} {duration(seconds):>7}  {step.id}")
    pending = [step for step in plan.steps if not step.done()]
    echo(f"{len(pending)} of {len(plan.steps)} steps pending, first estimate "
         f"{duration(sum(step.estimate for step in pending))}; row-seeds: {len(plan.runs)} "
         f"({len(plan.record.metrics)} from the record), distinct runs: "
         f"{len({run.run_dir for run in plan.runs.values()})}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Choice(list(DEMO_RECIPES)),
              help="The demo recipe every run trains with (model, epochs, warm-up share, batch; `make demo "
                   f"--recipe`). [default: {FULL_DEFAULTS['recipe']}]")
@click.option("--epochs", type=int, help="Training epochs of every run. [default: the recipe's; "
                                         f"--quick {QUICK_DEFAULTS['epochs']}]")
@click.option("--seeds", type=int, help=f"Seeds of the main rows (vanilla, guided-*). [default: "
                                        f"{FULL_DEFAULTS['seeds']}; --quick {QUICK_DEFAULTS['seeds']}]")
@click.option("--claim-seeds", type=int, help=f"Seeds of the paper-claim rows (guided masking) and of vanilla and "
                                              f"oracle fine-tuning (0: none). "
                                              f"[default: {FULL_DEFAULTS['claim_seeds']}; --quick "
                                              f"{QUICK_DEFAULTS['claim_seeds']}]")
@click.option("--ablation-seeds", type=int, help="Seeds of the τ, weight-norm, CNN-map and p = 0.8 rows and of own-map "
                                                 "fine-tuning (0: none, for a study of the main rows alone). "
                                                 "[default: 1]")
@click.option("--n-train", type=int, help=f"Demo training images (both datasets). [default: "
                                          f"{FULL_DEFAULTS['n_train']}; --quick {QUICK_DEFAULTS['n_train']}]")
@click.option("--n-test", type=int, help=f"Demo images per test split. [default: {FULL_DEFAULTS['n_test']}; "
                                         f"--quick {QUICK_DEFAULTS['n_test']}]")
@click.option("--batch-size", type=int, help="Training batch of every run. [default: the recipe's; --quick "
                                             f"{QUICK_DEFAULTS['batch_size']}]")
@click.option("--rows", help="Comma-separated subset of the rows: " + ", ".join(ROW_NAMES)
                             + f". [default: all; --quick {','.join(QUICK_ROWS)}]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="Training autocast precision. [default: bf16 where the CPU has native bf16, else fp32, as "
                   "agmae-train does on the demo dataset]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Study directory: map stores, runs, logs, step markers. [default: AGMAE_HOME/study]")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path),
              help="Where RESULTS.md and results.json go. [default: the repository's docs/; --quick OUT/docs]")
@click.option("--record", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The results.json of an earlier run of this same plan (on another machine, or before its cache "
                   "was lost; it may be the one --docs holds): the row-seeds it finished are reported from it, named "
                   "as such, and not trained again, so seeds can be split across machines. Refused when its plan "
                   "options (seed counts aside) or a run's configuration differ from this plan's.")
@click.option("--quick", is_flag=True, help="Smoke configuration: 240 train / 60 test images, 1 epoch, batch 64, "
                                           "1 seed, rows vanilla and guided-oracle (any option above overrides).")
@click.option("--report-only", is_flag=True, help="Only regenerate the docs from the finished runs of this plan.")
@click.option("--side-by-side/--one-at-a-time", default=True, show_default=True,
              help="Run steps side by side, each on its own CPUs (one each when as many are ready), or one at a "
                   "time with the whole machine. Side by side, two 1-thread runs on 2 cores train ~1.4x faster "
                   "in all than one 2-thread run.")
@click.option("--adopt-demo-runs", "adopt", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A `make demo` run root (AGMAE_HOME/demo-run/RECIPE, same AGMAE_HOME) whose finished runs equal "
                   "runs of this plan (same seed, maps and training settings): they are copied in and resumed at "
                   "their last epoch instead of trained again.")
@click.option("--dry-run", is_flag=True, help="Print the plan's steps, which are done, and the time estimate; "
                                             "run nothing, write nothing.")
def main(quick, report_only, side_by_side, adopt, dry_run, **options):
    """Run the AttG study (vanilla vs guided MAE, τ and weight-norm ablations, BG-gap) and write its tables."""
    interrupt_on_sigterm()
    config = make_config(quick=quick, **options)
    if dry_run:
        print_plan(build_plan(config))
        return
    try:
        run_study(config, report_only=report_only, cpus=cpu_set() if side_by_side else None, adopt=adopt)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; re-run the same command to continue where it stopped") from None


if __name__ == "__main__":
    main()
