"""experiments/study.py (with plan.py and report.py): the plan, resume, aggregation (fake step runner), records of
other machines, and one real tiny train + eval."""
import json
import math
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from agmae.eval.report import update_results

from experiments.steps import result_argv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    import experiments.study

    return experiments.study


@pytest.fixture(scope="module")
def plan_of():
    import experiments.plan

    return experiments.plan


def _option(argv, name):
    return argv[argv.index(name) + 1]


def test_a_recipe_sets_every_runs_model_schedule_and_batch_and_the_command_names_it(study, tmp_path):
    """--recipe light-b256-e32: the demo model, 32 epochs with the recipe's warm-up share, batch 256; --epochs
    rescales the warm-up; an unknown recipe is refused at the door."""
    def trains(**options):
        config = study.make_config(rows="vanilla,guided-oracle", out=tmp_path / "study", docs=tmp_path / "docs",
                                   precision="fp32", **options)
        return config, [run.train.argv for run in study.build_plan(config).runs.values()]

    config, e32 = trains(recipe="light-b256-e32")
    assert "-m experiments.study --recipe light-b256-e32" in config.command()
    for argv in e32:
        assert [_option(argv, name) for name in ("--model", "--epochs", "--warmup-epochs", "--batch-size", "--blr")
                ] == ["mae_vit_demo_patch8", "32", "4", "256", "0.001"]
    _, short = trains(recipe="light-b256-e32", epochs=10, batch_size=64)
    assert [_option(short[0], name) for name in ("--epochs", "--warmup-epochs", "--batch-size")] == ["10", "1.25",
                                                                                                     "64"]
    with pytest.raises(click.BadParameter, match="unknown recipe 'bogus'"):
        trains(recipe="bogus")


def test_default_plan_rows_sharing_and_equal_compute(study, plan_of, tmp_path):
    config = study.make_config(out=tmp_path / "study", docs=tmp_path / "docs", precision="bf16")
    plan = study.build_plan(config)
    # precision is part of every run's identity, so the reproducing command must carry it
    assert "--precision bf16" in config.command() and config.recipe == "light-b256-continue"
    assert study.make_config(precision="bf16").docs == REPO / "docs" / "results" / "light-b256-continue"

    assert [row.name for row in plan.rows] == plan_of.ROW_NAMES
    assert sorted(seed for name, seed in plan.runs if name == "guided-mae-tokencut-128") == [0, 1, 2, 3, 4]
    assert sorted(seed for name, seed in plan.runs if name == "mask-oracle") == [0, 1, 2]
    assert sorted(seed for name, seed in plan.runs if name == "tau-const-2") == [0]
    # fine-tuning: vanilla and oracle on the claim seeds, own maps on the ablation seeds
    assert "finetune" in plan.runs["vanilla", 2].evals and "finetune" not in plan.runs["vanilla", 3].evals
    assert "finetune" in plan.runs["guided-oracle", 2].evals
    assert "finetune" in plan.runs["guided-mae-tokencut-128", 0].evals
    assert "finetune" not in plan.runs["guided-mae-tokencut-128", 1].evals
    assert _option(plan.runs["vanilla", 0].evals["finetune"].argv, "--epochs") == "5"  # half the recipe's 10
    # Rows with the same configuration share one run: guided-oracle seed 0 is also tau cos 1->0.5 and wn batch.
    shared = {plan.runs[name, 0].run_dir for name in ("guided-oracle", "tau-cos-1-0.5", "wn-batch")}
    assert len(shared) == 1
    assert len({run.run_dir for run in plan.runs.values()}) == len(plan.runs) - 2

    ids = [step.id for step in plan.steps]
    assert len(ids) == len(set(ids))
    assert all(ids.index(need.id) < ids.index(step.id) for step in plan.steps for need in step.needs)
    sizes = plan_of.FULL_DEFAULTS["n_train"], plan_of.FULL_DEFAULTS["n_test"]
    p0, p08 = (plan_of.demo_name(p, 0, *sizes) for p in (0.0, 0.8))
    first_rounds = {(root, seed): plan.runs[row, seed].train.needs[-1]
                    for root, row, seeds in ((p0, "vanilla", range(5)), (p08, "p0.8-vanilla", [0])) for seed in seeds}
    assert all(step.kind == "train" and _option(step.argv, "--epochs") == "16" and step.all_cpus
               for step in first_rounds.values())
    stores = sorted(step.id.split(" ", 1)[1] for step in plan.steps if step.kind == "discover")
    own = [f"{root}/mae-tokencut-128-{step.run_dir.name}" for (root, _), step in first_rounds.items()]
    assert stores == sorted([f"{p0}/oracle", f"{p0}/tokencut", f"{p0}/gradcam", f"{p0}/dino-random",
                             f"{p08}/oracle", *own])
    # the two-round maps of seed 3 come from the first round of seed 3, after it, which every run of seed 3 continues
    discover = next(step for step in plan.steps if step.id.endswith(own[3]))
    first_round = first_rounds[p0, 3]
    assert first_round in discover.needs and _option(discover.argv, "--backbone") == str(
        first_round.run_dir / "checkpoint-last.pth")
    assert discover in plan.runs["guided-mae-tokencut-128", 3].train.needs
    assert all(_option(plan.runs[name, 3].train.argv, "--init-from") == str(first_round.run_dir / "checkpoint-last.pth")
               for name in ("vanilla", "guided-oracle", "guided-dino-random"))
    dino = next(step for step in plan.steps if step.id.endswith("/dino-random"))
    assert {"--random-init", "vit_small_patch8_224"} <= set(dino.argv) and _option(dino.argv, "--image-size") == "64"

    trains = [run.train.argv for run in plan.runs.values()]
    for name in ("--model", "--epochs", "--warmup-epochs", "--batch-size", "--blr", "--precision", "--keep-every"):
        assert len({_option(argv, name) for argv in trains}) == 1, name
    assert (_option(trains[0], "--epochs"), _option(trains[0], "--warmup-epochs"), _option(trains[0], "--batch-size")
            ) == ("10", "1.25", "256")
    constant = plan.runs["tau-const-0.25", 0].train.argv
    assert _option(constant, "--tau-schedule") == "constant" and _option(constant, "--tau-start") == "0.25"
    assert "--tau-end" not in constant
    assert _option(plan.runs["wn-none", 0].train.argv, "--weight-norm") == "none"
    correlated = plan.runs["p0.8-guided-oracle", 0].train.argv
    assert p08 in _option(correlated, "--data") and f"maps/{p08}/oracle.h5" in _option(correlated, "--maps")
    assert "--no-guidance" in plan.runs["vanilla", 1].train.argv and _option(plan.runs["vanilla", 1].train.argv,
                                                                              "--seed") == "1"


def test_a_recipe_with_a_first_round_cuts_the_own_maps_from_the_shorter_vanilla_run(study, tmp_path):
    """light-b256-e32: vanilla and guided runs train 32 epochs; the own maps come from the 16-epoch vanilla run, the
    very run (same directory) that the default recipe continues, so its maps are shared; the guided run's name
    records its first round."""
    def plan(recipe, epochs=None):
        config = study.make_config(recipe=recipe, epochs=epochs, rows="vanilla,guided-mae-tokencut-128",
                                   out=tmp_path / "study", docs=tmp_path / "docs", precision="bf16")
        return study.build_plan(config)

    e32, continued = plan("light-b256-e32"), plan("light-b256-continue")
    guided = e32.runs["guided-mae-tokencut-128", 1].train
    store = Path(_option(guided.argv, "--maps"))
    maker = next(step for step in guided.needs if step.kind == "train")
    assert maker.run_dir == continued.runs["vanilla", 1].train.needs[-1].run_dir and _option(maker.argv,
                                                                                             "--epochs") == "16"
    assert store == Path(_option(continued.runs["guided-mae-tokencut-128", 1].train.argv, "--maps"))
    assert [_option(guided.argv, o) for o in ("--epochs", "--warmup-epochs")] == ["32", "4"]
    assert "--init-from" not in guided.argv and maker not in e32.runs["vanilla", 1].train.needs
    assert guided.run_dir != plan("light-b256-e32", epochs=16).runs["guided-mae-tokencut-128", 1].run_dir


# The run names of the committed studies (docs/results/<recipe>/results.json): the identity must keep them.
COMMITTED = {"light-b256-continue": ["vanilla-e16+10-s0-c0fff00f", "oracle-cosine-1-0.5-batch-e16+10-s0-e9726937",
                                     "mae-tokencut-128-cosine-1-0.5-batch-e16+10-s0-2cbab7cf",
                                     "dino-random-cosine-1-0.5-batch-e16+10-s0-89ba9a86"],
             "light-b256-e32": ["vanilla-e32-s0-3d9af7d9", "oracle-cosine-1-0.5-batch-e32-s0-2f87fade",
                                "mae-tokencut-128-cosine-1-0.5-batch-e32-s0-f4208422",
                                "dino-random-cosine-1-0.5-batch-e32-s0-b09d8f60"]}
HEADLINE_ROWS = "vanilla,guided-oracle,guided-mae-tokencut-128,guided-dino-random"


@pytest.mark.parametrize("recipe", list(COMMITTED))
def test_the_committed_studies_are_accepted_as_records_and_supply_every_row_seed(study, tmp_path, recipe):
    """Each kept recipe's 5-seed study, as committed, is a record of today's plan: its run names are the ones the
    identity gives (seed 0 pinned), so --record takes all 20 row-seeds and no step is left to run; its numbers are
    reported unchanged."""
    record = REPO / "docs" / "results" / recipe / "results.json"
    config = study.make_config(recipe=recipe, seeds=5, claim_seeds=0, ablation_seeds=0, rows=HEADLINE_ROWS,
                               precision="bf16", out=tmp_path / "study", docs=tmp_path / "docs", record=record)
    plan = study.build_plan(config)
    assert [plan.runs[name, 0].run_dir.name for name in HEADLINE_ROWS.split(",")] == COMMITTED[recipe]
    assert len(plan.record.metrics) == 20 and plan.steps == []
    summary = study.run_study(config, runner=lambda step: pytest.fail(f"ran {step.id}"), echo=lambda line: None)
    committed = {row["name"]: row for row in json.loads(record.read_text())["rows"]}
    for row in summary["rows"]:
        assert row["metrics"]["mixed_rand_knn_mean"] == committed[row["name"]]["metrics"]["mixed_rand_knn_mean"]
        if row["name"] != "vanilla":
            assert row["paired"]["mixed_rand_knn_mean"]["ci95"] == pytest.approx(
                committed[row["name"]]["paired"]["mixed_rand_knn_mean"]["ci95"])


def test_bad_rows_are_rejected(study, tmp_path):
    with pytest.raises(click.BadParameter, match="bogus"):
        study.make_config(rows="vanilla,bogus", out=tmp_path)


def test_no_claim_or_ablation_seeds_means_no_fine_tuning_unless_a_chosen_row_needs_those_seeds(study, tmp_path):
    rows = "vanilla,guided-oracle,guided-mae-tokencut-128"
    plan = study.build_plan(study.make_config(rows=rows, seeds=2, claim_seeds=0, ablation_seeds=0, out=tmp_path,
                                              precision="fp32"))
    assert sorted(plan.runs) == [(row, seed) for row in sorted(rows.split(",")) for seed in (0, 1)]
    assert not any("finetune" in run.evals for run in plan.runs.values())
    with pytest.raises(click.BadParameter, match="row mask-oracle runs on the claim seeds"):
        study.make_config(rows="vanilla,mask-oracle", claim_seeds=0, out=tmp_path)
    with pytest.raises(click.BadParameter, match="-1 must be >= 0"):
        study.make_config(rows="vanilla", ablation_seeds=-1, out=tmp_path)


# Hand-made k-NN CLS top-1 per (row, seed); the other metrics are fixed offsets of it.
KNN = {("vanilla", 0): 20.0, ("vanilla", 1): 23.0, ("vanilla", 2): 29.0,
       ("guided-oracle", 0): 30.0, ("guided-oracle", 1): 31.0, ("guided-oracle", 2): 35.0,
       ("p0.8-vanilla", 0): 50.0, ("mask-oracle", 0): 28.0, ("mask-oracle", 1): 30.0}


class FakeRunner:
    """Stands in for the subprocesses: eval steps write results.json entries shaped like agmae-eval's."""

    def __init__(self, plan, fail=()):
        from experiments.recipes import EVALS

        self.evals = EVALS
        self.knn = {run.run_dir: KNN[key] for key, run in plan.runs.items()}
        self.fail, self.calls = set(fail), []

    def __call__(self, step):
        self.calls.append(step.id)
        if step.id in self.fail:
            return 1
        if step.kind != "eval":
            return 0
        k = self.knn[step.run_dir]
        name = step.id.split(" ", 1)[0]
        key = self.evals[name][1]
        if name in ("knn", "knn-mean"):
            results = {"k=10": {"top1": -1.0}, "k=20": {"top1": k if name == "knn" else k + 1}}
        elif name == "linear":
            results = {"mode": "cached", "top1": k + 2, "top5": 99.0}
        elif name == "finetune":
            results = {"splits": {"original": {"top1": k + 4}}}
        elif name == "segment":
            results = {task: {"splits": {"original": {"miou": k + shift}, "mixed-rand": {"miou": k + shift - 5}}}
                       for task, shift in (("fg", 6), ("classes", 7))}
        else:
            k += 0.5 if name == "robustness-mean" else 0.0  # mean-pooled features score apart from CLS ones
            splits = {"original": {"knn_top1": k, "linear_top1": k + 2},
                      "mixed-rand": {"knn_top1": k - 5, "linear_top1": k - 4},
                      "only-fg": {"knn_top1": k - 10, "linear_top1": k - 9}}
            results = {"splits": splits, "clean_fg_knn_top1": k + 3}
            if "p0.8" in str(step.run_dir):
                splits["mixed-same"] = {"knn_top1": k + 7, "linear_top1": k + 8}
                results["bg_gap"] = {"knn_top1": 12.0, "linear_top1": 12.0}
        update_results(step.run_dir, key, {"results": results})
        return 0


def test_aggregation_resume_and_partial_report(study, plan_of, tmp_path):
    config = study.make_config(seeds=3, ablation_seeds=1, rows="vanilla,guided-oracle,p0.8-vanilla", epochs=2,
                               n_train=240, n_test=60, out=tmp_path / "study", docs=tmp_path / "docs",
                               precision="fp32")
    plan = study.build_plan(config)
    broken, skipped = plan.runs["guided-oracle", 1].train.id, len(plan.runs["guided-oracle", 1].evals)
    lines = []
    failing = FakeRunner(plan, fail={broken})
    with pytest.raises(click.ClickException, match="failed or were skipped"):
        study.run_study(config, runner=failing, echo=lines.append)
    assert skipped == 7 and len(failing.calls) == len(plan.steps) - skipped  # the broken run's evaluations
    assert sum("skipped" in line for line in lines) == skipped
    assert sum("ETA" in line for line in lines) == len(plan.steps) - skipped

    partial = json.loads((config.docs / "results.json").read_text())
    assert not partial["complete"] and partial["missing"] == ["guided-oracle seed 1"]
    oracle = next(row for row in partial["rows"] if row["name"] == "guided-oracle")
    assert oracle["seeds_done"] == [0, 2] and oracle["metrics"]["knn_cls"]["mean"] == 32.5
    assert math.isclose(oracle["metrics"]["knn_cls"]["std"], math.sqrt(12.5))
    assert "**PARTIAL**" in (config.docs / "RESULTS.md").read_text()

    resumed = FakeRunner(plan)
    summary = study.run_study(config, runner=resumed, echo=lines.append)
    assert resumed.calls == [step.id for step in plan.runs["guided-oracle", 1].steps()[-(1 + skipped):]]
    assert summary["complete"] and summary["missing"] == []

    rows = {row["name"]: row for row in summary["rows"]}
    vanilla = rows["vanilla"]["metrics"]
    assert vanilla["knn_cls"]["per_seed"] == {"0": 20.0, "1": 23.0, "2": 29.0}
    assert vanilla["knn_cls"]["mean"] == 24.0 and math.isclose(vanilla["knn_cls"]["std"], math.sqrt(21.0))
    assert vanilla["knn_mean"]["mean"] == 25.0 and vanilla["linear"]["mean"] == 26.0
    assert vanilla["mixed_rand_knn"]["mean"] == 19.0 and vanilla["only_fg_linear"]["mean"] == 15.0
    assert vanilla["clean_fg_knn"]["mean"] == 27.0 and "bg_gap_knn" not in vanilla
    assert vanilla["segment_fg"]["mean"] == 30.0 and vanilla["segment_classes"]["mean"] == 31.0
    assert vanilla["mixed_rand_segment_fg"]["mean"] == 25.0
    assert rows["guided-oracle"]["metrics"]["knn_cls"]["mean"] == 32.0
    # guided − vanilla per seed: 10, 8, 6 on every column; t(0.975, 2) = 4.303, sem = 2 / sqrt(3)
    knn_pair = rows["guided-oracle"]["paired"]["knn_cls"]
    assert knn_pair["per_seed"] == {"0": 10.0, "1": 8.0, "2": 6.0} and knn_pair["wins"] == 3
    assert knn_pair["ci95"] == pytest.approx([8.0 - 4.3027 * 2 / math.sqrt(3), 8.0 + 4.3027 * 2 / math.sqrt(3)],
                                             abs=1e-3)
    assert knn_pair["p"] == pytest.approx(0.0202, abs=1e-4)  # t = 8 / (2 / sqrt(3)) = 6.93 on 2 df
    assert rows["guided-oracle"]["paired"]["finetune"]["mean"] == 8.0 and "paired" not in rows["vanilla"]
    correlated = rows["p0.8-vanilla"]["metrics"]
    assert correlated["bg_gap_knn"] == {"mean": 12.0, "std": None, "n": 1, "per_seed": {"0": 12.0}}

    markdown = (config.docs / "RESULTS.md").read_text()
    assert "PARTIAL" not in markdown and config.command() in markdown
    assert "| vanilla | — | 0 | 3/3 | 24.0 ± 4.6 | 25.0 ± 4.6 | 26.0 ± 4.6 |" in markdown
    assert "| guided-oracle | oracle, τ cos 1→0.5, batch | 0 | 3/3 | 32.0 ± 2.6 |" in markdown
    assert ("| p0.8-vanilla | 0.8 | 1/1 | 45.0 | 46.0 | 45.5 | 46.5 | 40.0 | 41.0 | 40.5 | 53.0 | 12.0 | 12.0 |"
            in markdown)
    assert "| vanilla | 0 | 3/3 | 19.0 ± 4.6 |" in markdown and "| — | — |" in markdown
    assert "| guided-oracle | +8.0 [+3.0, +13.0] p=0.02 (3/3) |" in markdown
    assert "](differences.png)" in markdown and (config.docs / "differences.png").stat().st_size > 0

    again = FakeRunner(plan)
    study.run_study(config, runner=again, echo=lines.append)
    assert again.calls == []

    for step in plan.steps:  # the wall time is the sum of the recorded step times
        record = json.loads(step.marker.read_text())
        step.marker.write_text(json.dumps({**record, "seconds": 60.0}))
    reported = study.run_study(config, runner=again, echo=lines.append, report_only=True)
    assert reported["wall_seconds"]["total"] == 60.0 * len(plan.steps)
    markdown = (config.docs / "RESULTS.md").read_text()
    hours, minutes = divmod(len(plan.steps), 60)
    assert f"Wall time (sum of the recorded step times): {hours}h{minutes:02d}m" in markdown
    assert markdown.startswith("# light-b256-continue study results\n\n## The tables (generated by experiments/")
    # the hand-written reading above the generated tables stays as written; the tables below it are regenerated
    hand_written = "# light-b256-continue\n\n## Findings\n\nGuidance wins by 8 points.\n\n"
    (config.docs / "RESULTS.md").write_text(hand_written + "## The tables (generated by an older script)\n\nold\n")
    study.run_study(config, runner=again, echo=lines.append, report_only=True)
    markdown = (config.docs / "RESULTS.md").read_text()
    assert markdown.startswith(hand_written + "## The tables (generated by experiments/study.py)\n")
    assert "old" not in markdown and markdown.count("## The tables") == 1 and "| vanilla | — | 0 | 3/3 |" in markdown


def test_a_variant_row_is_paired_with_the_row_it_varies(study, tmp_path):
    config = study.make_config(seeds=2, claim_seeds=2, rows="vanilla,guided-oracle,mask-oracle", epochs=1,
                               n_train=240, n_test=60, out=tmp_path / "study", docs=tmp_path / "docs", precision="fp32")
    plan = study.build_plan(config)
    rows = {row["name"]: row for row in study.run_study(config, runner=FakeRunner(plan), echo=lambda line: None)["rows"]}
    masking = rows["mask-oracle"]
    assert masking["paired"]["knn_cls"]["per_seed"] == {"0": 8.0, "1": 7.0}  # against vanilla, as every guided row
    versus = masking["paired_versus"]["knn_cls"]  # mask-oracle − guided-oracle: 28 − 30, 30 − 31
    assert versus["per_seed"] == {"0": -2.0, "1": -1.0} and versus["wins"] == 0
    assert versus["p"] == pytest.approx(0.2048, abs=1e-4)  # t = −1.5 / 0.5 = −3 on 1 df
    assert "paired_versus" not in rows["guided-oracle"] and "paired_versus" not in rows["vanilla"]
    markdown = (config.docs / "RESULTS.md").read_text()
    assert "| mask-oracle | guided-oracle | -1.5 [-7.9, +4.9] p=0.20 (0/2) |" in markdown


def test_a_record_of_an_earlier_machine_supplies_its_row_seeds_and_only_the_others_are_run(study, tmp_path):
    """Seeds split across machines: the results.json of a 2-seed study is the record of a 3-seed study in an empty
    study directory, which runs seed 2 alone and reports all three (paired over three seeds), naming the record and
    its step time; that report, as a record in turn, needs no step at all and keeps the first provenance. Runs
    finished on this machine win over the record. A study that would overwrite finished results it cannot
    reproduce refuses, and so does a record of another plan or of another configuration."""
    def config(name, seeds, record=None, epochs=1, docs=None):
        return study.make_config(seeds=seeds, rows="vanilla,guided-oracle", epochs=epochs, n_train=240, n_test=60,
                                 out=tmp_path / name, docs=docs or tmp_path / name / "docs", precision="fp32",
                                 record=record)

    def run(config):
        plan = study.build_plan(config)
        runner = FakeRunner(plan)
        return plan, runner, study.run_study(config, runner=runner, echo=lambda line: None)

    first = config("first", 2)
    run(first)
    record = first.docs / "results.json"
    first_seconds = json.loads(record.read_text())["wall_seconds"]["total"]
    second = config("second", 3, record)
    plan, runner, summary = run(second)
    seed2 = {step.id for key in (("vanilla", 2), ("guided-oracle", 2)) for step in plan.runs[key].steps()}
    assert set(runner.calls) == seed2 and len(runner.calls) == len(seed2)
    rows = {row["name"]: row for row in summary["rows"]}
    assert summary["complete"] and rows["vanilla"]["seeds_done"] == [0, 1, 2]
    assert rows["vanilla"]["seeds_recorded"] == [0, 1]
    assert rows["vanilla"]["metrics"]["knn_cls"]["per_seed"] == {"0": 20.0, "1": 23.0, "2": 29.0}
    assert rows["guided-oracle"]["paired"]["knn_cls"]["per_seed"] == {"0": 10.0, "1": 8.0, "2": 6.0}
    source = rows["vanilla"]["runs"]["0"]["recorded_in"]
    assert source.startswith(str(record)) and "recorded_in" not in rows["vanilla"]["runs"]["2"]
    assert summary["recorded_step_seconds"] == {source: first_seconds} and f"--record {record}" in second.command()
    markdown = (second.docs / "RESULTS.md").read_text()
    assert "taken from records" in markdown and "vanilla seeds 0, 1; guided-oracle seeds 0, 1." in markdown

    plan, runner, again = run(config("third", 3, second.docs / "results.json"))
    assert plan.steps == [] and runner.calls == []
    assert [row["metrics"] for row in again["rows"]] == [row["metrics"] for row in summary["rows"]]
    assert again["rows"][0]["runs"]["0"]["recorded_in"] == source
    second_source = record_source(second.docs / "results.json")
    assert again["recorded_step_seconds"] == {source: first_seconds, second_source: summary["wall_seconds"]["total"]}

    plan, runner, local = run(config("second", 3, first.docs / "results.json", docs=tmp_path / "local-docs"))
    assert runner.calls == [] and plan.runs["vanilla", 2].train in plan.steps
    assert [row["seeds_recorded"] for row in local["rows"]] == [[0, 1], [0, 1]]

    with pytest.raises(click.ClickException, match=r"holds 4 finished row-seeds of this plan that are not on this "
                                                   r"machine \(first: vanilla seed 0\); pass --record .*results.json"):
        run(config("fourth", 3, docs=first.docs))
    with pytest.raises(click.BadParameter, match=r"recorded with epochs 1 \(this plan: 2\), warmup_epochs .*; "
                                                 "pass the options it was run with"):
        study.build_plan(config("other-epochs", 3, record, epochs=2))
    renamed = json.loads(record.read_text())
    renamed["rows"][1]["runs"]["1"]["run_dir"] += "x"
    record.write_text(json.dumps(renamed))
    with pytest.raises(click.BadParameter, match="guided-oracle seed 1 was trained as .*x, this plan trains"):
        study.build_plan(config("renamed", 3, record))


def record_source(results: Path) -> str:
    """How a report names a record it took row-seeds from."""
    return f"{results} (generated {json.loads(results.read_text())['generated']})"


def test_a_changed_command_redoes_the_step_and_a_result_neutral_change_does_not(study, tmp_path):
    config = study.make_config(seeds=1, rows="vanilla,guided-oracle", epochs=1, n_train=240, n_test=60,
                               out=tmp_path / "study", docs=tmp_path / "docs", precision="fp32")
    plan = study.build_plan(config)
    study.run_study(config, runner=FakeRunner(plan), echo=lambda line: None)
    discover = next(step for step in plan.steps if step.kind == "discover")
    train = plan.runs["vanilla", 0].train

    def rewrite_marker(step, argv):
        record = json.loads(step.marker.read_text())
        recipe = {**record["recipe"], "command": result_argv(argv)}
        step.marker.write_text(json.dumps({**record, "argv": argv, "recipe": recipe}))

    # the store was made by an older recipe; a train marker from another clone, before --keep-every existed
    rewrite_marker(discover, [*discover.argv[:-4], "--patch", "16", *discover.argv[-4:]])
    discover.stale_output.parent.mkdir(parents=True, exist_ok=True)
    discover.stale_output.write_text("a store of the old recipe")
    keep = train.argv.index("--keep-every")
    rewrite_marker(train, ["/elsewhere/.venv/bin/agmae-train", *train.argv[1:keep], *train.argv[keep + 2:]])
    assert discover.stale() and not discover.done() and train.done() and not train.stale()

    store_when_rerun = []
    rerun = FakeRunner(plan)

    def runner(step):
        store_when_rerun.append(discover.stale_output.exists())
        return rerun(step)

    lines = []
    study.run_study(config, runner=runner, echo=lines.append)
    assert rerun.calls == [discover.id] and store_when_rerun == [False]
    assert any("made with another recipe; redoing it" in line for line in lines)
    assert discover.done() and json.loads(discover.marker.read_text())["argv"] == discover.argv


def test_dry_run_lists_the_quick_plan(study, tmp_path):
    result = CliRunner().invoke(study.main, ["--quick", "--dry-run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    steps = [line for line in result.output.splitlines() if line.startswith("pending")]
    assert len(steps) == 18 and sum(" train runs/" in line for line in steps) == 2  # 1 + 1 + 2 x (1 + 7)
    assert sum(" finetune runs/" in line for line in steps) == 2
    assert not (tmp_path / "docs").exists()


def test_real_tiny_train_and_eval(study, tmp_path, demo_root):
    """The quick configuration's vanilla run through the real agmae-train, agmae-eval knn, robustness (CLS and
    mean-pooled) and segment (the other protocols faked to stay within the time budget): the table reads the CLI's
    numbers."""
    config = study.make_config(quick=True, rows="vanilla", out=tmp_path / "study", docs=tmp_path / "docs")
    plan = study.build_plan(config)
    run = plan.runs["vanilla", 0]
    assert Path(_option(run.train.argv, "--data")) == demo_root
    fake = FakeRunner(plan)

    def runner(step):
        if step.kind == "eval" and step.id.split(" ", 1)[0] in ("knn-mean", "linear", "finetune"):
            return fake(step)
        return study.subprocess_runner(step)

    summary = study.run_study(config, runner=runner, echo=lambda line: None)
    assert summary["complete"] and (run.run_dir / "checkpoint-last.pth").is_file()
    assert "epoch 1/1" in run.train.log.read_text()
    results = json.loads((run.run_dir / "results.json").read_text())
    metrics = summary["rows"][0]["metrics"]
    assert metrics["knn_cls"]["mean"] == results["knn"]["results"]["k=20"]["top1"]
    robustness = results["robustness"]["results"]
    assert metrics["mixed_rand_knn"]["mean"] == robustness["splits"]["mixed-rand"]["knn_top1"]
    assert metrics["only_fg_linear"]["mean"] == robustness["splits"]["only-fg"]["linear_top1"]
    assert metrics["clean_fg_knn"]["mean"] == robustness["clean_fg_knn_top1"]
    mean_pooled = results["robustness[pool=mean]"]["results"]
    assert metrics["mixed_rand_knn_mean"]["mean"] == mean_pooled["splits"]["mixed-rand"]["knn_top1"]
    assert all(0.0 <= metrics[name]["mean"] <= 100.0 for name in ("knn_cls", "mixed_rand_knn", "clean_fg_knn"))
    assert "bg_gap_knn" not in metrics
    segment = results["segment"]["results"]
    assert metrics["segment_fg"]["mean"] == segment["fg"]["splits"]["original"]["miou"]
    assert metrics["segment_classes"]["mean"] == segment["classes"]["splits"]["original"]["miou"]
    assert metrics["mixed_rand_segment_fg"]["mean"] == segment["fg"]["splits"]["mixed-rand"]["miou"]


def test_a_recipe_that_continues_its_first_round_starts_every_row_from_the_16_epoch_vanilla_run(study, tmp_path):
    """light-b256-continue: every row, vanilla included, starts from the 16-epoch vanilla run of its seed (the very
    run that cuts the 33-minute recipe's own maps) and is named for it (-e16+10-); the oracle store does not wait for
    it, the own maps are cut from it."""
    def plan(recipe):
        config = study.make_config(recipe=recipe, rows="vanilla,guided-oracle,guided-mae-tokencut-128",
                                   out=tmp_path / "study", docs=tmp_path / "docs", precision="bf16")
        return study.build_plan(config)

    continued, e32 = plan("light-b256-continue"), plan("light-b256-e32")
    first_round = next(step for step in e32.runs["guided-mae-tokencut-128", 1].train.needs if step.kind == "train")
    for row in ("vanilla", "guided-oracle", "guided-mae-tokencut-128"):
        training = continued.runs[row, 1].train
        assert _option(training.argv, "--init-from") == str(first_round.run_dir / "checkpoint-last.pth")
        assert first_round.id in [step.id for step in training.needs]
        assert [_option(training.argv, o) for o in ("--epochs", "--warmup-epochs")] == ["10", "1.25"]
        assert "-e16+10-s1-" in training.run_dir.name
    assert continued.runs["vanilla", 1].run_dir.name.startswith("vanilla-e16+10-s1-")
    assert _option(continued.runs["guided-mae-tokencut-128", 1].train.argv, "--maps") == _option(
        e32.runs["guided-mae-tokencut-128", 1].train.argv, "--maps")
    oracle_store = next(step for step in continued.steps if step.id.endswith("/oracle"))
    assert not any(step.kind == "train" for step in oracle_store.needs)
    ids = [step.id for step in continued.steps]
    assert ids.count(first_round.id) == 1 and ids.index(first_round.id) < ids.index(continued.runs["vanilla", 1].train.id)
