"""The step runner of `make demo` and the study reuses a step only when it would be made the same way."""
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agmae.cli.demo import run_directory
from agmae.cli.steps import Step, execute, result_argv, run_step

from helpers import load_benchmark


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


def test_runs_trained_another_way_get_their_own_directory(tmp_path):
    six = Step("t", ["agmae-train", "--epochs", "6"], tmp_path / "m")
    twenty = Step("t", ["agmae-train", "--epochs", "20"], tmp_path / "m")
    assert run_directory(tmp_path, "vanilla", six) == run_directory(tmp_path, "vanilla", Step("x", six.argv, Path()))
    assert run_directory(tmp_path, "vanilla", six) != run_directory(tmp_path, "vanilla", twenty)
    assert run_directory(tmp_path, "vanilla", six).parent == tmp_path / "runs"


def test_every_command_the_demo_and_the_study_plan_is_accepted_by_its_cli(tmp_path):
    """Each step's argv parses with the CLI it calls (no option the CLI lacks), without running anything."""
    import click

    from agmae.cli.demo import DEMO_RECIPES, plan
    from agmae.cli.discover import main as discover
    from agmae.cli.eval import main as evaluate
    from agmae.cli.train import main as train

    clis = {"agmae-discover": discover, "agmae-train": train, "agmae-eval": evaluate}
    demo_root = tmp_path / "demo"
    (demo_root / "train").mkdir(parents=True)
    steps = []
    for recipe in DEMO_RECIPES:
        recipe_steps, _ = plan(tmp_path / recipe, demo_root, epochs=2, seed=1, recipe=recipe)
        assert {Path(step.argv[0]).name for step in recipe_steps} == set(clis)
        steps += recipe_steps
    study = load_benchmark("study_plan")
    for recipe in (None, "light-b256-continue"):  # the study's default rows, and every row continuing a first round
        study_steps = study.build_plan(study.make_config(recipe=recipe, out=tmp_path / "study", docs=tmp_path / "docs",
                                                         precision="fp32")).steps
        steps += [step for step in study_steps if Path(step.argv[0]).name in clis]
    for step in steps:
        command = clis[Path(step.argv[0]).name]
        args = [str(arg) for arg in step.argv[1:]]
        if "--data" in args:  # the datasets a step reads exist by the time it runs
            Path(args[args.index("--data") + 1]).mkdir(parents=True, exist_ok=True)
        if "--init-from" in args:  # and so do the checkpoints it starts from
            start = Path(args[args.index("--init-from") + 1])
            start.parent.mkdir(parents=True, exist_ok=True)
            start.touch()
        context = command.make_context(Path(step.argv[0]).name, list(args), resilient_parsing=False)
        if isinstance(command, click.Group) and args and args[0] in command.commands:
            sub = command.commands[args[0]]
            sub.make_context(args[0], args[1:], parent=context)


def recorder(out, seconds=0.0):
    """A stage stand-in that records its start and end time, its CPU affinity and its thread setting."""
    code = ("import json, os, time; start = time.time(); time.sleep({s}); "
            "json.dump(dict(start=start, end=time.time(), cpus=sorted(os.sched_getaffinity(0)), "
            "threads=os.environ.get('OMP_NUM_THREADS')), open({out!r}, 'w'))").format(s=seconds, out=str(out))
    return [sys.executable, "-c", code]


def test_steps_run_side_by_side_each_on_its_own_cpus_and_wait_for_what_they_need(tmp_path):
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
    assert seen["after_a"]["start"] >= seen["a"]["end"]
    assert "2 side by side" in lines[0] and sum("started on CPU 0" in line for line in lines) == 3
    # a step ready on its own takes every free CPU: both lanes' threads
    assert execute([step(tmp_path, "alone", recorder(record["alone"]))], echo=lines.append, cpus=(0, 0)) == []
    assert json.loads(record["alone"].read_text())["threads"] == "2"


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

    from agmae.cli import steps as runner

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


def test_each_demo_recipe_trains_its_own_model_on_its_own_maps(tmp_path):
    """--recipe wide: every run has the 192-wide model and batch 256, the third run trains on Lite0 TokenCut
    maps (no vanilla checkpoint needed); light: the trainer's demo recipe and the vanilla MAE's own maps;
    light-b256: the light model at batch 256 with its own warm-up share and own maps; light-b256-maps128: the same
    vanilla and oracle runs (one directory each) and own maps cut from the vanilla MAE's last block at 128 px."""
    from agmae.cli.demo import plan

    demo_root = tmp_path / "demo"
    light, light_dirs = plan(tmp_path / "run", demo_root, epochs=20, seed=0, recipe="light")
    wide, wide_dirs = plan(tmp_path / "run", demo_root, epochs=20, seed=0, recipe="wide")
    assert set(wide_dirs) == {"vanilla", "guided-oracle", "guided-tokencut"}
    assert set(light_dirs) == {"vanilla", "guided-oracle", "guided-mae-tokencut"}
    assert not set(light_dirs.values()) & set(wide_dirs.values())
    wide_steps = {step.id: step.argv for step in wide}
    for name in wide_dirs:
        argv = wide_steps[f"train {name}"]
        assert argv[argv.index("--embed-dim") + 1] == "192" and argv[argv.index("--batch-size") + 1] == "256"
        assert argv[argv.index("--warmup-epochs") + 1] == "1.3333"
    tokencut = wide_steps["discover tokencut"]
    assert tokencut[tokencut.index("--backbone") + 1] == "tf_efficientnet_lite0"
    light_steps = {step.id: step for step in light}
    light_vanilla = light_steps["train vanilla"].argv
    assert "--embed-dim" not in light_vanilla and light_vanilla[light_vanilla.index("--warmup-epochs") + 1] == "6.6667"
    own_maps = light_steps["discover mae-tokencut"]
    assert own_maps.needs == (light_steps["train vanilla"],)
    b256 = {step.id: step for step in plan(tmp_path / "run", demo_root, epochs=20, seed=0, recipe="light-b256")[0]}
    b256_vanilla = b256["train vanilla"].argv
    assert "--embed-dim" not in b256_vanilla and [b256_vanilla[b256_vanilla.index(option) + 1] for option in (
        "--batch-size", "--warmup-epochs")] == ["256", "2.5"]  # 2 of 16 epochs, the share kept at 20
    assert b256["discover mae-tokencut"].needs == (b256["train vanilla"],)
    maps128_steps, maps128_dirs = plan(tmp_path / "run", demo_root, epochs=20, seed=0, recipe="light-b256-maps128")
    maps128 = {step.id: step for step in maps128_steps}
    b256_dirs = plan(tmp_path / "run", demo_root, epochs=20, seed=0, recipe="light-b256")[1]
    assert [maps128_dirs[name] for name in ("vanilla", "guided-oracle")] == [b256_dirs["vanilla"],
                                                                             b256_dirs["guided-oracle"]]
    own_128 = maps128["discover mae-tokencut-128"]
    assert own_128.needs == (maps128["train vanilla"],) and own_128.all_cpus
    assert not any(step.all_cpus for step in maps128_steps if step is not own_128)
    assert [own_128.argv[own_128.argv.index(option) + 1] for option in ("--layer", "--image-size", "--backbone")] == [
        "blocks.3", "128", str(maps128_dirs["vanilla"] / "checkpoint-last.pth")]
    assert maps128["train guided-mae-tokencut-128"].needs == (own_128,)


def test_keeping_checkpoints_along_the_demo_runs_leaves_their_identities_as_they_are(tmp_path):
    """--keep-every reaches every training (learning curves of a demo run) without renaming a run or redoing a
    finished step; a negative value is refused at the door."""
    from click.testing import CliRunner

    from agmae.cli.demo import main, plan

    plain_steps, plain_dirs = plan(tmp_path / "run", tmp_path / "demo", epochs=32, seed=3)
    kept_steps, kept_dirs = plan(tmp_path / "run", tmp_path / "demo", epochs=32, seed=3, keep_every=8)
    assert kept_dirs == plain_dirs
    assert [step.recipe() for step in kept_steps] == [step.recipe() for step in plain_steps]
    trainings = [step.argv for step in kept_steps if step.kind == "train"]
    assert len(trainings) == 4  # the default recipe's first round and the three runs that continue it
    assert all(argv[argv.index("--keep-every") + 1] == "8" for argv in trainings)
    assert not any("--keep-every" in step.argv for step in plain_steps)
    result = CliRunner().invoke(main, ["--keep-every", "-1", "--out", str(tmp_path / "refused")])
    assert result.exit_code == 2 and "--keep-every" in result.output


def test_a_short_first_round_cuts_the_own_maps_of_the_32_epoch_recipe(tmp_path):
    """light-b256-e32: vanilla and both guided runs train 32 epochs (4 of warm-up); the own maps come from a 16-epoch
    vanilla run that trains exactly as light-b256's vanilla run, beside the 32-epoch one (its maps on one core), and
    that run is no row of the comparison. At --epochs 16 the first round would be the vanilla run itself."""
    from agmae.cli.demo import plan

    steps, run_dirs = plan(tmp_path / "run", tmp_path / "demo", epochs=32, seed=2, recipe="light-b256-e32")
    by_id = {step.id: step for step in steps}
    assert set(run_dirs) == {"vanilla", "guided-oracle", "guided-mae-tokencut-128"}
    first_round = by_id["train vanilla-first-round"]
    assert [first_round.argv[first_round.argv.index(o) + 1] for o in ("--epochs", "--warmup-epochs")] == ["16", "2"]
    for name in run_dirs:
        argv = by_id[f"train {name}"].argv
        assert [argv[argv.index(o) + 1] for o in ("--epochs", "--warmup-epochs", "--seed")] == ["32", "4", "2"]
    own_maps = by_id["discover mae-tokencut-128"]
    first_round_dir = Path(first_round.argv[first_round.argv.index("--out") + 1])
    assert own_maps.needs == (first_round,) and not own_maps.all_cpus
    assert own_maps.argv[own_maps.argv.index("--backbone") + 1] == str(first_round_dir / "checkpoint-last.pth")
    assert first_round_dir not in run_dirs.values()
    b256_vanilla = {step.id: step for step in plan(tmp_path / "run", tmp_path / "demo", epochs=16, seed=2,
                                                    recipe="light-b256")[0]}["train vanilla"]
    assert first_round.recipe()["command"][:-2] == b256_vanilla.recipe()["command"][:-2]  # all but --out
    assert first_round_dir.name.split("-")[-1] == b256_vanilla.argv[-1].split("-")[-1]  # the same digest
    assert [step.id for step in steps].index("train vanilla-first-round") < [step.id for step in steps].index(
        "train guided-oracle")
    short, _ = plan(tmp_path / "run", tmp_path / "demo", epochs=16, seed=2, recipe="light-b256-e32")
    short_ids = {step.id: step for step in short}
    assert "train vanilla-first-round" not in short_ids
    assert short_ids["discover mae-tokencut-128"].needs == (short_ids["train vanilla"],)
    assert short_ids["discover mae-tokencut-128"].all_cpus


def test_a_recipe_that_continues_its_first_round_starts_every_compared_run_from_its_weights(tmp_path):
    """light-b256-continue: the 16-epoch first round trains exactly as light-b256's vanilla run, on both cores;
    vanilla and both guided runs start from its final weights (--init-from) for the recipe's own epochs and warm-up
    share, and need it (so they are redone when it is); the own maps are cut from it on one core; it is no row of
    the comparison."""
    from agmae.cli.demo import DEMO_RECIPES, plan

    recipe = DEMO_RECIPES["light-b256-continue"]
    steps, run_dirs = plan(tmp_path / "run", tmp_path / "demo", epochs=recipe.epochs, seed=1,
                           recipe="light-b256-continue")
    by_id = {step.id: step for step in steps}
    first_round = by_id["train vanilla-first-round"]
    first_round_dir = Path(first_round.argv[first_round.argv.index("--out") + 1])
    assert first_round.all_cpus and "--init-from" not in first_round.argv
    b256_vanilla = {step.id: step for step in plan(tmp_path / "run", tmp_path / "demo", epochs=16, seed=1,
                                                    recipe="light-b256")[0]}["train vanilla"]
    assert first_round.recipe()["command"][:-2] == b256_vanilla.recipe()["command"][:-2]  # all but --out
    assert set(run_dirs) == {"vanilla", "guided-oracle", "guided-mae-tokencut-128"}
    assert first_round_dir not in run_dirs.values()
    warmup = f"{recipe.warmup_epochs:g}"
    assert float(warmup) == 2 * recipe.epochs / 16  # the first round's share of warm-up
    for name in run_dirs:
        training = by_id[f"train {name}"]
        argv = training.argv
        assert argv[argv.index("--init-from") + 1] == str(first_round_dir / "checkpoint-last.pth")
        assert [argv[argv.index(o) + 1] for o in ("--epochs", "--warmup-epochs", "--seed")] == [
            str(recipe.epochs), warmup, "1"]
        assert first_round in training.needs and not training.all_cpus
    own_maps = by_id["discover mae-tokencut-128"]
    assert own_maps.needs == (first_round,) and not own_maps.all_cpus
    assert own_maps.argv[own_maps.argv.index("--backbone") + 1] == str(first_round_dir / "checkpoint-last.pth")


def test_a_recipe_cannot_continue_a_first_round_it_does_not_have():
    from agmae.cli.demo import LIGHT_B256

    with pytest.raises(ValueError, match="first_round_epochs"):
        replace(LIGHT_B256, continue_first_round=True)
