"""Pruning methods: one module per method, each defining its config and registering a handler that returns
the method's :class:`~vtprune.runtime.parts.MethodParts` (see :mod:`vtprune.registry`).

Importing this package imports every module in it (a new method is one new file).
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
