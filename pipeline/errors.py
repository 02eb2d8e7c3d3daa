"""The one class of error a user can fix: a bad option, a missing or damaged file, a store of other images.

The command lines print a `UserError` as one line (its message names the file and the fix) and let every other
exception keep its traceback, so a bug deep in numpy or torch is never dressed up as bad input. It subclasses
ValueError so that Python callers catching ValueError keep working.
"""


class UserError(ValueError):
    """A problem in the user's input or environment, with a one-line message that names the file and the fix."""
