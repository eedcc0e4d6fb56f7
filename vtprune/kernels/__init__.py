"""Kernels for pruned sequences: fused Triton gathers with naive torch twins (:mod:`.gather`).

Importing this package does not import triton; the Triton kernels load on first use.
"""

from .gather import (
    BACKENDS,
    gather_kv,
    gather_kv_torch,
    gather_tokens,
    gather_tokens_torch,
    keep_mask_to_index,
    take_columns,
    take_rows,
)

__all__ = [
    "BACKENDS",
    "keep_mask_to_index",
    "gather_tokens",
    "gather_tokens_torch",
    "gather_kv",
    "gather_kv_torch",
    "take_columns",
    "take_rows",
]
