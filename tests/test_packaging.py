"""One import root: everything installs under `agmae`, so a user's own train.py or data/ cannot shadow it."""
import importlib.util
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest

CLIS = ("discover", "train", "eval")
SCRIPTS = ("agmae-discover", "agmae-train", "agmae-eval")


def test_the_distribution_installs_one_top_level_name():
    dist = distribution("agmae")
    assert dist.read_text("top_level.txt").split() == ["agmae"]
    # An editable install maps its packages through a finder; each must live under agmae.
    finders = [f for f in dist.files if f.name.endswith("_finder.py")]
    for finder in finders:
        spec = importlib.util.spec_from_file_location("agmae_finder", finder.locate())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert set(module.MAPPING) == {"agmae", "agmae.data", "agmae.discovery", "agmae.train", "agmae.eval"}


@pytest.fixture
def shadowing_dir(tmp_path):
    """A research folder with the commonest file names of the field, each of which breaks on import."""
    for name in ("train.py", "eval.py", "discovery.py", "pipeline.py"):
        (tmp_path / name).write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise ImportError('the user\\'s own data/ was imported')\n")
    return tmp_path


def test_imports_and_clis_work_beside_a_users_own_train_eval_and_data(shadowing_dir):
    code = ("import agmae.train.loss, agmae.train.engine, agmae.eval.knn, agmae.data.folder, "
            "agmae.discovery.tokencut, agmae.store; print(agmae.train.loss.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=shadowing_dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).parent.name == "train" and str(shadowing_dir) not in done.stdout
    bin_dir = Path(sys.executable).parent
    for script in SCRIPTS:
        done = subprocess.run([str(bin_dir / script), "--help"], cwd=shadowing_dir, capture_output=True, text=True)
        assert done.returncode == 0 and "Usage:" in done.stdout, (script, done.stderr)


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_runs_as_python_m(shadowing_dir, cli):
    done = subprocess.run([sys.executable, "-m", f"agmae.cli.{cli}", "--help"], cwd=shadowing_dir,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "Options:" in done.stdout
