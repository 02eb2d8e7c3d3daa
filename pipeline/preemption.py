"""Preemption: a cluster's notice that a job must stop, turned into a saved, resumable state and one exit code.

SLURM sends SIGTERM before it preempts a job or at its time limit (SIGKILL follows after KillWait, 30 s by
default), and SIGUSR1 ahead of time when asked (`sbatch --signal=USR1@120`). Inside `notice()` either signal only
records the request; a long loop checks `requested()` at its next safe point (a step boundary), saves what it needs
to resume, and raises `Preempted`. The process then exits with PREEMPTED, on which the sbatch templates requeue the
job; the same command, run again, resumes.

    with preemption.notice():
        for batch in loader:
            ...one step...
            if preemption.requested():
                save()
                raise preemption.Preempted(f"saved {path} at step {step}")
"""
import signal
import threading
from contextlib import contextmanager

# EX_TEMPFAIL of sysexits.h, "temporary failure, the user is invited to retry": the work is saved and the same
# command continues it. Distinct from 1 (an error), 2 (a usage error) and 128 + N (killed by signal N).
PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []  # the signals received inside notice(), in order


class Preempted(SystemExit):
    """Raised after a resumable state was saved. A SystemExit whose code is PREEMPTED, so any command line exits
    with that code without mapping it, and `except Exception` (a step runner, a cleanup) does not swallow it.
    `message` says what was saved; print it before raising, as Python prints nothing for an integer exit code."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextmanager
def notice(signals=SIGNALS):
    """While inside, SIGTERM and SIGUSR1 set `requested()` instead of ending the process; the previous handlers
    come back on exit. Re-entrant; outside the main thread (where Python cannot install handlers) it does
    nothing. Forked children (DataLoader workers) inherit the handlers, so a signal sent to the whole process
    group does not kill them under the loop."""
    if threading.current_thread() is not threading.main_thread() or any(
            signal.getsignal(number) is _record for number in signals):
        yield
        return
    _received.clear()
    previous = {number: signal.signal(number, _record) for number in signals}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def requested() -> bool:
    """Whether a preemption signal arrived inside `notice()`."""
    return bool(_received)


def signal_name() -> str:
    """The first preemption signal received, e.g. 'SIGTERM' ('' when none)."""
    return signal.Signals(_received[0]).name if _received else ""


def _record(number, frame) -> None:
    _received.append(number)
