"""agmae.preemption: inside notice() SIGTERM/SIGUSR1 only set a flag, the handlers come back after, and
Preempted exits with PREEMPTED."""
import os
import signal
import subprocess
import sys

import pytest

from agmae import preemption


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_inside_notice_is_recorded_not_fatal(number):
    before = signal.getsignal(number)
    with preemption.notice():
        assert not preemption.requested()
        os.kill(os.getpid(), number)
        assert preemption.requested()
        assert preemption.signal_name() == signal.Signals(number).name
        with preemption.notice():  # nested: keeps the request
            assert preemption.requested()
    assert signal.getsignal(number) is before


def test_preempted_exits_with_its_code():
    code = "from agmae.preemption import Preempted\nprint('saved', flush=True)\nraise Preempted('saved x')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == preemption.PREEMPTED == 75
    assert done.stdout == "saved\n" and done.stderr == ""
    assert str(preemption.Preempted("saved x")) == "saved x"
    assert not isinstance(preemption.Preempted("x"), Exception)  # `except Exception` does not swallow it
