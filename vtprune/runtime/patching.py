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

    def unpatched(self, root: Any) -> tuple[Any, dict[int, Any]]:
        """``root`` as it was before the patches, without touching it (what a copy of it should copy).

        Every patched object, and every ``nn.Module`` on the path from ``root`` to one, is replaced by a
        shallow clone: its own ``__dict__`` with the patches undone and its children replaced likewise.
        Everything else (parameters, buffers, unpatched submodules) is shared, not copied.

        Returns:
            the clone of ``root`` (``root`` itself when nothing is patched) and ``{id(original): clone}``.
        """
        patches: dict[int, list[tuple[str, Any]]] = {}
        for obj, name, old in self._undo:
            patches.setdefault(id(obj), []).append((name, old))
        seen: dict[int, Any] = {}
        clones: dict[int, Any] = {}

        def visit(obj: Any) -> Any:
            if id(obj) in seen:
                return seen[id(obj)]
            seen[id(obj)] = obj
            children = obj.__dict__.get("_modules") or {}
            new_children = {k: visit(c) if c is not None else None for k, c in children.items()}
            moved = any(new_children[k] is not c for k, c in children.items())
            if not moved and id(obj) not in patches:
                return obj
            state = dict(obj.__dict__)
            if moved:
                state["_modules"] = type(children)(new_children)
            for name, old in reversed(patches.get(id(obj), [])):  # undone as restore() does
                if old is _MISSING:
                    state.pop(name, None)
                else:
                    state[name] = old
            clone = object.__new__(type(obj))
            clone.__dict__.update(state)
            seen[id(obj)] = clones[id(obj)] = clone
            return clone

        return visit(root), clones

    def restore(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
