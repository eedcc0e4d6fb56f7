"""What a model family must tell the pruning runtime, and the registry keyed by ``config.model_type``."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Integration", "register_integration", "get_integration", "supported_model_types"]

_FAMILY_MODULES = ("llava", "qwen_vl")  # imported lazily; each registers its model types
_REGISTRY: dict[str, type[Integration]] = {}


def register_integration(cls: type[Integration]) -> type[Integration]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def _load_all() -> None:
    for name in _FAMILY_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def supported_model_types() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_integration(model: nn.Module) -> Integration:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"vtprune.wrap expects a transformers model with a config, got {type(model).__name__}"
        )
    _load_all()
    if model_type not in _REGISTRY:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported yet; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type](model)


class Integration:
    """Family-specific facts. Subclasses set ``model_types`` and implement the probe hooks.

    Attributes:
        default_positions: position mode used when a config says ``positions="auto"``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    default_positions: ClassVar[str] = "contiguous"

    def __init__(self, model: nn.Module):
        self.model = model
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "language_model") or not hasattr(inner, "get_image_features"):
            raise TypeError(
                f"{type(model).__name__} does not look like a transformers *ForConditionalGeneration model "
                "(expected .model.language_model and .model.get_image_features); wrap the full VLM"
            )

    @property
    def inner(self) -> nn.Module:
        """The multimodal base model (``LlavaModel``, ``Qwen2VLModel``...)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def check(self, config) -> None:
        """Raise a clear error for settings this family cannot run."""

    def probe_target(self, config, kind: str) -> tuple[nn.Module, str]:
        """The vision attention module to probe for a method asking for ``kind`` (``"cls"``), and the
        statistic actually recorded there (``"cls"`` or the CLS-free ``"received"``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot score visual tokens by attention")

    def image_scores(
        self, records: list[torch.Tensor], features: list[torch.Tensor], encode_args: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Turn the probe's records into one score per visual token of each image (aligned with
        ``features``, the per-image feature tensors ``get_image_features`` returned)."""
        raise NotImplementedError
