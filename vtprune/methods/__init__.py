"""Pruning methods: one module per method, each registering its config and its token scorer.

A *scorer* turns what the model computed (the vision probe's attention, or nothing at all) into one
importance score per visual token of each image; :mod:`vtprune.selection` turns scores into kept tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import PruneConfig

__all__ = ["MethodSpec", "register_method", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """How a method is run.

    Attributes:
        config_cls: the method's config dataclass.
        probe: which attention statistic the vision encoder must record (``"cls"`` for [CLS]->patch
            attention, ``None`` when the method needs no attention).
        make_scorer: ``make_scorer(config) -> scorer``; ``scorer(probe_scores: list[Tensor(n_i,)] | None,
            sizes: list[int]) -> list[Tensor(n_i,)]`` gives one score per visual token of each image.
    """

    config_cls: type[PruneConfig]
    probe: str | None
    make_scorer: Callable


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_cls: type[PruneConfig], *, probe: str | None):
    def deco(make_scorer: Callable) -> Callable:
        _METHODS[config_cls.method] = MethodSpec(config_cls, probe, make_scorer)
        return make_scorer

    return deco


def get_method(config: PruneConfig) -> MethodSpec:
    _ensure_loaded()
    try:
        return _METHODS[config.method]
    except KeyError:
        raise ValueError(f"no handler registered for method {config.method!r}") from None


def _ensure_loaded() -> None:
    from . import fastervlm, random_prune  # noqa: F401  (registration side effects)
