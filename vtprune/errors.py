"""Exception types that separate a user's mistake from a bug in vtprune.

:class:`UsageError` is raised for bad input (a config value, a model vtprune cannot run, a missing file, a
CLI argument); its message says what to change. The CLI prints it in one line and exits 2. Anything else
is a bug and keeps its traceback. It subclasses ``ValueError`` so that ``except ValueError`` still catches
validation errors.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user; the message says what to do."""
