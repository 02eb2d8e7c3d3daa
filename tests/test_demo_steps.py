"""The step runner of `make demo` and the study (experiments.steps) reuses a step only when it would be made the same
way; the one planner (experiments.plan) lays out the demo's steps and names its runs as the study's."""
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from experiments.demo import step_times
from experiments.plan import build_plan, make_config, run_name
from experiments.recipes import RECIPES
from experiments.steps import Step, execute, result_argv, run_step


def appender(out, text):
    """A stage stand-in: appends `text` to `out`, so the file shows how often it ran."""
    return [sys.executable, "-c", f"open({str(out)!r}, 'a').write({text!r})"]


def step(tmp_path, name, argv, needs=(), stale_output=None, all_cpus=False):
    return Step(name, argv, tmp_path / f"{name}.done.json", needs, stale_output=stale_output, all_cpus=all_cpus)


def test_a_finished_step_is_not_run_again(tmp_path):
    out = tmp_path / "out.txt"
    assert run_step(step(tmp_path, "s", appender(out, "a")))[0] == 0
    assert run_step(step(tmp_path, "s", appender(out, "a"))) == (0, 0.0)
    assert out.read_text() == "a"
    recorded = json.loads((tmp_path / "s.done.json").read_text())
    # the script by name: another clone's .venv (another absolute path) reuses the result
    assert recorded["recipe"]["command"] == [Path(sys.executable).name, *appender(out, "a")[1:]]
    assert recorded["finished"] and recorded["seconds"] >= 0


def test_the_demos_timing_lines_mark_the_steps_an_earlier_invocation_finished(tmp_path):
    out = tmp_path / "out.txt"
    earlier, now, pending = (step(tmp_path, name, appender(out, name)) for name in ("earlier", "now", "pending"))
    run_step(earlier)
    reused = {done.id for done in (earlier, now, pending) if done.done()}
    run_step(now)
    lines = step_times([earlier, now, pending], reused).splitlines()
    assert [line.split()[0] for line in lines] == ["earlier", "now"]
    assert lines[0].endswith("(reused)") and not lines[1].endswith("(reused)")


def test_changed_options_redo_the_step_and_drop_its_stale_output(tmp_path):
    out = tmp_path / "out.txt"
    run_step(step(tmp_path, "s", appender(out, "old"), stale_output=out))
    new = step(tmp_path, "s", appender(out, "new"), stale_output=out)
    assert new.stale() and not new.done()
    run_step(new)
    assert out.read_text() == "new" and new.done()


def test_a_redone_input_redoes_the_steps_that_read_it(tmp_path):
    maps, result = tmp_path / "maps.txt", tmp_path / "result.txt"
    discover = step(tmp_path, "discover", appender(maps, "m1"), stale_output=maps)
    train = step(tmp_path, "train", appender(result, "r"), needs=(discover,))
    assert execute([discover, train], echo=lambda line: None) == []
    assert execute([discover, train], echo=lambda line: None) == []
    assert result.read_text() == "r"
    rediscover = step(tmp_path, "discover", appender(maps, "m2"), stale_output=maps)
    assert execute([rediscover, step(tmp_path, "train", appender(result, "r"), needs=(rediscover,))],
                   echo=lambda line: None) == []
    assert result.read_text() == "rr" and maps.read_text() == "m2"


def test_a_killed_step_runs_again_and_keeps_its_partial_output_to_resume(tmp_path):
    out = tmp_path / "out.txt"
    killed = [sys.executable, "-c", f"open({str(out)!r}, 'a').write('half'); raise SystemExit(3)"]
    assert run_step(step(tmp_path, "s", killed, stale_output=out))[0] == 3
    assert not json.loads((tmp_path / "s.done.json").read_text())["finished"]
    assert run_step(step(tmp_path, "s", killed, stale_output=out))[0] == 3  # the same recipe: partial output stays
    assert out.read_text() == "halfhalf"
    run_step(step(tmp_path, "s", appender(out, "a"), stale_output=out))  # another recipe: made afresh
    assert out.read_text() == "a" and json.loads((tmp_path / "s.done.json").read_text())["finished"]


def test_an_output_without_a_marker_is_of_unknown_making_and_redone(tmp_path):
    out = tmp_path / "maps.h5"
    out.write_text("a store from an older demo version")
    run_step(step(tmp_path, "discover", appender(out, "new"), stale_output=out))
    assert out.read_text() == "new"


@pytest.mark.parametrize("cpus", [None, (0, 0)], ids=["one-at-a-time", "side-by-side"])
def test_a_failed_step_skips_what_needs_it_and_runs_the_rest(tmp_path, cpus):
    out = tmp_path / "out.txt"
    broken = step(tmp_path, "broken", [sys.executable, "-c", "raise SystemExit(2)"])
    after = step(tmp_path, "after", appender(out, "x"), needs=(broken,))
    other = step(tmp_path, "other", appender(out, "o"))
    lines = []
    assert execute([broken, after, other], echo=lines.append, cpus=cpus) == ["broken", "after"]
    assert out.read_text() == "o" and any("after: skipped" in line for line in lines)
    assert not any("ETA" in line or "estimate" in line for line in lines)  # no estimates given: no ETA shown


def test_result_neutral_options_do_not_change_the_recipe():
    assert result_argv(["/a/agmae-train", "--keep-every", "4", "--epochs", "2"]) == ["agmae-train", "--epochs", "2"]


def demo_plan(tmp_path, recipe="light-b256-continue", seed=0, **options):
    """The plan `make demo` runs, in its own --out under tmp_path."""
    from experiments.demo import demo_config

    return build_plan(demo_config(recipe, seed, tmp_path / "out", precision="bf16", **options))


def _option(argv, name):
    return argv[argv.index(name) + 1]


def test_a_run_is_named_by_what_it_trains_not_by_where(tmp_path):
    from experiments.plan import ROWS

    vanilla, oracle = ROWS[0], ROWS[1]
    config = make_config(out=tmp_path / "a", precision="bf16")
    elsewhere = make_config(out=tmp_path / "b", docs=tmp_path / "docs", precision="bf16")
    name = run_name(config, vanilla, 0, "data")
    assert name == run_name(elsewhere, vanilla, 0, "data") and name.startswith("vanilla-e10-s0-")
    others = [run_name(config, vanilla, 1, "data"), run_name(config, oracle, 0, "data"),
              run_name(config, vanilla, 0, "other-data"), run_name(config, vanilla, 0, "data", init_from="first"),
              run_name(make_config(out=tmp_path / "a", precision="fp32"), vanilla, 0, "data"),
              run_name(make_config(out=tmp_path / "a", precision="bf16", epochs=11), vanilla, 0, "data")]
    assert len({name, *others}) == 1 + len(others)


def test_the_demo_runs_the_default_recipe_as_before(tmp_path):
    """light-b256-continue, seed 0: the 16-epoch first round on every CPU (the only step ready beside the oracle
    maps), then vanilla and both guided runs continuing it for 10 epochs (1.25 of warm-up) with the recipe's model,
    batch, blr and precision, the own maps cut from its last block at 128 px on one CPU beside them, then the
    mean-pooled evaluations and the map quality; the first round is no row of the comparison."""
    plan = demo_plan(tmp_path)
    ids = [f"{kind} {rest.rsplit('/', 1)[-1]}" for kind, rest in (step.id.split(" ", 1) for step in plan.steps)]
    assert ids == ["dataset fmnist-v1-p0-seed0-train10000-test10000-garment36-60", "discover oracle",
                   "train vanilla-e16-s0-67ea5440", "train vanilla-e16+10-s0-c0fff00f",
                   "discover mae-tokencut-128-vanilla-e16-s0-67ea5440",
                   "train oracle-cosine-1-0.5-batch-e16+10-s0-e9726937",
                   "train mae-tokencut-128-cosine-1-0.5-batch-e16+10-s0-2cbab7cf",
                   "robustness-mean vanilla-e16+10-s0-c0fff00f", "segment vanilla-e16+10-s0-c0fff00f",
                   "robustness-mean oracle-cosine-1-0.5-batch-e16+10-s0-e9726937",
                   "segment oracle-cosine-1-0.5-batch-e16+10-s0-e9726937",
                   "robustness-mean mae-tokencut-128-cosine-1-0.5-batch-e16+10-s0-2cbab7cf",
                   "segment mae-tokencut-128-cosine-1-0.5-batch-e16+10-s0-2cbab7cf",
                   "map quality fmnist-v1-p0-seed0-train10000-test10000-garment36-60 seed 0",
                   "visualize fmnist-v1-p0-seed0-train10000-test10000-garment36-60 seed 0"]
    first_round = plan.steps[2]
    assert [step.all_cpus for step in plan.steps] == [False, False, True] + [False] * 12
    assert result_argv(first_round.argv)[1:-5] == [
        "--no-guidance", "--model", "mae_vit_demo_patch8", "--epochs", "16", "--warmup-epochs", "2", "--batch-size",
        "256", "--blr", "0.001", "--precision", "bf16", "--seed", "0", "--data"]
    for name in ("vanilla", "guided-oracle", "guided-mae-tokencut-128"):
        train = plan.runs[name, 0].train
        assert _option(train.argv, "--init-from") == str(first_round.run_dir / "checkpoint-last.pth")
        assert [_option(train.argv, o) for o in ("--epochs", "--warmup-epochs", "--seed", "--save-every")] == [
            "10", "1.25", "0", "1"]
        assert first_round in train.needs and "--keep-every" not in train.argv
        robustness, segment = plan.runs[name, 0].evals.values()
        assert result_argv(robustness.argv)[:7] == ["agmae-eval", "robustness", "--pool", "mean", "--no-clean-fg",
                                                    "--precision", "fp32"]
        assert result_argv(segment.argv)[:8] == ["agmae-eval", "segment", "--splits", "original", "--splits",
                                                 "mixed-rand", "--precision", "fp32"]
    own_maps = plan.steps[4]
    assert _option(own_maps.argv, "--backbone") == str(first_round.run_dir / "checkpoint-last.pth")
    assert [_option(own_maps.argv, o) for o in ("--layer", "--image-size", "--precision")] == [
        "blocks.3", "128", "native"]
    assert first_round.run_dir not in [run.run_dir for run in plan.runs.values()]
    quality = plan.quality[plan.steps[0].id.split()[1], 0]
    assert list(quality.stores) == ["oracle", "mae-tokencut-128"] and quality.figure is plan.steps[-1]
    figure = quality.figure.argv
    assert [figure[i + 1] for i, arg in enumerate(figure) if arg == "--name"] == [
        "vanilla", "guided-oracle", "guided-mae-tokencut-128"]
    assert [figure[i + 1] for i, arg in enumerate(figure) if arg == "--checkpoint"] == [
        str(plan.runs[name, 0].run_dir / "checkpoint-last.pth") for name in plan.config.rows]
    assert [figure[i + 1] for i, arg in enumerate(figure) if arg == "--maps"] == [str(store) for store in
                                                                               quality.stores.values()]


def test_the_33_minute_recipe_cuts_its_own_maps_from_a_first_round_beside_the_compared_runs(tmp_path):
    """light-b256-e32: vanilla and both guided runs train 32 epochs from scratch (4 of warm-up); the own maps come
    from the 16-epoch vanilla run that the default recipe continues (one run, one store), on one CPU; at --epochs 16
    they are cut from the vanilla run itself, on every CPU."""
    plan, continued = demo_plan(tmp_path, "light-b256-e32", seed=2), demo_plan(tmp_path, seed=2)
    ids = [step.id for step in plan.steps]
    first_round = continued.runs["vanilla", 2].train.needs[-1]
    assert first_round.id in ids and ids.index(plan.runs["vanilla", 2].train.id) < ids.index(first_round.id)
    assert not plan.steps[ids.index(first_round.id)].all_cpus
    for name in ("vanilla", "guided-oracle", "guided-mae-tokencut-128"):
        argv = plan.runs[name, 2].train.argv
        assert [_option(argv, o) for o in ("--epochs", "--warmup-epochs", "--seed")] == ["32", "4", "2"]
        assert "--init-from" not in argv
    own = _option(plan.runs["guided-mae-tokencut-128", 2].train.argv, "--maps")
    assert own == _option(continued.runs["guided-mae-tokencut-128", 2].train.argv, "--maps")
    own_maps = next(step for step in plan.steps if step.stale_output == Path(own))
    assert not own_maps.all_cpus and first_round.id in [step.id for step in own_maps.needs]
    short = demo_plan(tmp_path, "light-b256-e32", seed=2, epochs=16)
    own_maps = next(step for step in short.steps if step.kind == "discover" and "--backbone" in step.argv)
    assert own_maps.all_cpus and _option(own_maps.argv, "--backbone") == str(
        short.runs["vanilla", 2].run_dir / "checkpoint-last.pth")
    assert sum(step.kind == "train" for step in short.steps) == 3


def test_the_demos_runs_are_the_studys_runs_of_that_seed(tmp_path):
    """One planner, one identity: in one --out, the demo of seed 1 trains the very runs (directories and commands)
    that the study of the default recipe plans for seed 1 of the same rows, so neither trains them twice."""
    demo = demo_plan(tmp_path, seed=1, keep_every=3)
    study = build_plan(make_config(out=tmp_path / "out", docs=tmp_path / "docs", precision="bf16"))
    for name in RECIPES["light-b256-continue"].demo_rows():
        assert demo.runs[name, 1].run_dir == study.runs[name, 1].run_dir
        assert demo.runs[name, 1].train.recipe() == study.runs[name, 1].train.recipe()
        for protocol in ("robustness-mean", "segment"):
            assert demo.runs[name, 1].evals[protocol].recipe() == study.runs[name, 1].evals[protocol].recipe()


def test_keeping_checkpoints_along_the_demo_runs_leaves_their_identities_as_they_are(tmp_path):
    """--keep-every reaches every training (learning curves of a demo run) without renaming a run or redoing a
    finished step; a negative value is refused at the door."""
    from click.testing import CliRunner

    from experiments.demo import main

    plain, kept = demo_plan(tmp_path, seed=3), demo_plan(tmp_path, seed=3, keep_every=8)
    assert [run.run_dir for run in kept.runs.values()] == [run.run_dir for run in plain.runs.values()]
    assert [step.recipe() for step in kept.steps] == [step.recipe() for step in plain.steps]
    trainings = [step.argv for step in kept.steps if step.kind == "train"]
    assert len(trainings) == 4  # the default recipe's first round and the three runs that continue it
    assert all(_option(argv, "--keep-every") == "8" for argv in trainings)
    assert not any("--keep-every" in step.argv for step in plain.steps)
    result = CliRunner().invoke(main, ["--keep-every", "-1", "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "--keep-every" in result.output


def test_every_command_the_demo_and_the_study_plan_is_accepted_by_its_cli(tmp_path):
    """Each step's argv parses with the CLI it calls (no option the CLI lacks), without running anything."""
    import click

    from agmae.cli.discover import main as discover
    from agmae.cli.eval import main as evaluate
    from agmae.cli.train import main as train

    clis = {"agmae-discover": discover, "agmae-train": train, "agmae-eval": evaluate}
    steps = []
    for recipe in RECIPES:
        demo = demo_plan(tmp_path, recipe)
        assert {Path(step.argv[0]).name for step in demo.steps} == {*clis, Path(sys.executable).name}
        study = build_plan(make_config(recipe=recipe, out=tmp_path / "study", docs=tmp_path / "docs",
                                       precision="fp32"))
        steps += demo.steps + study.steps
    for step in steps:
        if Path(step.argv[0]).name not in clis:
            continue
        command = clis[Path(step.argv[0]).name]
        args = [str(arg) for arg in step.argv[1:]]
        for i, arg in enumerate(args):  # the datasets, stores and checkpoints a step reads exist when it runs
            if arg == "--data":
                Path(args[i + 1]).mkdir(parents=True, exist_ok=True)
            elif arg in ("--maps", "--init-from", "--checkpoint"):
                Path(args[i + 1]).parent.mkdir(parents=True, exist_ok=True)
                Path(args[i + 1]).touch()
        context = command.make_context(Path(step.argv[0]).name, list(args), resilient_parsing=False)
        if isinstance(command, click.Group) and args and args[0] in command.commands:
            command.commands[args[0]].make_context(args[0], args[1:], parent=context)


def recorder(out, seconds=0.0):
    """A stage stand-in that records its start and end time, its CPU affinity, its thread setting and OpenMP's wait
    policy."""
    code = ("import json, os, time; start = time.time(); time.sleep({s}); "
            "json.dump(dict(start=start, end=time.time(), cpus=sorted(os.sched_getaffinity(0)), "
            "threads=os.environ.get('OMP_NUM_THREADS'), wait=os.environ.get('OMP_WAIT_POLICY')), "
            "open({out!r}, 'w'))").format(s=seconds, out=str(out))
    return [sys.executable, "-c", code]


def test_steps_run_side_by_side_each_on_its_own_cpus_and_wait_for_what_they_need(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    record = {name: tmp_path / f"{name}.json" for name in ("a", "b", "after_a", "alone")}
    a = step(tmp_path, "a", recorder(record["a"], 1.5))
    b = step(tmp_path, "b", recorder(record["b"], 1.5))
    after_a = step(tmp_path, "after_a", recorder(record["after_a"]), needs=(a,))
    lines = []
    # CPU 0 listed twice: two lanes on any machine, so the test needs no second core
    assert execute([a, b, after_a], echo=lines.append, cpus=(0, 0)) == []
    seen = {name: json.loads(path.read_text()) for name, path in record.items() if path.exists()}
    assert seen["a"]["start"] < seen["b"]["end"] and seen["b"]["start"] < seen["a"]["end"]  # overlapped
    assert all(seen[name]["threads"] == "1" and seen[name]["cpus"] == [0] for name in ("a", "b"))
    assert all(seen[name]["wait"] == "PASSIVE" for name in ("a", "b"))  # threads do not spin on loaders' CPUs
    assert seen["after_a"]["start"] >= seen["a"]["end"]
    assert "2 side by side" in lines[0] and sum("started on CPU 0" in line for line in lines) == 3
    # a step ready on its own takes every free CPU: both lanes' threads
    assert execute([step(tmp_path, "alone", recorder(record["alone"]))], echo=lines.append, cpus=(0, 0)) == []
    assert json.loads(record["alone"].read_text())["threads"] == "2"


def test_a_wait_policy_the_user_set_is_kept_for_pinned_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    out = tmp_path / "out.json"
    assert execute([step(tmp_path, "a", recorder(out))], echo=lambda line: None, cpus=(0,)) == []
    assert json.loads(out.read_text())["wait"] == "ACTIVE"


def test_an_all_cpus_step_waits_for_every_cpu_and_holds_back_the_steps_listed_after_it(tmp_path):
    """The demo's own-map discovery: ready while the other training still runs, it waits for that CPU too, takes
    both, and the evaluation that became ready with it waits; the flag is scheduling, not part of the recipe."""
    record = {name: tmp_path / f"{name}.json" for name in ("short", "long", "wide", "leaf")}
    short = step(tmp_path, "short", recorder(record["short"], 0.2))
    long = step(tmp_path, "long", recorder(record["long"], 1.5))
    wide = step(tmp_path, "wide", recorder(record["wide"]), needs=(short,), all_cpus=True)
    leaf = step(tmp_path, "leaf", recorder(record["leaf"]), needs=(short,))
    assert execute([short, long, wide, leaf], echo=lambda line: None, cpus=(0, 0)) == []
    seen = {name: json.loads(path.read_text()) for name, path in record.items()}
    assert seen["wide"]["start"] >= seen["long"]["end"] and seen["wide"]["threads"] == "2"
    assert seen["leaf"]["start"] >= seen["wide"]["end"]
    assert wide.recipe() == step(tmp_path, "wide", recorder(record["wide"]), needs=(short,)).recipe()


def test_one_at_a_time_runs_in_list_order_without_touching_threads(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    steps = [step(tmp_path, "first", recorder(first, 0.2)), step(tmp_path, "second", recorder(second))]
    assert execute(steps, echo=lambda line: None) == []
    assert json.loads(second.read_text())["start"] >= json.loads(first.read_text())["end"]
    assert json.loads(first.read_text())["threads"] == os.environ.get("OMP_NUM_THREADS")


def test_sigterm_while_steps_run_side_by_side_ends_their_processes(tmp_path):
    """A batch scheduler's SIGTERM (interrupt_on_sigterm) while steps run in other threads: no step's process
    outlives execute."""
    import signal
    import threading

    from experiments import steps as runner

    pids = tmp_path / "pids"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
                                     "time.sleep(60)"]
    previous = signal.getsignal(signal.SIGTERM)
    runner.interrupt_on_sigterm()
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            execute([step(tmp_path, name, sleeper) for name in ("a", "b")], echo=lambda line: None, cpus=(0, 0))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert time.monotonic() - started < 30
    started_pids = list(map(int, pids.read_text().split()))
    assert len(started_pids) == 2
    for pid in started_pids:
        with pytest.raises(ProcessLookupError):  # ended and reaped
            os.kill(pid, 0)
    assert not runner._live_processes


def test_a_recipe_cannot_continue_a_first_round_it_does_not_have():
    with pytest.raises(ValueError, match="first_round_epochs"):
        replace(RECIPES["light-b256-e32"], first_round_epochs=None, continue_first_round=True)
