"""What the command lines say when the environment fails them: one line naming the file and the way out."""
import errno

import click

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
