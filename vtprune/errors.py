"""Exception types that separate a user's mistake from a bug in vtprune.

:class:`UsageError` is raised for bad input (a config value, a model vtprune cannot run, a missing file, a
CLI argument); its message says what to change. The CLI prints it in one line and exits 2. Anything else
is a bug and keeps its traceback. It subclasses ``ValueError`` so that ``except ValueError`` still catches
validation errors.
"""

from __future__ import annotations

__all__ = ["UsageError", "UsageTypeError", "UnsupportedError"]


class UsageError(ValueError):
    """Bad input from the user; the message says what to do."""


class UsageTypeError(UsageError, TypeError):
    """The wrong kind of argument: an option the method does not have, an object that is not a model."""


class UnsupportedError(UsageError, NotImplementedError):
    """A model, input or setting vtprune cannot run (yet); the message says what is supported."""
