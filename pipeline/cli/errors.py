"""What the command lines say when the environment or a dataset fails them: one line naming the file and the way
out."""
import errno

import click

from agmae.data.folder import split_folder

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


def require_splits(root, splits) -> None:
    """Refuse, before any work, a dataset root that lacks one of `splits`, with split_folder's one-line error (which
    names the splits ROOT has) as a click usage error."""
    try:
        for split in splits:
            split_folder(root, split, option="--test-split")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data / --test-split") from None
