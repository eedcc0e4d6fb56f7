"""A cheap host-side stopwatch for a pruner's selection work (scoring, keep rules, transforms, layer plans)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

__all__ = ["Stopwatch"]


class Stopwatch:
    """Host wall-clock seconds spent inside timed regions since the last :meth:`reset`.

    Used as ``with stopwatch: ...`` or through :meth:`timed` wrappers. Nested regions count once (only the
    outermost is timed). It only reads ``time.perf_counter`` and never synchronises a device: on CUDA it
    measures the host time to launch the work (plus any synchronisation the timed code makes itself, such
    as reading a count back), not the device time; on CPU, where work runs as it is called, the time of the
    work itself.

    Attributes:
        seconds: summed time of the outermost regions.
        calls: how many outermost regions ran.
    """

    __slots__ = ("seconds", "calls", "_depth", "_start")

    def __init__(self) -> None:
        self._depth = 0
        self._start = 0.0
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __enter__(self) -> Stopwatch:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._start
            self.calls += 1

    def timed(self, fn: Callable | None) -> Callable | None:
        """``fn`` wrapped so that each call is a timed region (None stays None)."""
        if fn is None:
            return None

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        return run
