"""Test-wide settings: no model hub, a private AGMAE_HOME so tests never touch the user's cache."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the experiment layer, run from the repository root

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _agmae_home(tmp_path_factory):
    """One AGMAE_HOME per test session; the demo dataset is built into it once and shared."""
    home = os.environ.get("AGMAE_TEST_HOME") or str(tmp_path_factory.mktemp("agmae_home"))
    os.environ["AGMAE_HOME"] = home
    os.environ.pop("AGMAE_RUN_DIR", None)
    yield home


@pytest.fixture(scope="session")
def demo_root(_agmae_home):
    """A small demo dataset (240 train, 60 per test split), built once into the session's AGMAE_HOME."""
    from agmae.data.demo import ensure_demo

    return ensure_demo(n_train=240, n_test=60)


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core CPU: OpenMP threads spin-wait far longer than they compute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
