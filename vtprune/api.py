"""The public verbs: ``wrap`` a model with a pruning method, ``unwrap`` it back."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import integrations, methods  # noqa: F401  (importing them registers every method and family)
from .config import PruneConfig
from .errors import UsageError, UsageTypeError
from .runtime.pruner import Pruner

__all__ = ["wrap", "unwrap", "get_pruner", "is_wrapped"]


def _make_config(config_or_name: PruneConfig | str | dict, overrides: dict[str, Any]) -> PruneConfig:
    if isinstance(config_or_name, str):
        return PruneConfig.from_dict({"method": config_or_name, **overrides})
    if isinstance(config_or_name, dict):
        return PruneConfig.from_dict({**config_or_name, **overrides})
    if isinstance(config_or_name, PruneConfig):
        if type(config_or_name) is PruneConfig:
            raise UsageTypeError("PruneConfig is abstract; use a method's config (e.g. FasterVLMConfig)")
        config = config_or_name.replace(**overrides) if overrides else config_or_name
        config.validate()  # catches fields mutated after construction
        return config
    raise UsageTypeError(
        f"expected a method name, a config dict or a PruneConfig, got {type(config_or_name).__name__}"
    )


def wrap(model: nn.Module, config_or_name: PruneConfig | str | dict | list, **overrides: Any) -> nn.Module:
    """Patch ``model`` in place to prune visual tokens, and return it.

    Args:
        model: a transformers VLM (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``...).
        config_or_name: a method config, its JSON dict, or a method name (``"fastervlm"``, ``"random"``);
            or a list of them to compose one pre-LLM method with one in-LLM method, e.g.
            ``[FasterVLMConfig(keep_ratio=0.5), FastVConfig(layer=2)]`` (overrides are then refused).
        **overrides: config fields, e.g. ``keep_ratio=0.1``.

    Example:
        >>> model = vtprune.wrap(model, "fastervlm", keep_ratio=0.1)
        >>> out = model.generate(**inputs)
        >>> vtprune.get_pruner(model).last[0].visual_out  # visual tokens kept for sample 0
        >>> vtprune.unwrap(model)
    """
    if is_wrapped(model):
        raise RuntimeError("model is already wrapped by vtprune; call vtprune.unwrap(model) first")
    if isinstance(config_or_name, (list, tuple)):
        if overrides or not config_or_name:
            raise UsageError(
                "pass a non-empty list of configs (or dicts) to compose, without keyword overrides"
            )
        config = tuple(_make_config(c, {}) for c in config_or_name)
    else:
        config = _make_config(config_or_name, overrides)
    Pruner(model, config).attach()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every vtprune patch; the model computes exactly what it did before ``wrap``."""
    pruner = get_pruner(model)
    pruner.detach()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("_vtprune"), Pruner)


def get_pruner(model: nn.Module) -> Pruner:
    """The :class:`~vtprune.runtime.pruner.Pruner` of a wrapped model (config, last selection)."""
    pruner = model.__dict__.get("_vtprune")
    if not isinstance(pruner, Pruner):
        raise UsageError("model is not wrapped by vtprune; call vtprune.wrap(model, ...) first")
    return pruner
