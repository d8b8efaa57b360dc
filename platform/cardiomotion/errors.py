"""Errors the library raises for bad input; the CLI turns them into one line and exit 2."""
from __future__ import annotations

from pathlib import Path


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined by a space, runs of white space collapsed."""
    return " ".join(str(text).split())


class CardiomotionError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(CardiomotionError):
    """Bad input: names the offending file (or setting) and the problem, in one line."""

    def __init__(self, where: str | Path | None, problem: str):
        self.where = str(where) if where is not None else None
        self.problem = one_line(problem)  # a library's message quoted in it may hold newlines (nibabel's do)
        super().__init__(f"{self.where}: {self.problem}" if self.where else self.problem)

    def __reduce__(self):
        # Rebuild from the constructor's own arguments: the default (type, self.args) would call
        # __init__ with the formatted message only, so an InputError raised inside a Ray worker
        # could not cross back to the driver (TypeError: missing 'problem').
        return (type(self), (self.where, self.problem))


class StageFailed(CardiomotionError):
    """A stage stopped on a fault of its environment (disk full, read-only file system, a lost
    worker) rather than on bad input: what it finished is kept, and rerunning the same command
    resumes. The CLI prints it in one line and exits 2."""


class ConfigError(InputError):
    """An invalid configuration file or value."""
