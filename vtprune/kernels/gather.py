"""Gather the kept tokens of a pruned sequence: hidden states, positions, attention mask and KV cache.

Index convention (shared by every function here): ``index`` is a ``torch.long`` tensor ``(B, K)`` of
positions into the sequence dim (length ``L``) of each sample. A sample that keeps fewer than ``K`` tokens
is LEFT-padded with ``-1``; a ``-1`` entry gathers zeros (``0`` / ``False`` for masks, ``0`` for
positions). :func:`keep_mask_to_index` builds such an index from a boolean keep mask.

Each gather comes as a pair, in the flash-linear-attention / Liger-Kernel style:

* ``gather_tokens`` / ``gather_kv``: dispatch on ``backend`` to the fused Triton kernel
  (:mod:`vtprune.kernels._triton_gather`, one launch for all outputs) or to the torch twin.
* ``gather_tokens_torch`` / ``gather_kv_torch``: the naive torch twin, the reference the kernels are
  tested against (gather is exact, so the two agree bit for bit).

Backends: ``"auto"`` picks Triton for CUDA tensors (or anywhere when ``VTPRUNE_FORCE_TRITON=1``, which the
tests use with ``TRITON_INTERPRET=1`` on CPU), torch otherwise; ``"triton"`` and ``"torch"`` force one.
Triton is imported lazily, so this module imports without it. The Triton path is forward-only (its
outputs never require grad); ``"auto"`` takes the torch twin when autograd has to track the inputs.
"""

from __future__ import annotations

import importlib.util
import os

import torch

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

BACKENDS = ("auto", "triton", "torch")

_FORCE_TRITON_ENV = "VTPRUNE_FORCE_TRITON"


# --------------------------------------------------------------------------------------------------------
# keep mask -> index
# --------------------------------------------------------------------------------------------------------


def keep_mask_to_index(keep: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Turn a keep mask into a left-padded gather index.

    Args:
        keep: ``(B, L)`` bool, True at the tokens kept.
        size: ``K`` when the caller already knows it (at least the largest kept count). Passing it avoids
            the host sync that reading ``K`` off the device costs (which stalls the GPU pipeline).

    Returns:
        ``(B, K)`` long with ``K = max_b keep[b].sum()`` (or ``size``): row ``b`` holds the kept positions of
        sample ``b`` in ascending order, preceded by ``K - keep[b].sum()`` entries of ``-1``.

    Example: ``[[1, 0, 1, 1], [0, 1, 0, 0]] -> [[0, 2, 3], [-1, -1, 1]]``.
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor, got {getattr(keep, 'dtype', type(keep))}")
    if keep.dim() != 2:
        raise ValueError(f"keep must be (B, L), got shape {tuple(keep.shape)}")
    batch, length = keep.shape
    if keep.numel() == 0:
        k = 0 if size is None else min(int(size), length)
        return torch.full((batch, k), -1, dtype=torch.long, device=keep.device)
    k = int(keep.sum(1).max()) if size is None else min(int(size), length)  # K decides the output shape
    # A stable ascending sort of the 0/1 mask puts the dropped positions first and the kept ones last, each
    # group in ascending position order: the last K columns are the left-padded index.
    flags, order = torch.sort(keep.to(torch.uint8), dim=1, stable=True)
    index = order[:, length - k :]
    return index.masked_fill(flags[:, length - k :] == 0, -1)


# --------------------------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t: torch.Tensor, dims: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the gathered tensors are on {device}")


def _check_index(
    index: torch.Tensor, batch: int, length: int, device: torch.device, check_range: bool = True
) -> None:
    """``index`` must be long ``(batch, K)`` on ``device`` with entries in ``[-1, length)``."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype != torch.long:
        raise TypeError(f"index must be torch.long (int64), got {index.dtype}")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"index must be (B={batch}, K), got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the gathered tensors are on {device}")
    if check_range and index.numel():
        lo, hi = (int(v) for v in torch.aminmax(index))  # one host sync for both bounds
        if lo < -1 or hi >= length:
            raise IndexError(
                f"index entries must lie in [-1, {length}) (sequence length {length}, -1 = padding), "
                f"got min {lo} and max {hi}"
            )


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _resolve_backend(backend: str, tensors: tuple[torch.Tensor, ...]) -> str:
    """``"auto"`` -> ``"triton"`` or ``"torch"``; an unknown name raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"  # the Triton path is forward-only
    if os.environ.get(_FORCE_TRITON_ENV, "0") == "1":
        return "triton"  # missing triton then raises the install hint: forcing it is deliberate
    if tensors[0].is_cuda and _triton_importable():
        return "triton"
    return "torch"


def _triton_module():
    """The Triton kernels, imported on first use."""
    try:
        from . import _triton_gather
    except ImportError as e:
        raise ImportError(
            "backend='triton' needs the triton package: pip install vtprune[triton] "
            f"(or use backend='torch') [{e}]"
        ) from e
    return _triton_gather


# --------------------------------------------------------------------------------------------------------
# hidden states + positions + mask
# --------------------------------------------------------------------------------------------------------


def _check_tokens(hidden, index, positions, mask, check_range=True) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, L, D), got shape {tuple(hidden.shape)}")
    batch, length, _ = hidden.shape
    _check_index(index, batch, length, hidden.device, check_range)
    if positions is not None:
        _check_tensor("positions", positions, (2, 3), hidden.device)
        if tuple(positions.shape[-2:]) != (batch, length):
            raise ValueError(
                f"positions must be (B, L) or (P, B, L) with B={batch}, L={length}, "
                f"got shape {tuple(positions.shape)}"
            )
    if mask is not None:
        _check_tensor("mask", mask, (2,), hidden.device)
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"mask must be (B={batch}, L={length}), got shape {tuple(mask.shape)}")


def gather_tokens_torch(
    hidden: torch.Tensor,
    index: torch.Tensor,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Naive torch twin of :func:`gather_tokens` (``torch.gather`` + ``masked_fill``; differentiable).

    Inputs are not validated here: :func:`gather_tokens` does that before dispatching.
    """
    batch, length, dim = hidden.shape
    k = index.shape[1]
    pad = index < 0
    if length == 0:  # only padding can be gathered from an empty sequence
        safe = None
    else:
        safe = index.clamp(min=0)

    def take(src: torch.Tensor, seq_dim: int, trailing: int = 0) -> torch.Tensor:
        shape = list(src.shape)
        shape[seq_dim] = k
        if safe is None:
            return src.new_zeros(shape)
        idx = safe.view(*([1] * (seq_dim - 1)), batch, k, *([1] * trailing)).expand(shape)
        fill = pad.view(*([1] * (seq_dim - 1)), batch, k, *([1] * trailing))
        return torch.gather(src, seq_dim, idx).masked_fill(fill, 0)

    out_hidden = take(hidden, 1, trailing=1)
    out_positions = None if positions is None else take(positions, positions.dim() - 1)
    out_mask = (~pad).long() if mask is None else take(mask, 1)
    return out_hidden, out_positions, out_mask


def gather_tokens(
    hidden: torch.Tensor,
    index: torch.Tensor,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gather the kept tokens of hidden states, position ids and attention mask in one pass.

    Args:
        hidden: ``(B, L, D)``, any dtype and strides.
        index: ``(B, K)`` long, positions into ``L``; ``-1`` (left padding) gathers zeros.
        positions: ``(B, L)`` or ``(P, B, L)`` (e.g. Qwen M-RoPE, ``P = 3``) integer position ids, or None.
        mask: ``(B, L)`` attention mask of any dtype (long, bool, float), or None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).
        check: validate the index range (one host sync). Internal callers that built the index with
            :func:`keep_mask_to_index` pass False.

    Returns:
        ``(hidden (B, K, D), positions (B, K) / (P, B, K) or None, mask (B, K))``, new contiguous tensors
        with the dtypes of their inputs. ``-1`` entries give zero rows, position 0 and mask 0 / False. When
        ``mask`` is None the output mask is ``(index != -1)`` as ``torch.long`` 0/1, like an HF 2-D mask.

    Raises:
        TypeError / ValueError / IndexError: wrong index dtype, shapes or devices that disagree, an index
            entry outside ``[-1, L)``.
        ImportError: ``backend="triton"`` without triton installed.
    """
    _check_tokens(hidden, index, positions, mask, check)
    inputs = tuple(t for t in (hidden, positions, mask) if t is not None)
    if _resolve_backend(backend, inputs) == "torch":
        return gather_tokens_torch(hidden, index, positions, mask)
    return _triton_module().gather_tokens_triton(hidden, index, positions, mask)


# --------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------


def _check_kv(key, value, index) -> None:
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, Dh), got shape {tuple(t.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    if key.device != value.device:
        raise ValueError(f"key is on {key.device} but value is on {value.device}")
    _check_index(index, key.shape[0], key.shape[2], key.device)


def gather_kv_torch(
    key: torch.Tensor, value: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive torch twin of :func:`gather_kv` (``torch.gather`` + ``masked_fill``; differentiable).

    Inputs are not validated here: :func:`gather_kv` does that before dispatching.
    """
    batch, heads, length, head_dim = key.shape
    k = index.shape[1]
    pad = index.view(batch, 1, k, 1) < 0

    def take(src: torch.Tensor) -> torch.Tensor:
        if length == 0:
            return src.new_zeros(batch, heads, k, head_dim)
        idx = index.clamp(min=0).view(batch, 1, k, 1).expand(batch, heads, k, head_dim)
        return torch.gather(src, 2, idx).masked_fill(pad, 0)

    return take(key), take(value)


def gather_kv(
    key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens of one layer's KV cache, key and value in one launch.

    Args:
        key, value: ``(B, H, L, Dh)`` each, same shape; any dtype and any strides (a transposed
            ``(B, L, H, Dh)`` buffer works as is: the kernel reads through the strides, nothing is copied).
        index: ``(B, K)`` long, positions into ``L`` shared by every head; ``-1`` gathers zeros.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see the module docstring).

    Returns:
        ``(key (B, H, K, Dh), value (B, H, K, Dh))``, new contiguous tensors of the input dtypes.

    Raises:
        TypeError / ValueError / IndexError / ImportError: as :func:`gather_tokens`.
    """
    _check_kv(key, value, index)
    if _resolve_backend(backend, (key, value)) == "torch":
        return gather_kv_torch(key, value, index)
    return _triton_module().gather_kv_triton(key, value, index)


# --------------------------------------------------------------------------------------------------------
# small per-layer gathers (torch only: a few columns of ids / masks, or rotary tables)
# --------------------------------------------------------------------------------------------------------


def take_columns(x: torch.Tensor, index: torch.Tensor, fill) -> torch.Tensor:
    """``x[..., b, index[b, j]]``: gather along the last dim, ``fill`` where ``index`` is -1.

    Args:
        x: ``(..., B, L)`` (e.g. M-RoPE position ids ``(3, B, L)``, a bool mask ``(B, L)``).
        index: ``(B, K)`` long, the index convention of this module.
    """
    safe = index.clamp(min=0)
    out = torch.gather(x, -1, safe.expand(*x.shape[:-2], *safe.shape))
    return out.masked_fill(index < 0, fill)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], :]`` for ``x`` of shape ``(B, L, D)`` (e.g. rotary cos/sin); zeros where -1."""
    safe = index.clamp(min=0)
    out = torch.gather(x, 1, safe[..., None].expand(*safe.shape, x.shape[-1]))
    return out.masked_fill((index < 0)[..., None], 0)
