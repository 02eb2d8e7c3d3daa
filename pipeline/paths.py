"""Where things live when the user gives no path.

`AGMAE_HOME` (default `~/.cache/agmae`) holds caches (the demo dataset, image-folder
indexes, feature caches). The default run directory is where the three stages find each
other's outputs, so `agmae-discover --method tokencut && agmae-train && agmae-eval knn`
works as typed.
"""
import os
from pathlib import Path

from agmae.errors import UserError

# Preference order when a stage must pick one of several map stores on its own:
# the paper's best-performing discovery method first.
METHOD_PREFERENCE = ("tokencut", "dino", "gradcam", "oracle")


def agmae_home() -> Path:
    """`AGMAE_HOME`, created if missing; refused in one line where it cannot be a directory."""
    home = Path(os.environ.get("AGMAE_HOME", Path.home() / ".cache" / "agmae")).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"AGMAE_HOME={home} cannot be used as agmae's cache directory ({err.strerror}); set "
                        f"AGMAE_HOME to a directory you can write (unset, it is ~/.cache/agmae)") from err
    return home


def default_run_dir() -> Path:
    """`AGMAE_RUN_DIR`, else `AGMAE_HOME/runs/default`."""
    env = os.environ.get("AGMAE_RUN_DIR")
    return Path(env).expanduser() if env else agmae_home() / "runs" / "default"


def maps_path(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / f"maps-{method}.h5"


def maps_method(store: Path) -> str:
    """The method of a store that maps_path named: maps-tokencut.h5 -> tokencut."""
    return Path(store).stem.removeprefix("maps-")


def default_maps(run_dir: Path) -> Path:
    """The map store a training run uses when `--maps` is not given."""
    for method in METHOD_PREFERENCE:
        path = maps_path(run_dir, method)
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no map store in {run_dir} (looked for maps-{{{','.join(METHOD_PREFERENCE)}}}.h5); "
        "run `agmae-discover --method tokencut` first, pass --maps FILE, or train with --no-guidance"
    )


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint-last.pth"
