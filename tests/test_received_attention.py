"""Received attention (``vtprune.kernels.received_attention``): the fused Triton kernel (interpreter on CPU)
against the torch twin, and the twin against the exact eager computation (float64 softmax, summed).

Shapes in the flash-linear-attention style: sequence lengths 1 / 15 / 63 / 300 (below, at and across the
kernel's 64/128 tiles and the twin's chunks), several heads (grouped KV heads arrive expanded: the probe
repeats them), head dims that are not powers of two, and masks: none, boolean (full, key padding, with
fully masked rows), additive (fp32 with -inf, bf16 with its finfo.min).
"""

import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere; conftest may already have set it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vtprune.kernels import received_attention as ra  # noqa: E402
from vtprune.kernels.received_attention import (  # noqa: E402
    received_attention,
    received_attention_torch,
)
from vtprune.runtime.statistics import get_statistic  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def eager(query, key, mask=None, scale=None):
    """The exact computation, materialised: float64 softmax over keys, summed over heads and queries."""
    q, k = query.double().cpu(), key.double().cpu()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        mask = mask.cpu()
        logits = (
            logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
        )
    probs = logits.softmax(-1).nan_to_num(0.0)  # a fully masked row gives nothing
    return probs.sum(dim=(1, 2)) / (q.shape[1] * q.shape[2])


def make_qk(batch, heads, n_q, n_k, dim, dtype=torch.float32, *, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, heads, n_q, dim, generator=g) * spread).to(dtype).to(DEVICE)
    k = (torch.randn(batch, heads, n_k, dim, generator=g) * spread).to(dtype).to(DEVICE)
    return q, k


def make_mask(kind, batch, heads, n_q, n_k, *, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    if kind is None:
        return None
    if kind == "bool":  # (B, 1, Q, K), about a third masked, query row 0 of sample 0 fully masked
        mask = torch.rand(batch, 1, n_q, n_k, generator=g) > 0.3
        mask[0, 0, 0] = False
    elif kind == "keypad":  # (B, 1, 1, K) key padding, sample 0's last third of keys padded
        mask = torch.ones(batch, 1, 1, n_k, dtype=torch.bool)
        mask[0, ..., n_k - n_k // 3 :] = False
    elif kind == "additive":  # (B, H, Q, K) fp32 biases with some -inf
        mask = torch.randn(batch, heads, n_q, n_k, generator=g)
        mask = mask.masked_fill(torch.rand(batch, heads, n_q, n_k, generator=g) < 0.2, float("-inf"))
    elif kind == "additive-bf16":  # (1, 1, Q, K) causal-style bf16 mask with finfo.min, broadcast
        allowed = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=max(0, n_k - n_q))
        mask = torch.zeros(1, 1, n_q, n_k, dtype=torch.bfloat16).masked_fill(
            ~allowed, torch.finfo(torch.bfloat16).min
        )
    else:
        raise ValueError(kind)
    return mask.to(DEVICE)


def assert_close(actual, expected, rtol=2e-5, atol=1e-8):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol)


MASKS = [None, "bool", "keypad", "additive", "additive-bf16"]


# --------------------------------------------------------------------------------------------------------
# twin vs the exact eager computation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MASKS, ids=lambda k: f"mask-{k}")
@pytest.mark.parametrize("n", [1, 15, 63, 300], ids=lambda n: f"T{n}")
@pytest.mark.parametrize("chunk", [None, 64, 1 << 30], ids=["chunk-default", "chunk-1row", "chunk-allheads"])
def test_twin_matches_eager(n, kind, chunk):
    batch, heads, dim = 2, 3, 33
    q, k = make_qk(batch, heads, n, n, dim, seed=n)
    mask = make_mask(kind, batch, heads, n, n, seed=n)
    out = received_attention_torch(q, k, mask, 0.2, chunk_bytes=chunk)
    assert_close(out, eager(q, k, mask, 0.2))


@pytest.mark.parametrize("n_q,n_k", [(1, 300), (300, 1), (15, 63), (63, 15), (7, 0), (0, 7)])
def test_twin_rectangular_and_empty(n_q, n_k):
    q, k = make_qk(1, 2, n_q, n_k, 16, seed=n_q + n_k)
    out = received_attention_torch(q, k, None, None)
    assert out.shape == (1, n_k)
    if n_q and n_k:
        assert_close(out, eager(q, k))
        torch.testing.assert_close(out.sum(-1).cpu(), torch.ones(1))  # every row gives attention 1
    else:
        assert not out.abs().sum()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_twin_half_inputs_compute_in_fp32(dtype):
    q, k = make_qk(2, 4, 63, 63, 64, dtype=dtype, seed=3)
    assert_close(received_attention_torch(q, k, None, None), eager(q, k))


def test_twin_large_logits_and_strided_inputs():
    """Logits far beyond exp's range (softmax must subtract the row max) and non-contiguous q / k, as the
    probe receives them (transposed views of a fused qkv projection)."""
    qkv = torch.randn(2, 40, 3, 4, 32, device=DEVICE) * 20
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, T, D) views
    assert not q.is_contiguous()
    # logits ~ +-2000 in fp32: an ulp of a logit is ~1e-4, so is the relative error of its probability
    assert_close(received_attention_torch(q, k, None, 1.0), eager(q, k, None, 1.0), rtol=1e-3, atol=1e-7)


def test_chunks_are_bounded_in_bytes():
    """A chunk never holds more than ``chunk_bytes`` of logits (one row at least), whatever the shape."""
    for heads, n_q, n_k, budget in [(8, 2304, 2304, 1 << 20), (16, 5, 7, 1 << 20), (4, 300, 300, 1000)]:
        group, rows = ra._chunk_shape(heads, n_q, n_k, budget)
        assert 1 <= group <= heads and 1 <= rows <= n_q
        assert group * rows * n_k * 4 <= max(budget, n_k * 4)
        assert group == 1 or rows == n_q  # several heads only when whole heads fit
    assert ra._chunk_shape(8, 2304, 2304, 1 << 20) == (1, 113)  # the mid-size Qwen2-VL ViT: 1 MiB chunks


def test_statistic_is_the_kernel():
    q, k = make_qk(1, 2, 15, 15, 16)
    assert torch.equal(get_statistic("received")(q, k, None, 0.25), received_attention(q, k, None, 0.25))


# --------------------------------------------------------------------------------------------------------
# Triton kernel vs twin
# --------------------------------------------------------------------------------------------------------


def _kernel_cases():
    # (B, H, Q, K, D, mask kind): every T and mask kind; T=300 (several tiles each way) thrice, as the
    # interpreter takes seconds per tile pair
    for n in (1, 15, 63):
        for i, kind in enumerate(MASKS):
            yield pytest.param(2, 3, n, n, (16, 33, 64, 80, 8)[i], kind, id=f"T{n}-mask-{kind}")
    for kind in (None, "bool", "additive-bf16"):
        yield pytest.param(1, 2, 300, 300, 64, kind, id=f"T300-mask-{kind}")
    yield pytest.param(1, 2, 130, 7, 32, "keypad", id="Q130-K7")
    yield pytest.param(1, 1, 7, 130, 32, None, id="Q7-K130")


@needs_triton
@pytest.mark.parametrize("batch,heads,n_q,n_k,dim,kind", list(_kernel_cases()))
def test_kernel_matches_twin(batch, heads, n_q, n_k, dim, kind):
    q, k = make_qk(batch, heads, n_q, n_k, dim, seed=n_q * 7 + dim)
    mask = make_mask(kind, batch, heads, n_q, n_k, seed=n_q)
    out = received_attention(q, k, mask, 0.3, backend="triton")
    twin = received_attention(q, k, mask, 0.3, backend="torch")
    assert_close(out, twin)
    assert_close(out, eager(q, k, mask, 0.3))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_half_inputs(dtype):
    """Half inputs (read in fp32 by the dispatcher) agree with the exact computation."""
    q, k = make_qk(1, 2, 63, 40, 64, dtype=dtype, seed=5)
    assert_close(received_attention(q, k, None, None, backend="triton"), eager(q, k), rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_native_half_path(dtype):
    """The launcher on half inputs directly: products in the input type (tensor cores on a GPU), exact in
    the fp32 accumulator. Under TRITON_INTERPRET bf16 is read in fp32 (the interpreter's bf16 tl.dot is
    wrong, see ``test_interpreter_bf16_dot_is_wrong``), so bf16's native path is checked on GPUs only."""
    from vtprune.kernels._triton_received import received_attention_triton

    q, k = make_qk(1, 2, 63, 40, 64, dtype=dtype, seed=5)
    assert_close(received_attention_triton(q, k, None, None), eager(q, k), rtol=1e-4)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_interpreter_bf16_dot_is_wrong():
    """Why bf16 goes through fp32 under the interpreter: its bf16 tl.dot is wrong (fp16 is right). When a
    triton release fixes it, this test fails: then drop the upcast in received_attention_triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, o_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(o_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, tl.trans(b)))

    errors = {}
    for dtype in (torch.bfloat16, torch.float16):
        a, b, out = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype), torch.empty(16, 16)
        dot16[(1,)](a, b, out)
        errors[dtype] = float((out - a.float() @ b.float().T).abs().max())
    assert errors[torch.float16] < 1e-4
    assert errors[torch.bfloat16] > 1.0


@needs_triton
def test_kernel_fully_masked_and_large_logits():
    q, k = make_qk(1, 2, 15, 15, 16, seed=9, spread=6.0)  # logits up to ~+-500: exp2 needs the row max
    mask = torch.ones(1, 1, 15, 15, dtype=torch.bool, device=DEVICE)
    mask[..., 3, :] = False  # query row 3 attends to nothing: it gives nothing
    out = received_attention(q, k, mask, 1.0, backend="triton")
    assert torch.isfinite(out).all()
    assert_close(out, eager(q, k, mask, 1.0))
    torch.testing.assert_close(out.sum().cpu(), torch.tensor(14 / 15))


@needs_triton
def test_kernel_strided_inputs():
    qkv = torch.randn(1, 40, 3, 2, 24, device=DEVICE)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert_close(received_attention(q, k, None, None, backend="triton"), eager(q, k))


# --------------------------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_shape,k_shape,mask,error,match",
    [
        ((2, 3, 5, 8), (2, 1, 5, 8), None, ValueError, "expand grouped KV heads"),
        ((2, 3, 5, 8), (2, 3, 5, 4), None, ValueError, "head dim"),
        ((3, 5, 8), (3, 5, 8), None, ValueError, r"\(B, H, seq, D\)"),
        (
            (2, 3, 5, 8),
            (2, 3, 6, 8),
            torch.ones(2, 1, 5, 5, dtype=torch.bool),
            ValueError,
            "does not broadcast",
        ),
        ((2, 3, 5, 8), (2, 3, 6, 8), torch.ones(1, 1, 5, 6, dtype=torch.long), TypeError, "bool"),
    ],
)
def test_validation(q_shape, k_shape, mask, error, match):
    with pytest.raises(error, match=match):
        received_attention(torch.zeros(q_shape), torch.zeros(k_shape), mask)


def test_unknown_backend():
    q, k = make_qk(1, 1, 3, 3, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        received_attention(q, k, backend="cuda")


@needs_triton
def test_dispatch(monkeypatch):
    calls = []
    real = ra._triton_module()

    class Spy:
        def received_attention_triton(self, *args):
            calls.append("triton")
            return real.received_attention_triton(*args)

    monkeypatch.setattr(ra, "_triton_module", Spy)
    q, k = make_qk(1, 2, 5, 5, 16)
    monkeypatch.delenv("VTPRUNE_FORCE_TRITON", raising=False)
    received_attention(q, k)
    assert calls == (["triton"] if q.is_cuda else [])
    monkeypatch.setenv("VTPRUNE_FORCE_TRITON", "1")
    received_attention(q, k)
    received_attention(q, k, backend="torch")
    assert calls[-1] == "triton" and len(calls) == (2 if q.is_cuda else 1)


def test_import_does_not_import_triton():
    code = "import sys, vtprune.runtime.statistics; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_triton_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "vtprune.kernels._triton_received", raising=False)
    monkeypatch.delattr("vtprune.kernels._triton_received", raising=False)
    monkeypatch.delenv("VTPRUNE_FORCE_TRITON", raising=False)
    q, k = make_qk(1, 1, 3, 3, 4)
    if not q.is_cuda:
        received_attention(q, k)  # auto: the torch twin
    with pytest.raises(ImportError, match=r"pip install vtprune\[triton\]"):
        received_attention(q, k, backend="triton")
