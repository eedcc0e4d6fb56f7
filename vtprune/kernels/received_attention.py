"""Received attention: the attention each key receives, averaged over heads and queries, without the matrix.

``received[b, k] = 1 / (H * Q) * sum_h sum_q softmax_k(scale * q . k + mask)[b, h, q, k]``

It is the CLS-free token score of FasterVLM on vision towers without a [CLS] token (Qwen-VL's ViT,
SigLIP). A query row with no allowed key (every entry masked) contributes nothing (eager softmax would
give NaN there).

The computation has two passes over the logits ``l = scale * q . k + mask``:

1. the row log-sum-exp ``lse[q] = log sum_k exp(l[q, k])``;
2. the column sums ``sum_q exp(l[q, k] - lse[q])``.

Two implementations, in the flash-linear-attention / Liger-Kernel style (as :mod:`.gather`):

* :func:`received_attention_torch`, the torch twin: chunks of *complete* query rows, sized in bytes
  (``chunk_bytes``; default :data:`CHUNK_BYTES`, 1 MiB on CPU, which keeps a chunk in a core's L2 cache),
  with the scale folded into ``q`` once. A chunk holds every key of its rows, so both passes run on it
  while it is in cache (softmax, then a sum over its rows); at most one chunk exists at a time.
* the fused Triton kernels (:mod:`._triton_received`): pass 1 streams key blocks through an online
  log-sum-exp per query block; pass 2 streams query blocks through each key block and accumulates the
  column sums in registers. Neither writes anything of size ``Q x K``.

:func:`received_attention` dispatches on ``backend`` as :func:`vtprune.kernels.gather.gather_tokens` does
(``"auto"``: Triton for CUDA tensors or when ``VTPRUNE_FORCE_TRITON=1``; torch otherwise).
"""

from __future__ import annotations

import torch

from .gather import BACKENDS, _resolve_backend

__all__ = ["CHUNK_BYTES", "received_attention", "received_attention_torch"]

# Bytes of fp32 logits the torch twin materialises at once. CPU: one chunk stays in a core's L2 (measured
# on the mid-size Qwen2-VL's ViT: 0.25 MiB chunks cost +20%, 2 MiB +15% against 1 MiB; 1024-row chunks of
# all heads, 75 MB, cost 4x). GPU: big chunks (few launches); memory is bounded all the same.
_softmax_out = torch.ops.aten._softmax.out

CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 1 << 28}
_DEFAULT_CHUNK_BYTES = 1 << 24


def _check(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, seq, D), got shape {tuple(t.shape)}")
    b, h, _, d = query.shape
    if key.shape[0] != b or key.shape[1] != h or key.shape[3] != d:
        raise ValueError(
            f"key {tuple(key.shape)} must match query {tuple(query.shape)} in batch, heads (expand grouped KV "
            "heads first) and head dim"
        )
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        try:
            torch.broadcast_shapes(mask.shape, (b, h, query.shape[2], key.shape[2]))
        except RuntimeError:
            raise ValueError(
                f"mask {tuple(mask.shape)} does not broadcast to (B, H, Q, K) = "
                f"{(b, h, query.shape[2], key.shape[2])}"
            ) from None
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or an additive float mask, got {mask.dtype}")
        if mask.device != query.device:
            raise ValueError(f"mask is on {mask.device} but query is on {query.device}")


def _mask4d(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """``mask`` as a broadcast (stride-0) ``(B, H, Q, K)`` view, nothing copied."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(shape)


def _chunk_shape(heads: int, n_q: int, n_k: int, chunk_bytes: int) -> tuple[int, int]:
    """(heads, query rows) of one chunk of fp32 logits: at most ``chunk_bytes`` (at least one row)."""
    row_bytes = n_k * 4
    rows = max(1, min(n_q, chunk_bytes // row_bytes))
    group = max(1, min(heads, chunk_bytes // (row_bytes * n_q))) if rows == n_q else 1
    return group, rows


@torch.no_grad()
def received_attention_torch(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """Torch twin of :func:`received_attention` (inputs are not validated here; forward only).

    Query rows are taken in chunks of complete rows of at most ``chunk_bytes`` bytes of fp32 logits (several
    heads of one sample per chunk when a whole head fits). Each chunk: ``l = (scale q) k^T (+ mask)``, the
    row softmax (pass 1's log-sum-exp and pass 2's ``exp(l - lse)`` in one fused op, in place on CPU),
    then the sum over its rows (a matrix-vector product) into the per-head column sums.
    """
    batch, heads, n_q, dim = query.shape
    n_k = key.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    out = torch.zeros(batch, heads, n_k, dtype=torch.float32, device=query.device)
    if batch * heads * n_q * n_k == 0:
        return out.sum(1)
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES.get(query.device.type, _DEFAULT_CHUNK_BYTES)
    group, rows = _chunk_shape(heads, n_q, n_k, chunk_bytes)
    q = query.float() * scale  # (B, H, Q, D): the scale is applied once, to q, not to Q x K logits
    kt = key.float().transpose(-1, -2)  # (B, H, D, K)
    mask = _mask4d(mask, (batch, heads, n_q, n_k))
    boolean = mask is not None and mask.dtype == torch.bool
    buf = torch.empty(group, rows, n_k, dtype=torch.float32, device=query.device)
    ones = torch.ones(group, 1, rows, dtype=torch.float32, device=query.device)
    # CPU: softmax in place (the row kernel reads a row before writing it), saving a second chunk buffer.
    in_place = query.device.type == "cpu"
    for b in range(batch):
        for h0 in range(0, heads, group):
            h1 = min(h0 + group, heads)
            acc = out[b, h0:h1].unsqueeze(1)  # (g, 1, K) view
            for r0 in range(0, n_q, rows):
                r1 = min(r0 + rows, n_q)
                logits = torch.matmul(q[b, h0:h1, r0:r1], kt[b, h0:h1], out=buf[: h1 - h0, : r1 - r0])
                if mask is not None:
                    m = mask[b, h0:h1, r0:r1]
                    if boolean:
                        logits.masked_fill_(~m, float("-inf"))
                    else:
                        logits.add_(m)
                if in_place:
                    probs = _softmax_out(logits, -1, False, out=logits)
                else:
                    probs = torch.softmax(logits, dim=-1)
                if mask is not None:
                    probs = probs.nan_to_num_(0.0)  # a row with every key masked: no attention given
                acc.baddbmm_(ones[: h1 - h0, :, : r1 - r0], probs)  # the column sums of the chunk's rows
    return out.sum(1) / (heads * n_q)


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and queries.

    Args:
        query: ``(B, H, Q, D)``, any float dtype and strides.
        key: ``(B, H, K, D)`` with as many heads as ``query`` (grouped KV heads expanded by the caller).
        mask: None, a bool mask (True = attend) or an additive float mask, broadcastable to ``(B, H, Q, K)``.
        scale: logit scale; ``D ** -0.5`` when None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`vtprune.kernels.gather`).

    Returns:
        ``(B, K)`` float32. Each row sums to 1 when no query row is fully masked.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _check(query, key, mask)
    if _resolve_backend(backend, (query, key)) == "torch":
        return received_attention_torch(query, key, mask, scale)
    return _triton_module().received_attention_triton(query, key, mask, scale)


def _triton_module():
    try:
        from . import _triton_received
    except ImportError as e:
        raise ImportError(
            "backend='triton' needs the triton package: pip install vtprune[triton] "
            f"(or use backend='torch') [{e}]"
        ) from e
    return _triton_received
