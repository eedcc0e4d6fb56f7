"""Fused gather kernels: Triton (interpreter on CPU) == torch twin == a python-loop reference, bit for bit."""

import os

import torch

if not torch.cuda.is_available():  # before triton is imported anywhere; conftest may already have set it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from vtprune.kernels import gather as gather_mod  # noqa: E402
from vtprune.kernels import (  # noqa: E402
    gather_kv,
    gather_kv_torch,
    gather_tokens,
    gather_tokens_torch,
    keep_mask_to_index,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [
    pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)
]
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --------------------------------------------------------------------------------------------------------
# helpers: inputs, an independent reference, exact comparison
# --------------------------------------------------------------------------------------------------------


def make_index(batch: int, length: int, k: int, *, seed: int = 0, device=DEVICE) -> torch.Tensor:
    """(B, K) long, left-padded with -1: row 0 is full, the others keep fewer (row 1 keeps none when B > 2).

    Entries are sorted positions into [0, L); with K > L some repeat (gather does not need them unique).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        n = k if b == 0 else (0 if b == 1 and batch > 2 else int(torch.randint(0, k + 1, (1,), generator=g)))
        if n <= length:
            kept = torch.randperm(length, generator=g)[:n]
        else:
            kept = torch.randint(0, length, (n,), generator=g)
        rows.append(torch.cat([torch.full((k - n,), -1), kept.sort().values]))
    return torch.stack(rows).to(device)


def make_hidden(shape, dtype, *, seed: int = 0, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def ref_gather_tokens(hidden, index, positions, mask):
    """Python-loop reference for gather_tokens (CPU)."""
    hidden, index = hidden.cpu(), index.cpu()
    batch, _, dim = hidden.shape
    k = index.shape[1]
    out_h = torch.zeros(batch, k, dim, dtype=hidden.dtype)
    out_p = None
    if positions is not None:
        positions = positions.cpu()
        out_p = torch.zeros(*positions.shape[:-1], k, dtype=positions.dtype)
    out_m = torch.zeros(batch, k, dtype=torch.long if mask is None else mask.dtype)
    for b, row in enumerate(index.tolist()):
        for j, i in enumerate(row):
            if i < 0:
                continue
            out_h[b, j] = hidden[b, i]
            if positions is not None:
                out_p[..., b, j] = positions[..., b, i]
            out_m[b, j] = 1 if mask is None else mask.cpu()[b, i]
    return out_h, out_p, out_m


def ref_gather_kv(key, value, index):
    """Python-loop reference for gather_kv (CPU)."""
    key, value, index = key.cpu(), value.cpu(), index.cpu()
    batch, heads, _, head_dim = key.shape
    k = index.shape[1]
    out_k = torch.zeros(batch, heads, k, head_dim, dtype=key.dtype)
    out_v = torch.zeros(batch, heads, k, head_dim, dtype=value.dtype)
    for b, row in enumerate(index.tolist()):
        for j, i in enumerate(row):
            if i >= 0:
                out_k[b, :, j] = key[b, :, i]
                out_v[b, :, j] = value[b, :, i]
    return out_k, out_v


def assert_same(actual, expected, name=""):
    """Same shape, dtype and bits (gather is exact: NaN payloads and -0.0 included)."""
    if expected is None:
        assert actual is None, name
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    bits = _BITS[actual.element_size()]
    assert torch.equal(actual.cpu().view(bits), expected.cpu().view(bits)), f"{name}: values differ"


def check_tokens(hidden, index, positions=None, mask=None):
    expected = ref_gather_tokens(hidden, index, positions, mask)
    torch_out = gather_tokens(hidden, index, positions, mask, backend="torch")
    for name, a, e in zip(("hidden", "positions", "mask"), torch_out, expected):
        assert_same(a, e, f"torch {name}")
    if HAS_TRITON:
        triton_out = gather_tokens(hidden, index, positions, mask, backend="triton")
        for name, a, t in zip(("hidden", "positions", "mask"), triton_out, torch_out):
            assert_same(a, t, f"triton {name}")
            assert a is None or a.is_contiguous()


def check_kv(key, value, index):
    expected = ref_gather_kv(key, value, index)
    torch_out = gather_kv_torch(key, value, index)
    for name, a, e in zip(("key", "value"), torch_out, expected):
        assert_same(a, e, f"torch {name}")
    if HAS_TRITON:
        triton_out = gather_kv(key, value, index, backend="triton")
        for name, a, t in zip(("key", "value"), triton_out, torch_out):
            assert_same(a, t, f"triton {name}")
            assert a.is_contiguous()


# --------------------------------------------------------------------------------------------------------
# keep_mask_to_index
# --------------------------------------------------------------------------------------------------------


def ref_keep_mask_to_index(keep):
    rows = [[i for i, x in enumerate(row) if x] for row in keep.tolist()]
    k = max((len(r) for r in rows), default=0)
    return torch.tensor([[-1] * (k - len(r)) + r for r in rows], dtype=torch.long).view(len(rows), k)


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param([[1, 0, 1, 1], [0, 1, 0, 0]], id="docstring"),
        pytest.param([[1]], id="single"),
        pytest.param([[0, 0, 0], [0, 0, 0]], id="none-kept"),
        pytest.param([[1, 1, 1], [0, 0, 0], [1, 1, 1]], id="all-or-nothing"),
        pytest.param([[0] * 7], id="one-row-empty"),
    ],
)
def test_keep_mask_to_index_small(keep):
    keep = torch.tensor(keep, dtype=torch.bool)
    assert torch.equal(keep_mask_to_index(keep), ref_keep_mask_to_index(keep))


@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (5, 577), (2, 2880)], ids=lambda v: str(v))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_keep_mask_to_index_random(batch, length, p):
    g = torch.Generator().manual_seed(batch * length)
    keep = torch.rand(batch, length, generator=g) < p
    index = keep_mask_to_index(keep.to(DEVICE))
    assert index.dtype == torch.long and index.device.type == DEVICE
    assert torch.equal(index.cpu(), ref_keep_mask_to_index(keep))


def test_keep_mask_to_index_empty_and_errors():
    assert keep_mask_to_index(torch.zeros(0, 5, dtype=torch.bool)).shape == (0, 0)
    assert keep_mask_to_index(torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 0)
    with pytest.raises(TypeError, match="bool"):
        keep_mask_to_index(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        keep_mask_to_index(torch.ones(3, dtype=torch.bool))


def test_keep_mask_round_trip_through_gather():
    """Gathering arange(L) with the index of a keep mask gives back the kept positions."""
    keep = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool, device=DEVICE)
    index = keep_mask_to_index(keep)
    positions = torch.arange(5, device=DEVICE).expand(2, 5)
    _, pos, mask = gather_tokens_torch(torch.zeros(2, 5, 1, device=DEVICE), index, positions, None)
    assert pos.tolist() == [[0, 3, 4], [0, 0, 2]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------------------------------------
# gather_tokens
# --------------------------------------------------------------------------------------------------------


def _token_shapes():
    for batch in (1, 3):
        for length in (1, 7, 577):
            for dim in (1, 33, 130):
                for k in sorted({1, 5, length}):
                    yield pytest.param(batch, length, dim, k, id=f"B{batch}-L{length}-D{dim}-K{k}")


# (positions, mask) variants, cycled over the shape grid so each shape sees one and every variant is seen often
_AUX = [(None, None), ("2d", "long"), ("3d3", None), ("3d4", "bool"), ("2d", "float")]


def make_aux(kind_pos, kind_mask, batch, length, *, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    positions = None
    if kind_pos == "2d":
        positions = torch.randint(0, 10_000, (batch, length), generator=g)
    elif kind_pos is not None:  # M-RoPE style (P, B, L): temporal / height / width (/ extra) rows
        positions = torch.randint(0, 10_000, (int(kind_pos[-1]), batch, length), generator=g)
    mask = None
    if kind_mask is not None:
        bits = torch.rand(batch, length, generator=g) < 0.8
        mask = bits if kind_mask == "bool" else bits.to(getattr(torch, kind_mask))
    return (None if positions is None else positions.to(DEVICE)), (None if mask is None else mask.to(DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,length,dim,k", list(_token_shapes()))
def test_gather_tokens_shapes(batch, length, dim, k, dtype):
    seed = batch * 1000 + length * 10 + dim + k
    kind_pos, kind_mask = _AUX[seed % len(_AUX)]
    hidden = make_hidden((batch, length, dim), dtype, seed=seed)
    index = make_index(batch, length, k, seed=seed)
    positions, mask = make_aux(kind_pos, kind_mask, batch, length, seed=seed)
    check_tokens(hidden, index, positions, mask)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Shrink the Triton tiles (16-byte rows, 64-byte tiles) so every shape spans many K and D blocks.

    The interpreter defaults to one big tile per sample; this covers the block-boundary masking that the
    GPU tile sizes exercise.
    """
    tg = gather_mod._triton_module()
    monkeypatch.setattr(tg, "_ROW_BYTES", 16)
    monkeypatch.setattr(tg, "_TILE_BYTES", 64)


@needs_triton
@pytest.mark.parametrize(
    "batch,length,dim,k",
    [p for p in _token_shapes() if p.values[1] != 577 or p.values[3] != 577],  # skip the 2 slowest here
)
def test_gather_tokens_many_blocks(batch, length, dim, k, tiny_tiles):
    seed = batch * 1000 + length * 10 + dim + k
    kind_pos, kind_mask = _AUX[(seed + 1) % len(_AUX)]
    hidden = make_hidden((batch, length, dim), torch.bfloat16, seed=seed)
    index = make_index(batch, length, k, seed=seed)
    positions, mask = make_aux(kind_pos, kind_mask, batch, length, seed=seed)
    check_tokens(hidden, index, positions, mask)


@needs_triton
@pytest.mark.parametrize("kind_mask", [None, "long", "bool", "float16"], ids=lambda v: f"mask-{v}")
@pytest.mark.parametrize("kind_pos", [None, "2d", "3d3", "3d4"], ids=lambda v: f"pos-{v}")
def test_gather_tokens_positions_and_mask(kind_pos, kind_mask):
    batch, length, dim, k = 3, 37, 19, 11
    hidden = make_hidden((batch, length, dim), torch.bfloat16, seed=5)
    index = make_index(batch, length, k, seed=5)
    positions, mask = make_aux(kind_pos, kind_mask, batch, length, seed=5)
    check_tokens(hidden, index, positions, mask)
    out_mask = gather_tokens(hidden, index, positions, mask)[2]
    if mask is None:  # HF-style 2-D mask: long 0/1, 0 exactly at the -1 padding
        assert out_mask.dtype == torch.long
        assert torch.equal(out_mask, (index != -1).long())


@needs_triton
def test_gather_tokens_strided_inputs():
    """Non-contiguous hidden / positions (stride-0 expand, as HF builds them) / mask / index."""
    batch, length, dim, k = 3, 41, 24, 9
    hidden = make_hidden((length, batch, 2 * dim), torch.float16).transpose(0, 1)[..., ::2]  # (B, L, D)
    assert not hidden.is_contiguous()
    positions = torch.arange(length, device=DEVICE).view(1, 1, length).expand(3, batch, length)
    mask = torch.ones(length, batch, dtype=torch.long, device=DEVICE).t()
    index = make_index(batch, length, k).t().contiguous().t()  # (B, K) column-major
    assert not index.is_contiguous()
    check_tokens(hidden, index, positions, mask)


@needs_triton
def test_gather_tokens_exact_bits():
    """NaN, inf and -0.0 are copied bit for bit; padding rows are +0.0."""
    special = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-40, 65504.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        hidden = special.to(dtype).view(1, 6, 1).expand(2, 6, 3).contiguous().to(DEVICE)
        index = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, 5, 1, 0, 0]], device=DEVICE)
        check_tokens(hidden, index)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gather_tokens_empty(backend):
    hidden = make_hidden((2, 5, 4), torch.float32)
    positions = torch.arange(5, device=DEVICE).expand(3, 2, 5)
    out = gather_tokens(
        hidden, torch.empty(2, 0, dtype=torch.long, device=DEVICE), positions, backend=backend
    )
    assert [t.shape for t in out] == [(2, 0, 4), (3, 2, 0), (2, 0)]
    # D = 0 still gathers positions and mask; an empty sequence only admits padding
    check_tokens(make_hidden((2, 5, 0), torch.float32), make_index(2, 5, 3), positions)
    check_tokens(make_hidden((2, 0, 4), torch.float32), torch.full((2, 3), -1, device=DEVICE))


# --------------------------------------------------------------------------------------------------------
# gather_kv
# --------------------------------------------------------------------------------------------------------


def _kv_cases():
    # (B, H, L, Dh, K)
    for case in [
        (1, 1, 1, 1, 1),
        (3, 2, 7, 33, 5),
        (1, 3, 577, 64, 144),
        (3, 2, 577, 130, 577),
        (2, 4, 7, 16, 7),
    ]:
        yield pytest.param(*case, id="B{}-H{}-L{}-Dh{}-K{}".format(*case))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,length,head_dim,k", list(_kv_cases()))
def test_gather_kv_shapes(batch, heads, length, head_dim, k, dtype):
    key = make_hidden((batch, heads, length, head_dim), dtype, seed=1)
    value = make_hidden((batch, heads, length, head_dim), dtype, seed=2)
    check_kv(key, value, make_index(batch, length, k, seed=k))


@needs_triton
@pytest.mark.parametrize("batch,heads,length,head_dim,k", list(_kv_cases())[:3])
def test_gather_kv_many_blocks(batch, heads, length, head_dim, k, tiny_tiles):
    key = make_hidden((batch, length, heads, head_dim), torch.float16, seed=1).transpose(1, 2)
    value = make_hidden((batch, heads, length, head_dim), torch.float16, seed=2)
    check_kv(key, value, make_index(batch, length, k, seed=k))


@needs_triton
@pytest.mark.parametrize(
    "layout",
    ["transposed", "cache-slice", "head-dim-strided", "mixed"],
)
def test_gather_kv_non_contiguous(layout):
    batch, heads, length, head_dim, k = 3, 4, 29, 20, 8
    if layout == "transposed":  # a (B, L, H, Dh) buffer seen as (B, H, L, Dh)
        key = make_hidden((batch, length, heads, head_dim), torch.float16, seed=1).transpose(1, 2)
        value = make_hidden((batch, length, heads, head_dim), torch.float16, seed=2).transpose(1, 2)
    elif layout == "cache-slice":  # the filled part of a preallocated static cache
        key = make_hidden((batch, heads, 2 * length, head_dim), torch.bfloat16, seed=1)[:, :, :length]
        value = make_hidden((batch, heads, 2 * length, head_dim), torch.bfloat16, seed=2)[:, :, :length]
    elif layout == "head-dim-strided":
        key = make_hidden((batch, heads, length, 2 * head_dim), torch.float32, seed=1)[..., 1::2]
        value = make_hidden((batch, heads, length, 2 * head_dim), torch.float32, seed=2)[..., ::2]
    else:  # key and value with different layouts and dtypes
        key = make_hidden((batch, length, heads, head_dim), torch.float32, seed=1).transpose(1, 2)
        value = make_hidden((batch, heads, length, head_dim), torch.bfloat16, seed=2)
    check_kv(key, value, make_index(batch, length, k))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gather_kv_empty(backend):
    key = make_hidden((2, 3, 5, 4), torch.float16)
    out_k, out_v = gather_kv(key, key, torch.empty(2, 0, dtype=torch.long, device=DEVICE), backend=backend)
    assert out_k.shape == out_v.shape == (2, 3, 0, 4)


# --------------------------------------------------------------------------------------------------------
# validation and dispatch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize(
    "bad,error,match",
    [
        pytest.param(lambda i: i.int(), TypeError, "torch.long", id="index-int32"),
        pytest.param(lambda i: i.float(), TypeError, "torch.long", id="index-float"),
        pytest.param(lambda i: i[0], ValueError, r"\(B=2, K\)", id="index-1d"),
        pytest.param(lambda i: i[:1], ValueError, r"\(B=2, K\)", id="index-batch"),
        pytest.param(lambda i: i.clone().fill_(5), IndexError, r"\[-1, 5\)", id="index-eq-L"),
        pytest.param(lambda i: i.clone().fill_(-2), IndexError, r"\[-1, 5\)", id="index-below-minus-1"),
        pytest.param(lambda i: i.to("meta"), ValueError, "index is on meta", id="index-device"),
    ],
)
def test_gather_validation(bad, error, match, backend):
    hidden = make_hidden((2, 5, 3), torch.float32)
    index = make_index(2, 5, 3)
    with pytest.raises(error, match=match):
        gather_tokens(hidden, bad(index), backend=backend)
    kv = make_hidden((2, 4, 5, 3), torch.float32)
    with pytest.raises(error, match=match):
        gather_kv(kv, kv, bad(index), backend=backend)


def test_gather_validation_other_inputs():
    hidden = make_hidden((2, 5, 3), torch.float32)
    index = make_index(2, 5, 3)
    with pytest.raises(ValueError, match=r"hidden must be \(B, L, D\)"):
        gather_tokens(hidden[0], index)
    with pytest.raises(ValueError, match="positions must be"):
        gather_tokens(hidden, index, positions=torch.zeros(2, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="positions must be"):
        gather_tokens(hidden, index, positions=torch.zeros(1, 1, 2, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="positions is on meta"):
        gather_tokens(hidden, index, positions=torch.zeros(2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="mask must be"):
        gather_tokens(hidden, index, mask=torch.ones(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="mask is on meta"):
        gather_tokens(hidden, index, mask=torch.ones(2, 5, device="meta"))
    kv = make_hidden((2, 4, 5, 3), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        gather_kv(kv, kv[:, :2], index)
    with pytest.raises(ValueError, match="value is on meta"):
        gather_kv(kv, kv.to("meta"), index)
    with pytest.raises(ValueError, match=r"key must be \(B, H, L, Dh\)"):
        gather_kv(kv[0], kv[0], index)


def test_unknown_backend():
    hidden = make_hidden((2, 5, 3), torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gather_tokens(hidden, make_index(2, 5, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        gather_kv(hidden[:, None], hidden[:, None], make_index(2, 5, 3), backend="Triton")


def test_auto_backend(monkeypatch):
    cpu = torch.zeros(1, device="cpu")
    monkeypatch.delenv("VTPRUNE_FORCE_TRITON", raising=False)
    assert gather_mod._resolve_backend("auto", (cpu,)) == "torch"
    assert gather_mod._resolve_backend("torch", (cpu,)) == "torch"
    monkeypatch.setenv("VTPRUNE_FORCE_TRITON", "1")
    assert gather_mod._resolve_backend("auto", (cpu,)) == "triton"
    # autograd needs the (differentiable) torch twin
    assert gather_mod._resolve_backend("auto", (cpu.clone().requires_grad_(),)) == "torch"
    with torch.no_grad():
        assert gather_mod._resolve_backend("auto", (cpu.clone().requires_grad_(),)) == "triton"
    if torch.cuda.is_available() and HAS_TRITON:
        monkeypatch.delenv("VTPRUNE_FORCE_TRITON")
        assert gather_mod._resolve_backend("auto", (cpu.cuda(),)) == "triton"


@needs_triton
def test_force_triton_env_runs_triton(monkeypatch):
    calls = []
    real = gather_mod._triton_module()

    class Spy:
        def gather_tokens_triton(self, *args):
            calls.append("tokens")
            return real.gather_tokens_triton(*args)

        def gather_kv_triton(self, *args):
            calls.append("kv")
            return real.gather_kv_triton(*args)

    monkeypatch.setattr(gather_mod, "_triton_module", Spy)
    monkeypatch.setenv("VTPRUNE_FORCE_TRITON", "1")
    hidden, index = make_hidden((2, 5, 3), torch.float32), make_index(2, 5, 3)
    gather_tokens(hidden, index)
    gather_kv(hidden[:, None], hidden[:, None], index)
    assert calls == ["tokens", "kv"]
    monkeypatch.delenv("VTPRUNE_FORCE_TRITON")
    if not hidden.is_cuda:
        gather_tokens(hidden, index)
        assert calls == ["tokens", "kv"]


def test_auto_with_grad_is_differentiable(monkeypatch):
    monkeypatch.setenv("VTPRUNE_FORCE_TRITON", "1")
    hidden = make_hidden((2, 5, 3), torch.float32).requires_grad_()
    out, _, _ = gather_tokens(hidden, torch.tensor([[-1, 4], [0, 0]], device=DEVICE))
    out.sum().backward()
    assert hidden.grad[0].sum(-1).tolist() == [0, 0, 0, 0, 3] and hidden.grad[1, 0].tolist() == [2, 2, 2]


def test_import_does_not_import_triton():
    code = "import sys, vtprune.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path without the interpreter")
def test_triton_on_cpu_without_interpreter_says_why():
    code = (
        "import torch; from vtprune.kernels import gather_kv\n"
        "kv = torch.zeros(1, 1, 3, 2)\n"
        "try:\n    gather_kv(kv, kv, torch.tensor([[0]]), backend='triton')\n"
        "except RuntimeError as e:\n    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[1])


def test_triton_missing(monkeypatch):
    """Without triton: the package imports, torch/auto work, backend='triton' says how to install it."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "vtprune.kernels._triton_gather", raising=False)
    monkeypatch.delattr("vtprune.kernels._triton_gather", raising=False)
    monkeypatch.delenv("VTPRUNE_FORCE_TRITON", raising=False)
    hidden, index = make_hidden((2, 5, 3), torch.float32), make_index(2, 5, 3)
    assert gather_mod._resolve_backend("auto", (hidden,)) == "torch"
    gather_tokens(hidden, index)
    with pytest.raises(ImportError, match=r"pip install vtprune\[triton\]"):
        gather_tokens(hidden, index, backend="triton")
    with pytest.raises(ImportError, match=r"pip install vtprune\[triton\]"):
        gather_kv(hidden[:, None], hidden[:, None], index, backend="triton")
    monkeypatch.setenv("VTPRUNE_FORCE_TRITON", "1")
    with pytest.raises(ImportError, match=r"pip install vtprune\[triton\]"):
        gather_tokens(hidden, index)


def test_take_columns_and_rows_follow_the_index_convention():
    from vtprune.kernels import take_columns, take_rows

    index = torch.tensor([[0, 2, 3], [-1, -1, 1]])
    ids = torch.arange(8).view(2, 4)
    assert take_columns(ids, index, -7).tolist() == [[0, 2, 3], [-7, -7, 5]]
    mrope = torch.arange(24).view(3, 2, 4)
    out = take_columns(mrope, index, 0)
    assert out.shape == (3, 2, 3) and out[2].tolist() == [[16, 18, 19], [0, 0, 21]]
    rows = torch.arange(16.0).view(2, 4, 2)
    assert take_rows(rows, index).tolist() == [[[0, 1], [4, 5], [6, 7]], [[0, 0], [0, 0], [10, 11]]]
