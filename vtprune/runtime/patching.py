"""Reversible attribute patches: every change is recorded and undone exactly, in reverse order."""

from __future__ import annotations

from typing import Any

__all__ = ["Patcher"]

_MISSING = object()


class Patcher:
    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name`` as an *instance* attribute (shadowing a class attribute or method)."""
        self._undo.append((obj, name, obj.__dict__.get(name, _MISSING)))
        # Straight into the instance dict: nn.Module.__setattr__ would route modules/tensors elsewhere.
        obj.__dict__[name] = value

    def restore(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
