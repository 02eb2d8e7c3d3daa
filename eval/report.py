"""results.json in a run directory, and the compact tables the CLI prints.

results.json maps a protocol key ("knn", "linear", "linear-cached", "retrieval", ...) to one
entry: checkpoint path and SHA-256, dataset fingerprint, options, numbers, time. Each command
replaces only its own key; the update is a locked read-modify-write finished by os.replace,
so concurrent evaluations of one run neither lose each other's keys nor leave half a file.
"""
import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path

from agmae.checkpoint import atomic_write_text
from agmae.errors import UserError

RESULTS_NAME = "results.json"


def results_path(run_dir) -> Path:
    return Path(run_dir) / RESULTS_NAME


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_results(run_dir) -> dict:
    path = results_path(run_dir)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); move it away and re-run the evaluation") from err


def update_results(run_dir, protocol: str, entry: dict) -> Path:
    """Set results[protocol] = entry (+ "time"), keeping every other key; atomic. Returns the file."""
    path = results_path(run_dir)
    with _locked(path):
        results = read_results(run_dir)
        results[protocol] = {**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(json.dumps(results, indent=2, sort_keys=True) + "\n", path)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: floats with 2 decimals, None as '-', columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
