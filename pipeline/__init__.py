"""Plumbing shared by the stages: CLIs, run directories, the attention store, distributed set-up."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("agmae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
