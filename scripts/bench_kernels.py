"""Time the fused Triton gathers of :mod:`vtprune.kernels` against their torch twins (needs CUDA).

    python scripts/bench_kernels.py                 # bf16, B in {1, 8}, L in {600, 1440, 2880}
    python scripts/bench_kernels.py --dtype float16 --reps 200

Cases: ``gather_tokens`` on hidden ``(B, L, 4096)`` with M-RoPE positions ``(3, B, L)`` and a long mask, and
``gather_kv`` on one layer's key and value ``(B, 32, L, 128)``, keeping K = 10 / 25 / 50 % of L (rows
left-padded as :func:`~vtprune.kernels.keep_mask_to_index` makes them). Each timing is the median of
``--reps`` runs after ``--warmup`` runs, measured with CUDA events. The kernels are timed without the
public API's input validation (its bounds check costs one host sync, identical for both backends).

GB/s counts the bytes a gather must move: the kept rows read and written, the index read, positions and
mask read and written. Two timings per case: GPU time (the call captured in a CUDA graph, replayed) and
the eager call, where Python and launch overhead dominate small gathers. Inputs are not flushed from L2
between runs, so the small cases partly run from cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

if importlib.util.find_spec("vtprune") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time_ms(fn, reps: int, warmup: int, *, graph: bool) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events around each run).

    ``graph=False`` times eager calls: Python, dispatch and launch overhead included, which dominates small
    gathers. ``graph=True`` captures ``fn`` in a CUDA graph and times its replays: GPU time only.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _index(batch: int, length: int, k: int, device) -> torch.Tensor:
    """Left-padded index: sample 0 keeps k tokens, the others a little fewer (uneven rows)."""
    from vtprune.kernels import keep_mask_to_index

    g = torch.Generator(device="cpu").manual_seed(0)
    keep = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        n = k if b == 0 else max(1, k - int(torch.randint(0, max(1, k // 10), (1,), generator=g)))
        keep[b, torch.randperm(length, generator=g)[:n]] = True
    return keep_mask_to_index(keep).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--length", type=int, nargs="+", default=[600, 1440, 2880])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.10, 0.25, 0.50])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is required (the Triton kernels only run on a GPU); nothing to time.")
        return 0
    from vtprune.kernels import gather_kv_torch, gather_tokens_torch

    try:
        from vtprune.kernels import _triton_gather as tg
    except ImportError as e:
        print(f"bench_kernels: triton is required (pip install vtprune[triton]): {e}")
        return 0

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    print(f"device: {torch.cuda.get_device_name(device)}   dtype: {args.dtype}   median of {args.reps} runs")
    header = (
        f"{'op':<8}{'B':>3}{'L':>6}{'K':>6} | {'torch ms':>9}{'triton ms':>10}{'torch/triton':>13}"
        f"{'torch GB/s':>11}{'triton GB/s':>12} | {'torch ms':>9}{'triton ms':>10}{'torch/triton':>13}"
    )
    print(f"{'':<23} | {'GPU time (CUDA graph replay)':^55} | {'eager call (launch overhead incl.)':^32}")
    print(header)
    print("-" * len(header))

    for op in ("tokens", "kv"):
        for batch in args.batch:
            for length in args.length:
                if op == "tokens":
                    hidden = torch.randn(batch, length, args.dim, device=device, dtype=dtype)
                    positions = torch.arange(length, device=device).expand(3, batch, length).contiguous()
                    mask = torch.ones(batch, length, dtype=torch.long, device=device)
                else:
                    shape = (batch, args.heads, length, args.head_dim)
                    key = torch.randn(shape, device=device, dtype=dtype)
                    value = torch.randn(shape, device=device, dtype=dtype)
                for ratio in args.ratio:
                    k = max(1, round(length * ratio))
                    index = _index(batch, length, k, device)
                    if op == "tokens":
                        run_torch = partial(gather_tokens_torch, hidden, index, positions, mask)
                        run_triton = partial(tg.gather_tokens_triton, hidden, index, positions, mask)
                        moved = 2 * batch * k * (args.dim * itemsize + 4 * 8) + batch * k * 8
                    else:
                        run_torch = partial(gather_kv_torch, key, value, index)
                        run_triton = partial(tg.gather_kv_triton, key, value, index)
                        moved = 2 * 2 * batch * args.heads * k * args.head_dim * itemsize + batch * k * 8
                    for a, b in zip(run_torch(), run_triton()):
                        if not torch.equal(a, b):
                            print(f"MISMATCH in {op} B={batch} L={length} K={k}", file=sys.stderr)
                            return 1
                    t_torch = _time_ms(run_torch, args.reps, args.warmup, graph=True)
                    t_triton = _time_ms(run_triton, args.reps, args.warmup, graph=True)
                    e_torch = _time_ms(run_torch, args.reps, args.warmup, graph=False)
                    e_triton = _time_ms(run_triton, args.reps, args.warmup, graph=False)
                    print(
                        f"{op:<8}{batch:>3}{length:>6}{k:>6} | {t_torch:>9.4f}{t_triton:>10.4f}"
                        f"{t_torch / t_triton:>12.2f}x{moved / t_torch / 1e6:>11.0f}{moved / t_triton / 1e6:>12.0f}"
                        f" | {e_torch:>9.4f}{e_triton:>10.4f}{e_torch / e_triton:>12.2f}x"
                    )
                if op == "tokens":
                    del hidden, positions, mask
                else:
                    del key, value
    return 0


if __name__ == "__main__":
    sys.exit(main())
