"""One module per model family; each registers an :class:`Integration` for its ``config.model_type`` values.

Importing this package imports every module in it (a new family is one new file).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Integration, TextDims, load_processor
from .towers import VisionTower

__all__ = ["Integration", "TextDims", "VisionTower", "load_processor"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
