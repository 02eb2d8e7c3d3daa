"""Test-wide settings: no model hub, a private AGMAE_HOME so tests never touch the user's cache."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _agmae_home(tmp_path_factory):
    """One AGMAE_HOME per test session; the demo dataset is built into it once and shared."""
    home = os.environ.get("AGMAE_TEST_HOME") or str(tmp_path_factory.mktemp("agmae_home"))
    os.environ["AGMAE_HOME"] = home
    os.environ.pop("AGMAE_RUN_DIR", None)
    yield home
