"""One module per model family. Each registers an :class:`Integration` for its ``config.model_type`` values."""

from __future__ import annotations

from .base import Integration, get_integration, register_integration, supported_model_types

__all__ = ["Integration", "get_integration", "register_integration", "supported_model_types"]
