"""The AttG study: vanilla against guided MAEs of one recipe on the demo dataset, over seeds.

Rows (`experiments.plan.ROWS`), each trained with the recipe (the same model, epochs and batch, so rows differ
only in their maps, loss and masking options):
- `--seeds` seeds: vanilla, guided by oracle maps, by the own maps (cut from the same seed's vanilla MAE, the
  two-round pipeline) and by random-weight DINO maps (the negative control);
- `--claim-seeds` seeds: the paper's masking ablation (the map chooses the masked patches, with or without the
  guided loss) and fine-tuning of vanilla and oracle-guided encoders;
- `--ablation-seeds` seeds: fine-tuning of the own-map-guided encoder, the CNN maps (TokenCut, Grad-CAM on
  EfficientNet-Lite0), sampled masking, a temperature ablation (constant τ ∈ {0.25, 0.5, 1, 2}, cosine 1→0.5 and
  0.5→1), the three `--weight-norm` modes, and vanilla / oracle / own maps on the background-correlated demo dataset
  (p = 0.8, the BG-gap).

It plans with the demo's planner (`make demo` is this study's seed `--seed` of three rows), so in the same `--out`
the demo's runs are this study's and are not trained twice. Each step is a subprocess of the console scripts users
run, skipped when it finished with the same command, redone (its stale output removed) when its command changed,
resumed when it was killed. docs/results/<recipe>/RESULTS.md and results.json are regenerated from the complete runs
after every run, so a partial study gives a partial table that names what is missing; RESULTS.md keeps its
hand-written part above the generated tables. Seeds can be split across machines (or survive a lost cache):
`--record` takes the row-seeds an earlier results.json of the same plan finished, after checking that each was
trained as this plan would train it.

    python -m experiments.study --rows vanilla,guided-oracle,guided-mae-tokencut-128,guided-dino-random \\
        --claim-seeds 0 --ablation-seeds 0                     # the headline rows
    python -m experiments.study --report-only                # regenerate the docs (pass the same plan options)
    python -m experiments.study --seeds 5 --record docs/results/light-b256-continue/results.json ...
    python -m experiments.study --quick                      # smoke test: tiny dataset, 1 epoch, 2 rows, 1 seed
"""
from functools import partial
from pathlib import Path

import click

from experiments.plan import (FULL_DEFAULTS, QUICK_DEFAULTS, QUICK_ROWS, REPO, ROW_NAMES, Config, Plan, build_plan,
                              load_record, make_config)
from experiments.recipes import RECIPES
from experiments.report import wall_total, write_report
from experiments.steps import cpu_set, duration, execute, interrupt_on_sigterm, log_runner

subprocess_runner = partial(log_runner, cwd=REPO)


def results_a_report_would_drop(plan: Plan) -> list:
    """The row-seeds of this plan that the docs' results.json holds finished, as this plan trains them, while
    neither this machine's runs nor the plan's record supply them: writing the report would lose their numbers."""
    published = plan.config.docs / "results.json"
    if not published.is_file() or published == plan.config.record:
        return []
    held = load_record(published, plan.config, plan.runs, strict=False)
    return [f"{name} seed {seed}" for name, seed in held.metrics if (name, seed) not in plan.record.metrics]


def run_study(config: Config, runner=subprocess_runner, echo=click.echo, report_only=False, cpus=None) -> dict:
    """Run (or, with report_only, only report) the plan; returns the summary written to the docs. cpus: run
    steps side by side on these CPUs (experiments.steps.execute); None, one at a time."""
    plan = build_plan(config)
    dropped = results_a_report_would_drop(plan)
    if dropped:
        published = config.docs / "results.json"
        raise click.ClickException(f"{published} holds {len(dropped)} finished row-seeds of this plan that are not on "
                                   f"this machine (first: {dropped[0]}); pass --record {published} to keep them, or "
                                   "--docs elsewhere")

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
@click.option("--recipe", type=click.Choice(list(RECIPES)),
              help="The recipe every run trains with (model, epochs, warm-up share, batch; `make demo --recipe`). "
                   f"[default: {FULL_DEFAULTS['recipe']}; --quick {QUICK_DEFAULTS['recipe']}]")
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
                                                 f"[default: {FULL_DEFAULTS['ablation_seeds']}]")
@click.option("--n-train", type=int, help=f"Demo training images (both datasets). [default: "
                                          f"{FULL_DEFAULTS['n_train']}; --quick {QUICK_DEFAULTS['n_train']}]")
@click.option("--n-test", type=int, help=f"Demo images per test split. [default: {FULL_DEFAULTS['n_test']}; "
                                         f"--quick {QUICK_DEFAULTS['n_test']}]")
@click.option("--batch-size", type=int, help="Training batch of every run. [default: the recipe's; --quick "
                                             f"{QUICK_DEFAULTS['batch_size']}]")
@click.option("--rows", help="Comma-separated subset of the rows: " + ", ".join(ROW_NAMES)
                             + f". [default: all; --quick {','.join(QUICK_ROWS)}]")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]),
              help="Training autocast precision. [default: the recipe's, bf16 where the CPU has native bf16, else "
                   "fp32]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Where the map stores, runs, logs and step markers go, shared with `make demo`. "
                   "[default: AGMAE_HOME/experiments]")
@click.option("--docs", type=click.Path(file_okay=False, path_type=Path),
              help="Where RESULTS.md and results.json go. [default: docs/results/RECIPE; --quick OUT/docs]")
@click.option("--record", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The results.json of an earlier run of this same plan (on another machine, or before its cache "
                   "was lost; it may be the one --docs holds): the row-seeds it finished are reported from it, named "
                   "as such, and not trained again, so seeds can be split across machines. Refused when its plan "
                   "options (seed counts aside) or a run's configuration differ from this plan's.")
@click.option("--quick", is_flag=True, help="Smoke configuration: recipe light-b256-e32 (no first round for these rows), 240 "
                                           "train / 60 test images, 1 epoch, batch 64, 1 seed, rows vanilla and "
                                           "guided-oracle (any option above overrides).")
@click.option("--report-only", is_flag=True, help="Only regenerate the docs from the finished runs of this plan.")
@click.option("--side-by-side/--one-at-a-time", default=True, show_default=True,
              help="Run steps side by side, each on its own CPUs (one each when as many are ready), or one at a "
                   "time with the whole machine.")
@click.option("--dry-run", is_flag=True, help="Print the plan's steps, which are done, and the time estimate; "
                                             "run nothing, write nothing.")
def main(quick, report_only, side_by_side, dry_run, **options):
    """Run the AttG study (vanilla vs guided MAE, masking, τ and weight-norm ablations, BG-gap) and write its
    tables."""
    interrupt_on_sigterm()
    config = make_config(quick=quick, **options)
    if dry_run:
        print_plan(build_plan(config))
        return
    try:
        run_study(config, report_only=report_only, cpus=cpu_set() if side_by_side else None)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; re-run the same command to continue where it stopped") from None


if __name__ == "__main__":
    main()
