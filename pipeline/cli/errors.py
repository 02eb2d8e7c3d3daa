"""What the command lines say when the user's input, the environment or a dataset fails them: one line naming the
file and the way out. Any other exception is a bug and keeps its traceback."""
import errno
from contextlib import contextmanager

import click

from agmae.data import demo
from agmae.errors import UserError

ADVICE = {
    errno.ENOSPC: "free space there or write to another --out / --run-dir",
    errno.EDQUOT: "free space within your quota or write to another --out / --run-dir",
    errno.EROFS: "the file system is read-only; write to another --out / --run-dir",
    errno.EACCES: "you may not write there; write to another --out / --run-dir",
    errno.EPERM: "you may not write there; write to another --out / --run-dir",
}


def environment_error(err: OSError) -> click.ClickException:
    """A ClickException of one line for an OSError of the environment (disk full, read-only, no access).
    The writers replace files atomically, so nothing half-written is left looking complete."""
    where = f"{err.filename}: " if err.filename else ""
    advice = ADVICE.get(err.errno, "check the path and the disk, then run the same command again")
    return click.ClickException(f"{where}{err.strerror or err}; {advice} (nothing incomplete was left behind)")


@contextmanager
def user_errors():
    """Inside, a UserError becomes a one-line click error and an OSError the one line of `environment_error`;
    every other exception passes with its traceback."""
    try:
        yield
    except UserError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise environment_error(err) from None


def demo_data_at_the_door(data, **demo_options):
    """The dataset root a command runs on: --data, or, for a bare command, the built-in demo dataset (built once into
    AGMAE_HOME), said on stderr. The one place where a command chooses the demo; the stages only see a root."""
    if data is not None:
        return data
    root = demo.ensure_demo(**demo_options)
    click.echo(f"no --data: running on the built-in demo dataset {root}", err=True)
    return str(root)
