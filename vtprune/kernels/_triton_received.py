"""Triton kernels behind :func:`vtprune.kernels.received_attention.received_attention` (imported lazily:
importing this module imports triton).

Two fused passes, neither writing anything of size ``Q x K`` (logits live in registers, one tile at a time):

1. ``_row_lse_kernel``, grid ``(B * H, cdiv(Q, BLOCK_M))``: a block of query rows streams every key block
   through an online max / sum-of-exponentials, and stores each row's log-sum-exp (``(B, H, Q)`` fp32;
   ``+inf`` for a row whose keys are all masked, so that it contributes nothing in pass 2).
2. ``_column_sum_kernel``, grid ``(B * H, cdiv(K, BLOCK_N))``: a block of keys streams every query block,
   recomputes its logits and accumulates ``sum_q exp(l - lse[q])`` per key in registers; one store of
   ``(B, H, K)`` fp32 column sums at the end (no atomics: the result is deterministic).

fp32 inputs: the scale is folded into the ``q`` tile once and ``tl.dot`` runs in IEEE fp32 (no TF32), as the torch twin; fp16 / bf16
inputs: the product runs on tensor cores (exact in the fp32 accumulator) and each logit is scaled once.
Masks are read through their strides (stride 0 on broadcast dims): boolean (viewed as int8, nonzero =
attend) or additive (any float dtype, added in fp32: a dtype's finfo.min stays finite, as in eager).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["received_attention_triton"]


@triton.jit
def _logits(
    q,
    k_ptrs,
    mask_ptrs,
    qk_scale,
    offs_m,
    offs_n,
    in_m,
    in_n,
    in_d,
    MASK_KIND: tl.constexpr,
    IEEE: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) logits of a q tile (see :func:`_load_q`) and a key block; -inf outside the
    matrix and at masked entries."""
    k = tl.load(k_ptrs, mask=in_n[:, None] & in_d[None, :], other=0.0)
    if IEEE:  # fp32: the scale is already in q; full fp32 products (no TF32), as the torch twin
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:  # fp16 / bf16: products on tensor cores, exact in the fp32 accumulator, then one scale per logit
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
    valid = in_m[:, None] & in_n[None, :]
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptrs, mask=valid, other=0)
        valid = valid & (allowed != 0)
    elif MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _load_q(q_ptrs, load_mask, qk_scale, IEEE: tl.constexpr):
    """A q tile: fp32 with the scale folded in (IEEE), or in its own half type (scaled after the product)."""
    q = tl.load(q_ptrs, mask=load_mask, other=0.0)
    if IEEE:
        q = q.to(tl.float32) * qk_scale
    return q


@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    lse_ptr,  # (B * H, Q) fp32 contiguous
    H,
    Q,
    K,
    D,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    MASK_KIND: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < Q
    in_d = offs_d < D
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_q(q_ptrs, in_m[:, None] & in_d[None, :], qk_scale, IEEE)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < K
        k_ptrs = (
            k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        )
        mask_ptrs = (
            mask_ptr
            + b * stride_mb
            + h * stride_mh
            + offs_m[:, None] * stride_mm
            + offs_n[None, :] * stride_mn
        )
        s = _logits(q, k_ptrs, mask_ptrs, qk_scale, offs_m, offs_n, in_m, in_n, in_d, MASK_KIND, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("inf"))
    tl.store(lse_ptr + bh * Q + offs_m, lse, mask=in_m)


@triton.jit
def _column_sum_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    lse_ptr,  # (B * H, Q) fp32 contiguous
    out_ptr,  # (B * H, K) fp32 contiguous
    H,
    Q,
    K,
    D,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    MASK_KIND: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < K
    in_d = offs_d < D
    k_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for start_m in range(0, Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_m = offs_m < Q
        q_ptrs = (
            q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        )
        q = _load_q(q_ptrs, in_m[:, None] & in_d[None, :], qk_scale, IEEE)
        mask_ptrs = (
            mask_ptr
            + b * stride_mb
            + h * stride_mh
            + offs_m[:, None] * stride_mm
            + offs_n[None, :] * stride_mn
        )
        s = _logits(q, k_ptrs, mask_ptrs, qk_scale, offs_m, offs_n, in_m, in_n, in_d, MASK_KIND, IEEE)
        lse = tl.load(lse_ptr + bh * Q + offs_m, mask=in_m, other=float("inf"))
        acc += tl.sum(tl.exp(s - lse[:, None]), 0)
    tl.store(out_ptr + bh * K + offs_n, acc, mask=in_n)


# --------------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------------

_INTERPRETED = type(_row_lse_kernel).__name__ == "InterpretedFunction"


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). ``tl.dot`` needs every block dim >= 16."""
    block_d = max(16, _next_pow2(head_dim))
    if _INTERPRETED:  # programs run one after another in Python: few, large tiles
        return 128, 128, block_d, 4
    if block_d <= 64:
        return 128, 64, block_d, 4
    return 64, 64, block_d, 4 if block_d <= 128 else 8


def _launch_context(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not _INTERPRETED:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got {t.device}; on CPU set TRITON_INTERPRET=1 before the "
            "first triton kernel (tests do), or use backend='torch'"
        )
    return contextlib.nullcontext()


def received_attention_triton(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """Fused Triton :func:`~vtprune.kernels.received_attention.received_attention` (inputs validated)."""
    batch, heads, n_q, dim = query.shape
    n_k = key.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    if batch * heads * n_q * n_k == 0:
        return torch.zeros(batch, n_k, dtype=torch.float32, device=query.device)
    if mask is None:
        kind, mask_arg, mstrides = 0, query, (0, 0, 0, 0)  # a stand-in pointer, never dereferenced
    else:
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(batch, heads, n_q, n_k)  # stride 0 on broadcast dims: nothing copied
        if m.dtype == torch.bool:
            kind, mask_arg = 1, m.view(torch.int8)
        elif m.is_floating_point():
            kind, mask_arg = 2, m
        else:
            raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
        mstrides = m.stride()
    if _INTERPRETED and torch.bfloat16 in (query.dtype, key.dtype):
        # Triton's interpreter computes bf16 tl.dot wrongly (a 16x16 bf16 product is off by ~1e10 in triton
        # 3.9; fp16 is exact): on CPU read bf16 in fp32. GPUs run the native bf16 path (tested there).
        query, key = query.float(), key.float()
    block_m, block_n, block_d, num_warps = _blocks(dim)
    ieee = not (query.dtype == key.dtype and query.dtype in (torch.float16, torch.bfloat16))
    lse = torch.empty(batch * heads, n_q, dtype=torch.float32, device=query.device)
    out = torch.empty(batch * heads, n_k, dtype=torch.float32, device=query.device)
    common = (
        heads,
        n_q,
        n_k,
        dim,
        scale,
        *query.stride(),
        *key.stride(),
        *mstrides,
    )
    meta = dict(
        MASK_KIND=kind, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps
    )
    with _launch_context(query):
        _row_lse_kernel[(batch * heads, triton.cdiv(n_q, block_m))](
            query, key, mask_arg, lse, *common, **meta
        )
        _column_sum_kernel[(batch * heads, triton.cdiv(n_k, block_n))](
            query, key, mask_arg, lse, out, *common, **meta
        )
    return out.view(batch, heads, n_k).sum(1) / (heads * n_q)
