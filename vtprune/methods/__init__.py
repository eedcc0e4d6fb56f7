"""Pruning methods: one module per method, each registering its config and how it runs.

A method acts at one of two stages:

* ``"pre"``: a *scorer* turns what the vision encoder computed (the probe's attention, or nothing at all)
  into one score per visual token of each image; :mod:`vtprune.selection` keeps the top ones before the
  LLM.
* ``"layers"``: a :class:`~vtprune.layers.LayerPlan` decides, after decoder layers, which visual tokens the
  later layers keep (:mod:`vtprune.layers`).
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
        make_scorer: pre stage: ``make_scorer(config) -> scorer``; ``scorer(probe_scores: list[Tensor(n_i,)]
            | None, sizes: list[int]) -> list[Tensor(n_i,)]`` gives one score per visual token of each image.
        make_plan: layers stage: ``make_plan(config, num_layers, model=None) -> LayerPlan``.
    """

    config_cls: type[PruneConfig]
    probe: str | None
    make_scorer: Callable | None = None
    make_plan: Callable | None = None

    @property
    def stage(self) -> str:
        return "layers" if self.make_plan is not None else "pre"


_METHODS: dict[str, MethodSpec] = {}


def register_method(config_cls: type[PruneConfig], *, probe: str | None = None, stage: str = "pre"):
    """Decorator for a method's factory: a scorer factory (``stage="pre"``) or a plan factory
    (``stage="layers"``)."""
    if stage not in ("pre", "layers"):
        raise ValueError(f"stage must be 'pre' or 'layers', got {stage!r}")

    def deco(factory: Callable) -> Callable:
        key = "make_scorer" if stage == "pre" else "make_plan"
        _METHODS[config_cls.method] = MethodSpec(config_cls, probe, **{key: factory})
        return factory

    return deco


def get_method(config: PruneConfig) -> MethodSpec:
    _ensure_loaded()
    try:
        return _METHODS[config.method]
    except KeyError:
        raise ValueError(f"no handler registered for method {config.method!r}") from None


def _ensure_loaded() -> None:
    from . import dyvte, fastervlm, fastv, random_prune, visual_exit  # noqa: F401  (registration side effects)
