"""Triton kernels behind :mod:`vtprune.kernels.gather` (imported lazily: importing this module imports triton).

Gather is a pure copy, so the kernels move raw bits: every tensor is viewed as the signed integer type of
its element size (fp16 / bf16 -> int16, fp32 -> int32, bool -> int8, ...). One kernel then serves every
dtype, the copy is exact (NaN payloads and -0.0 survive) and the interpreter never has to emulate bf16.

Inputs are read through their strides (nothing is made contiguous); outputs are new contiguous tensors.
Offsets that can grow with the tensor size are computed in int64.

On CPU the kernels run in the Triton interpreter: set ``TRITON_INTERPRET=1`` before this module is first
imported (``@triton.jit`` reads it when the kernels are decorated).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens_triton", "gather_kv_triton"]

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_tokens_kernel(
    hidden_ptr,  # (B, L, D), strided
    index_ptr,  # (B, K) int64, strided
    pos_ptr,  # (P, B, L), strided; unused unless HAS_POS
    mask_ptr,  # (B, L), strided; unused unless HAS_MASK
    out_hidden_ptr,  # (B, K, D) contiguous
    out_pos_ptr,  # (P, B, K) contiguous
    out_mask_ptr,  # (B, K) contiguous
    B,
    K,
    L,
    D,
    P,
    num_k_blocks,
    stride_hb,
    stride_hl,
    stride_hd,
    stride_ib,
    stride_ik,
    stride_pp,
    stride_pb,
    stride_pl,
    stride_mb,
    stride_ml,
    HAS_POS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program (pid, pid_d) copies a BLOCK_K x BLOCK_D tile of kept hidden rows of one sample.

    grid = (B * num_k_blocks, cdiv(D, BLOCK_D)); the programs with pid_d == 0 also gather the BLOCK_K
    positions (all P rows) and mask entries of their tile, so one launch writes all three outputs.
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = (pid // num_k_blocks).to(tl.int64)
    offs_k = (pid % num_k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    idx = tl.load(index_ptr + b * stride_ib + offs_k * stride_ik, mask=in_k, other=-1)
    valid = in_k & (idx >= 0) & (idx < L)  # -1 padding (and, defensively, anything out of range) -> zeros
    safe = tl.where(valid, idx, 0)
    out_k = b * K + offs_k  # int64 row of the (B, K) outputs

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    src = hidden_ptr + b * stride_hb + safe[:, None] * stride_hl + offs_d[None, :] * stride_hd
    rows = tl.load(src, mask=valid[:, None] & in_d[None, :], other=0)
    tl.store(out_hidden_ptr + out_k[:, None] * D + offs_d[None, :], rows, mask=in_k[:, None] & in_d[None, :])

    if pid_d == 0:
        if HAS_POS:
            offs_p = tl.arange(0, BLOCK_P)
            in_p = offs_p < P
            psrc = pos_ptr + offs_p[:, None] * stride_pp + b * stride_pb + safe[None, :] * stride_pl
            pos = tl.load(psrc, mask=in_p[:, None] & valid[None, :], other=0)
            pdst = out_pos_ptr + (offs_p[:, None] * B + b) * K + offs_k[None, :]
            tl.store(pdst, pos, mask=in_p[:, None] & in_k[None, :])
        if HAS_MASK:
            m = tl.load(mask_ptr + b * stride_mb + safe * stride_ml, mask=valid, other=0)
        else:
            m = valid.to(tl.int64)  # no input mask: 1 at kept tokens, 0 at padding (out mask is long)
        tl.store(out_mask_ptr + out_k, m, mask=in_k)


@triton.jit
def _gather_kv_kernel(
    key_ptr,  # (B, H, L, Dh), strided
    value_ptr,  # (B, H, L, Dh), strided
    index_ptr,  # (B, K) int64, strided
    out_key_ptr,  # (B, H, K, Dh) contiguous
    out_value_ptr,  # (B, H, K, Dh) contiguous
    H,
    K,
    L,
    Dh,
    num_k_blocks,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_vd,
    stride_ib,
    stride_ik,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (pid, pid_d) copies a BLOCK_K x BLOCK_D tile of one (sample, head), from key and value.

    grid = (B * H * num_k_blocks, cdiv(Dh, BLOCK_D)).
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    bh = (pid // num_k_blocks).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_k = (pid % num_k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    idx = tl.load(index_ptr + b * stride_ib + offs_k * stride_ik, mask=in_k, other=-1)
    valid = in_k & (idx >= 0) & (idx < L)
    safe = tl.where(valid, idx, 0)

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < Dh
    load_mask = valid[:, None] & in_d[None, :]
    k_src = key_ptr + b * stride_kb + h * stride_kh + safe[:, None] * stride_kl + offs_d[None, :] * stride_kd
    v_src = (
        value_ptr + b * stride_vb + h * stride_vh + safe[:, None] * stride_vl + offs_d[None, :] * stride_vd
    )
    k_rows = tl.load(k_src, mask=load_mask, other=0)
    v_rows = tl.load(v_src, mask=load_mask, other=0)

    dst = (bh * K + offs_k)[:, None] * Dh + offs_d[None, :]
    store_mask = in_k[:, None] & in_d[None, :]
    tl.store(out_key_ptr + dst, k_rows, mask=store_mask)
    tl.store(out_value_ptr + dst, v_rows, mask=store_mask)


# --------------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------------

_INTERPRETED = type(_gather_tokens_kernel).__name__ == "InterpretedFunction"

# Tile budget. On a GPU: rows of up to 4 KiB per program, tiles of up to 16 KiB (a memory-bound copy wants
# enough bytes in flight per SM, not big tiles). The interpreter runs programs one after another in
# Python, so there it pays to have few, large tiles.
_ROW_BYTES = 1 << 16 if _INTERPRETED else 1 << 12
_TILE_BYTES = 1 << 20 if _INTERPRETED else 1 << 14
_MIN_PROGRAMS = 512  # a few waves of CTAs on a 132-SM H100


# Host-side helpers in plain Python: triton.cdiv / triton.next_power_of_2 are JIT functions whose host call
# costs microseconds each, and the launcher is on the prefill critical path.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the signed integer type of its element size (same storage, same strides)."""
    try:
        return (t.detach() if t.requires_grad else t).view(_BITS[t.element_size()])
    except KeyError:
        raise TypeError(f"the triton gather does not support {t.dtype}; use backend='torch'") from None


def _tile(groups: int, rows: int, row_len: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) for gathering ``rows`` rows of ``row_len`` elements in each of ``groups``.

    Tiles start as large as the budget allows and are halved (rows first, down to 1 KiB) while the grid
    has too few programs to keep every SM busy, as when one sample keeps few tokens.
    """
    block_d = min(_next_pow2(max(row_len, 1)), max(16, _ROW_BYTES // itemsize))
    block_k = min(_next_pow2(max(rows, 1)), max(1, _TILE_BYTES // (block_d * itemsize)))
    if not _INTERPRETED:
        while block_k * block_d * itemsize > 1 << 10 and (
            groups * _cdiv(rows, block_k) * _cdiv(row_len, block_d) < _MIN_PROGRAMS
        ):
            if block_k > 1:
                block_k //= 2
            else:
                block_d //= 2
    num_warps = 8 if block_k * block_d * itemsize >= 1 << 14 else 4
    return block_k, block_d, num_warps


def _launch_context(t: torch.Tensor):
    if t.is_cuda:
        return torch.cuda.device(t.device)  # launch on the tensors' GPU, not the current one
    if not _INTERPRETED:
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got {t.device}; on CPU set TRITON_INTERPRET=1 before the "
            "first triton gather (tests do), or use backend='torch'"
        )
    return contextlib.nullcontext()


def gather_tokens_triton(
    hidden: torch.Tensor,
    index: torch.Tensor,
    positions: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fused Triton :func:`~vtprune.kernels.gather.gather_tokens` (inputs already validated)."""
    batch, length, dim = hidden.shape
    k = index.shape[1]
    out_hidden = hidden.new_empty((batch, k, dim))
    out_pos = None if positions is None else positions.new_empty((*positions.shape[:-1], k))
    out_mask = torch.empty((batch, k), dtype=torch.long if mask is None else mask.dtype, device=hidden.device)
    if batch * k == 0:
        return out_hidden, out_pos, out_mask

    pos3 = None if positions is None else (positions if positions.dim() == 3 else positions.unsqueeze(0))
    n_pos = 0 if pos3 is None else pos3.shape[0]
    block_k, block_d, num_warps = _tile(batch, k, dim, hidden.element_size())
    num_k_blocks = _cdiv(k, block_k)
    grid = (batch * num_k_blocks, max(1, _cdiv(dim, block_d)))
    dummy = index  # stands in for the absent positions / mask (never dereferenced)
    with _launch_context(hidden):
        _gather_tokens_kernel[grid](
            _bits(hidden),
            index,
            dummy if pos3 is None else _bits(pos3),
            dummy if mask is None else _bits(mask),
            _bits(out_hidden),
            dummy if out_pos is None else _bits(out_pos),
            _bits(out_mask),
            batch,
            k,
            length,
            dim,
            n_pos,
            num_k_blocks,
            *hidden.stride(),
            *index.stride(),
            *(pos3.stride() if pos3 is not None else (0, 0, 0)),
            *(mask.stride() if mask is not None else (0, 0)),
            HAS_POS=pos3 is not None,
            HAS_MASK=mask is not None,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            BLOCK_P=_next_pow2(max(n_pos, 1)),
            num_warps=num_warps,
        )
    return out_hidden, out_pos, out_mask


def gather_kv_triton(
    key: torch.Tensor, value: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton :func:`~vtprune.kernels.gather.gather_kv` (inputs already validated)."""
    batch, heads, length, head_dim = key.shape
    k = index.shape[1]
    out_key = key.new_empty((batch, heads, k, head_dim))
    out_value = value.new_empty((batch, heads, k, head_dim))
    if batch * heads * k == 0:
        return out_key, out_value

    itemsize = max(key.element_size(), value.element_size())
    block_k, block_d, num_warps = _tile(batch * heads, k, head_dim, itemsize)
    num_k_blocks = _cdiv(k, block_k)
    grid = (batch * heads * num_k_blocks, max(1, _cdiv(head_dim, block_d)))
    with _launch_context(key):
        _gather_kv_kernel[grid](
            _bits(key),
            _bits(value),
            index,
            _bits(out_key),
            _bits(out_value),
            heads,
            k,
            length,
            head_dim,
            num_k_blocks,
            *key.stride(),
            *value.stride(),
            *index.stride(),
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return out_key, out_value
