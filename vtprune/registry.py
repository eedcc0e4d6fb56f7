"""The two registries: methods keyed by config type, families keyed by ``config.model_type``.

A method module registers a *handler* for its config class::

    @register_method(FasterVLMConfig)
    def _parts(config: FasterVLMConfig, family: Integration) -> MethodParts: ...

and a family module registers its :class:`~vtprune.integrations.base.Integration` subclass with
``@register_family``. The packages :mod:`vtprune.methods` and :mod:`vtprune.integrations` import each of
their modules when imported, so adding a module is all it takes; this module imports neither (no cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import PruneConfig
from .errors import UnsupportedError, UsageError, UsageTypeError

if TYPE_CHECKING:
    from .integrations.base import Integration
    from .runtime.parts import MethodParts

__all__ = [
    "register_method",
    "method_parts",
    "registered_configs",
    "register_family",
    "get_family",
    "supported_model_types",
    "family_class",
]

Handler = Callable[[PruneConfig, "Integration"], "MethodParts"]
_HANDLERS: dict[type[PruneConfig], Handler] = {}
_FAMILIES: dict[str, type[Integration]] = {}


def register_method(config_cls: type[PruneConfig]) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(config, family) -> MethodParts`` runs ``config_cls`` configs."""
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__} must set the class attribute method = '<name>'")

    def deco(handler: Handler) -> Handler:
        if config_cls in _HANDLERS:
            raise ValueError(f"method {config_cls.method!r} already has a handler")
        _HANDLERS[config_cls] = handler
        return handler

    return deco


def registered_configs() -> dict[str, type[PruneConfig]]:
    """Method name -> config class, for every method with a handler."""
    return {cls.method: cls for cls in _HANDLERS}


def method_parts(config: PruneConfig, family: Integration) -> MethodParts:
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise UsageError(
            f"no handler registered for {type(config).__name__}; available methods: "
            f"{', '.join(sorted(registered_configs()))}"
        )
    return handler(config, family)


def register_family(cls: type[Integration]) -> type[Integration]:
    """Class decorator: the integration runs models whose ``config.model_type`` is in ``cls.model_types``."""
    for model_type in cls.model_types:
        if model_type in _FAMILIES and _FAMILIES[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} is already registered by {_FAMILIES[model_type]}")
        _FAMILIES[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_class(model_type: str) -> type[Integration] | None:
    """The integration class registered for ``model_type``, or None (no model needed, unlike
    :func:`get_family`: e.g. to load a checkpoint's processor before its weights)."""
    return _FAMILIES.get(model_type)


def get_family(model) -> Integration:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UsageTypeError(
            f"vtprune.wrap expects a transformers model with a config, got {type(model).__name__}"
        )
    if model_type not in _FAMILIES:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return _FAMILIES[model_type](model)
