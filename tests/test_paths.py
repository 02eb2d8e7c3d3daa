"""agmae.paths: an AGMAE_HOME that cannot be a directory is refused in one line that names it."""
import pytest
from click.testing import CliRunner

from agmae.errors import UserError
from agmae.paths import agmae_home, default_run_dir


@pytest.mark.parametrize("home", ["/proc/agmae-home", "{file}/home"])
def test_an_unusable_agmae_home_is_named_with_the_fix(home, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    home = home.format(file=tmp_path / "file")
    monkeypatch.setenv("AGMAE_HOME", home)
    monkeypatch.delenv("AGMAE_RUN_DIR", raising=False)
    for where in (agmae_home, default_run_dir):
        with pytest.raises(UserError, match=rf"AGMAE_HOME={home} cannot be used as agmae's cache directory "
                                            r"\(.+\); set AGMAE_HOME to a directory you can write"):
            where()


def test_agmae_home_is_created_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("AGMAE_HOME", str(tmp_path / "new" / "home"))
    assert agmae_home() == tmp_path / "new" / "home" and agmae_home().is_dir()


def test_agmae_eval_names_an_unusable_agmae_home_in_one_line(tmp_path, monkeypatch):
    from agmae.cli.eval import main

    monkeypatch.setenv("AGMAE_HOME", "/proc/agmae-home")
    monkeypatch.delenv("AGMAE_RUN_DIR", raising=False)
    result = CliRunner().invoke(main, ["knn"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert "AGMAE_HOME=/proc/agmae-home cannot be used" in errors[0] and "Errno" not in errors[0]
