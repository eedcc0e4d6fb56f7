"""Evaluation: benchmarks on their real schemas, metrics, and the harness behind ``vtprune eval``.

Submodules import lazily so that ``import vtprune.eval`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["run_eval", "EvalRun", "EvalSummary", "parse_settings", "get_benchmark", "load_model", "Answerer"]

_LAZY = {
    "run_eval": "harness",
    "EvalRun": "harness",
    "EvalSummary": "harness",
    "parse_settings": "harness",
    "get_benchmark": "benchmarks",
    "load_model": "models",
    "Answerer": "models",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)
