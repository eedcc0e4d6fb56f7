"""Argument types of ``vtprune eval`` (light: no torch import, the CLI parser builds them eagerly)."""

from __future__ import annotations

import argparse

__all__ = ["DTYPES", "positive_int", "non_negative_int"]

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
