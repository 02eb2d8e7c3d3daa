"""The step runner of `make demo` and the study: each step is one stage command in a subprocess (exactly
what users run), skipped when its marker records that it finished with the same recipe.

A step's recipe is its command (the program by name, so another clone's .venv reuses the result; without
the RESULT_NEUTRAL_OPTIONS) and the recipes of the steps it reads (`needs`), so redoing an input redoes
everything made from it. The marker is written before the command starts (finished: false) and again
when it exits 0. The same recipe unfinished is a killed step: it runs again and the stage resumes its own
output. Another recipe, or an output with no marker at all, means `stale_output` was made another way:
it is removed and the step redone.

With `cpus`, `execute` runs steps side by side: each started step gets its own CPUs (its process
pinned to them, its thread count set to their number), so no two processes compete for a core: torch
slows many times over when another process takes one of its cores, and two pinned 1-thread trainings
train more images per second in all than one 2-thread training (docs/PERFORMANCE.md#the-demo).
"""
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click

from agmae.checkpoint import atomic_write_text

# Options that change how a step runs, not what it computes.
RESULT_NEUTRAL_OPTIONS = ("--keep-every",)


def console_script(name: str) -> str:
    """The console script `name` installed beside this interpreter: the environment's own `agmae-*`."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise click.ClickException(f"{path} not found; install the package into this environment "
                                   f"(make install, or pip install -e .) and run with that environment's python")
    return str(path)


def result_argv(argv: list) -> list:
    """A command as far as its result goes: the program by name and without RESULT_NEUTRAL_OPTIONS and
    their values."""
    kept, skip_value = [Path(argv[0]).name], False
    for arg in argv[1:]:
        if skip_value:
            skip_value = False
        elif arg in RESULT_NEUTRAL_OPTIONS:
            skip_value = True
        else:
            kept.append(str(arg))
    return kept


@dataclass
class Step:
    """One subprocess. `log`: a file its output is appended to (None: the console)."""

    id: str
    argv: list
    marker: Path
    needs: tuple = ()  # the Steps whose outputs it reads
    kind: str = ""  # dataset, discover, train, eval: groups the time estimates
    log: Path | None = None
    estimate: float = 0.0
    run_dir: Path | None = None
    stale_output: Path | None = None
    cpus: tuple | None = None  # set by `execute` when steps run side by side: the CPUs it may use
    # scheduling only (not part of the recipe): side by side, wait until every CPU is free and take them all, and
    # start no later-listed step meanwhile; for a step that everything after it waits for
    all_cpus: bool = False

    def recipe(self) -> dict:
        return {"command": result_argv(self.argv), "inputs": [need.recipe() for need in self.needs]}

    def recorded(self) -> dict | None:
        return json.loads(self.marker.read_text()) if self.marker.is_file() else None

    def done(self) -> bool:
        recorded = self.recorded()
        return bool(recorded and recorded.get("finished") and recorded.get("recipe") == self.recipe())

    def stale(self) -> bool:
        """Marked with another recipe than this step's now: its output was made another way."""
        recorded = self.recorded()
        return recorded is not None and recorded.get("recipe") != self.recipe()

    def seconds(self) -> float:
        return self.recorded()["seconds"] if self.done() else 0.0

    def _mark(self, finished: bool, seconds: float | None = None) -> None:
        record = {"recipe": self.recipe(), "argv": [str(arg) for arg in self.argv], "finished": finished,
                  "seconds": None if seconds is None else round(seconds, 1),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(json.dumps(record, indent=1) + "\n", self.marker)


def cpu_set() -> tuple:
    """The CPUs this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(range(os.cpu_count()))


# Every process `spawn` started that has not been waited for: `execute` ends them when it is interrupted
# while steps run side by side, as the runner of a step running in the main thread does by itself.
_live_processes: set = set()


def spawn(step: Step, **popen) -> subprocess.Popen:
    """Start the step's command; with `step.cpus`, pinned to those CPUs with that many threads. The
    affinity is set before the interpreter starts its threads, which inherit it, as do loader workers.

    Pinned, OpenMP's threads wait passively (unless OMP_WAIT_POLICY says otherwise): a step's loader workers share
    its CPUs, and compute threads spinning at each barrier take those CPUs from them (docs/PERFORMANCE.md#training);
    the results are the same either way."""
    env = None
    if step.cpus is not None:
        threads = str(len(step.cpus))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    process = subprocess.Popen([str(arg) for arg in step.argv], env=env, **popen)
    if step.cpus is not None:
        os.sched_setaffinity(process.pid, step.cpus)
    _live_processes.add(process)
    return process


def wait_or_end(process: subprocess.Popen) -> int:
    """The process's exit status; if the wait is interrupted (SIGINT, SIGTERM), the process is ended first."""
    try:
        return process.wait()
    finally:
        end(process)


def end(process: subprocess.Popen) -> None:
    """Terminate the process if it still runs (killed if it takes over 30 s), and forget it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    _live_processes.discard(process)


def stream_runner(step: Step) -> int:
    """Run the step's command with its output on the console."""
    return wait_or_end(spawn(step))


def log_runner(step: Step, cwd=None) -> int:
    """Run the step's command with stdout and stderr appended to its log; killing the runner by SIGINT or
    SIGTERM takes the running step down with it (the step resumes on the next run)."""
    step.log.parent.mkdir(parents=True, exist_ok=True)
    with open(step.log, "a") as log:
        log.write(f"\n$ {shlex.join(str(arg) for arg in step.argv)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        return wait_or_end(spawn(step, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))


def run_step(step: Step, runner=stream_runner) -> tuple[int, float]:
    """Run the step unless it is done; returns (exit status, seconds). A stale output is removed first."""
    if step.done():
        return 0, 0.0
    if (step.stale() or step.recorded() is None) and step.stale_output is not None:
        step.stale_output.unlink(missing_ok=True)
    step.marker.parent.mkdir(parents=True, exist_ok=True)
    step._mark(finished=False)
    started = time.monotonic()
    status = runner(step)
    seconds = time.monotonic() - started
    if status == 0:
        step._mark(finished=True, seconds=seconds)
    return status, seconds


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _last_line(path: Path | None) -> str:
    if path is None or not path.exists():
        return "(see the output above)"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[-200:] if lines else "(empty log)"


def execute(steps: list, runner=stream_runner, echo=click.echo, on_step_done=lambda step: None,
            cpus: tuple | None = None) -> list:
    """Run every pending step, each once the steps it needs are done; returns the ids of the steps that
    failed or were skipped because a step they need failed. Prints one line per step with the elapsed time
    and an ETA that rescales each kind's estimates by the times measured so far.

    cpus None: one step at a time, in list order, each with the whole machine. Otherwise steps run side by
    side on these CPUs: a ready step takes its share of the free ones (all of them when it is the only one
    ready, one each when as many are ready as CPUs are free), in list order; an `all_cpus` step waits for all
    of them, and the steps listed after it wait for it to start."""
    pending = [step for step in steps if not step.done()]
    estimated_total = sum(step.estimate for step in pending)
    lanes = len(cpus) if cpus else 1
    echo(f"{len(steps)} steps, {len(pending)} to do" + (f", {lanes} side by side" if cpus else "")
         + (f", first estimate {duration(estimated_total / lanes)}" if estimated_total else ""))
    measured, estimated, failed, started = {}, {}, [], time.monotonic()
    free, waiting, running, finished = list(cpus or ()), list(pending), [], queue.Queue()
    reported = 0

    def eta(remaining) -> float:
        overall = sum(measured.values()) / sum(estimated.values()) if sum(estimated.values()) else 1.0
        return sum(step.estimate * (measured[step.kind] / estimated[step.kind] if estimated.get(step.kind)
                                    else overall) for step in remaining) / lanes

    def report(step, status, seconds) -> None:
        nonlocal reported
        reported += 1
        prefix = f"[{reported:>3}/{len(pending)}] {step.id}"
        if status == 0:
            measured[step.kind] = measured.get(step.kind, 0.0) + seconds
            estimated[step.kind] = estimated.get(step.kind, 0.0) + step.estimate
            outcome = "ok"
        else:
            failed.append(step.id)
            outcome = (f"FAILED ({status})" if isinstance(status, str) else
                       f"FAILED (exit {status}; {step.log or 'console'}: {_last_line(step.log)})")
        remaining = [s for s in waiting + running if not any(need.id in failed for need in s.needs)]
        echo(f"{prefix}: {outcome} in {duration(seconds)} | elapsed {duration(time.monotonic() - started)}"
             + (f" | ETA {duration(eta(remaining))}" if estimated_total else ""))
        if status == 0:
            on_step_done(step)

    def start(step) -> None:
        waiting.remove(step)
        if step.stale():
            echo(f"      {step.id}: made with another recipe; redoing it")
        if not cpus:
            report(step, *run_step(step, runner))
            return
        running.append(step)
        echo(f"      {step.id}: started on CPU {','.join(map(str, step.cpus))}"
             + (f", log {step.log}" if step.log else ""))

        def work():
            try:
                finished.put((step, *run_step(step, runner)))
            except Exception as error:  # reported as the step's failure, not lost in a thread
                finished.put((step, f"{type(error).__name__}: {error}", 0.0))
        threading.Thread(target=work, daemon=True).start()

    try:
        while waiting or running:
            for step in [s for s in waiting if any(need.id in failed for need in s.needs)]:
                waiting.remove(step)
                failed.append(step.id)
                reported += 1
                echo(f"[{reported:>3}/{len(pending)}] {step.id}: skipped, a step it needs failed")
            ready = [s for s in waiting if all(need.done() for need in s.needs)]
            if not cpus:
                if not ready:
                    break
                start(ready[0])
                continue
            while ready and free:
                if ready[0].all_cpus and len(free) < len(cpus):
                    break
                share = len(free) if ready[0].all_cpus else max(1, len(free) // len(ready))
                step = ready.pop(0)
                step.cpus, free[:share] = tuple(free[:share]), []
                start(step)
            if not running:
                break
            try:  # a timed wait, so that an interrupt is taken even where it does not wake a blocked lock
                step, status, seconds = finished.get(timeout=0.5)
            except queue.Empty:
                continue
            running.remove(step)
            free = sorted(free + list(step.cpus))
            step.cpus = None
            report(step, status, seconds)
    except KeyboardInterrupt:  # steps running side by side wait in other threads: end their processes here
        for process in list(_live_processes):
            end(process)
        raise
    for step in waiting:  # their needs are neither done nor pending: nothing will make them
        failed.append(step.id)
        echo(f"      {step.id}: not run, a step it needs is not in the plan and not done")
    return failed


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (a batch scheduler's time limit, `kill PID`) raise KeyboardInterrupt as Ctrl-C does, so
    that `execute` ends the running steps instead of leaving them running without it."""
    signal.signal(signal.SIGTERM, _interrupt)
