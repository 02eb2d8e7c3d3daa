"""`make demo` reuses a step only when it would be made the same way (agmae.cli.demo.run_step)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agmae.cli.demo import recipe, run_directory, run_step


def appender(out, text):
    """A stage stand-in: appends `text` to `out`, so the file shows how often it ran."""
    return [sys.executable, "-c", f"open({str(out)!r}, 'a').write({text!r})"]


def test_a_finished_step_is_not_run_again(tmp_path):
    out, marker = tmp_path / "out.txt", tmp_path / "step.done.json"
    run_step("s", appender(out, "a"), marker)
    run_step("s", appender(out, "a"), marker)
    assert out.read_text() == "a"
    recorded = json.loads(marker.read_text())
    # the script by name: another clone's .venv (another absolute path) reuses the result
    assert recorded["recipe"]["command"] == [Path(sys.executable).name, *appender(out, "a")[1:]]
    assert recorded["finished"] and recorded["seconds"] >= 0


def test_changed_options_redo_the_step_and_drop_its_stale_output(tmp_path):
    out, marker = tmp_path / "out.txt", tmp_path / "step.done.json"
    run_step("s", appender(out, "old"), marker, stale_output=out)
    run_step("s", appender(out, "new"), marker, stale_output=out)
    assert out.read_text() == "new"
    assert json.loads(marker.read_text())["recipe"] == recipe(appender(out, "new"))


def test_a_redone_input_redoes_the_steps_that_read_it(tmp_path):
    maps, maps_marker = tmp_path / "maps.txt", tmp_path / "maps.done.json"
    result, result_marker = tmp_path / "result.txt", tmp_path / "result.done.json"
    run_step("discover", appender(maps, "m1"), maps_marker, stale_output=maps)
    run_step("train", appender(result, "r"), result_marker, (maps_marker,))
    run_step("train", appender(result, "r"), result_marker, (maps_marker,))
    assert result.read_text() == "r"
    run_step("discover", appender(maps, "m2"), maps_marker, stale_output=maps)
    run_step("train", appender(result, "r"), result_marker, (maps_marker,))
    assert result.read_text() == "rr"


def test_a_killed_step_runs_again_and_keeps_its_partial_output_to_resume(tmp_path):
    out, marker = tmp_path / "out.txt", tmp_path / "step.done.json"
    killed = [sys.executable, "-c", f"open({str(out)!r}, 'a').write('half'); raise SystemExit(3)"]
    with pytest.raises(subprocess.CalledProcessError):
        run_step("s", killed, marker, stale_output=out)
    assert not json.loads(marker.read_text())["finished"]
    with pytest.raises(subprocess.CalledProcessError):  # the same recipe: the partial output stays
        run_step("s", killed, marker, stale_output=out)
    assert out.read_text() == "halfhalf"
    run_step("s", appender(out, "a"), marker, stale_output=out)  # another recipe: made afresh
    assert out.read_text() == "a" and json.loads(marker.read_text())["finished"]


def test_an_output_without_a_marker_is_of_unknown_making_and_redone(tmp_path):
    out, marker = tmp_path / "maps.h5", tmp_path / "maps.done.json"
    out.write_text("a store from an older demo version")
    run_step("discover", appender(out, "new"), marker, stale_output=out)
    assert out.read_text() == "new"


def test_runs_trained_another_way_get_their_own_directory(tmp_path):
    six = recipe(["agmae-train", "--epochs", "6"])
    twenty = recipe(["agmae-train", "--epochs", "20"])
    assert run_directory(tmp_path, "vanilla", six) == run_directory(tmp_path, "vanilla", dict(six))
    assert run_directory(tmp_path, "vanilla", six) != run_directory(tmp_path, "vanilla", twenty)
    assert run_directory(tmp_path, "vanilla", six).parent == tmp_path / "runs"
