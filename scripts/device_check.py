"""The Python sections of ``scripts/device_check.sh`` (issue 13's GPU check). Each writes one JSON file.

    python scripts/device_check.py bandwidth OUT.json            # Triton gathers: achieved GB/s, share of peak
    python scripts/device_check.py syncs OUT.json                # decoding step: no host sync, no graph break
    python scripts/device_check.py bench FAMILY OUT.json [--deadline S] [--decode-tokens N]
    python scripts/device_check.py merge REPORT.json SECTIONS.json...   # one report, targets evaluated

``bench`` runs 7B-shaped random LLaVA-1.5 / Qwen2-VL (bf16), batch 1 and 8, in priority order, writing
its JSON after every step, and skips (saying so) what would not finish before ``--deadline`` seconds:

1. eager prefill: unpruned, FasterVLM keep 0.5 / 0.25 / 0.1 / 0.05, static exit (layer 8), FastV (K=2,
   keep 0.25); realised speed-up beside the FLOPs-ideal one (``vtprune.speed.prefill_speedups``);
2. eager decode (static cache): time per generated token, unpruned and FasterVLM keep 0.25;
3. compiled prefill (batch 1, then 8): every decoder layer compiled in place (regional compilation,
   inductor), unpruned and the FasterVLM settings;
4. compiled decode: ``generate()``'s own compiled decoding path (static cache, inductor, CUDA graphs).

Every section also runs with ``--dry-run`` on a CPU (tiny models, no timing claims): how the script is
tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vtprune  # noqa: E402
from vtprune import speed  # noqa: E402
from vtprune.registry import get_family  # noqa: E402

# Nominal HBM bandwidth (GB/s) by device name; the measured device-to-device copy is reported beside it.
PEAK_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "GH200": 4000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
}
TARGETS = {"b1_compiled_realised_vs_ideal": 0.8, "b8_realised_vs_ideal": 0.9, "gather_share_of_peak": 0.8}
FASTERVLM = [{"method": "fastervlm", "keep_ratio": r} for r in (0.5, 0.25, 0.1, 0.05)]
IN_LLM = [{"method": "static_exit", "layer": 8}, {"method": "fastv", "layer": 2, "keep_ratio": 0.25}]


def _write(path, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def _nominal_peak(name: str) -> float | None:
    for key, gbs in PEAK_GBS.items():  # most specific names first
        if key in name:
            return float(gbs)
    return None


# --------------------------------------------------------------------------------------------------------
# bandwidth
# --------------------------------------------------------------------------------------------------------


def _graph_ms(fn, reps: int = 50) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (GPU time, no launch overhead)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidth(out: str, dry_run: bool) -> int:
    from vtprune.kernels import keep_mask_to_index

    if dry_run:
        _write(out, {"dry_run": True, "skipped": "bandwidth needs CUDA"})
        return 0
    from vtprune.kernels import _triton_gather as tg
    from vtprune.kernels import _triton_received as tr
    from vtprune.kernels.received_attention import received_attention_torch

    device, dtype = torch.device("cuda"), torch.bfloat16
    name = torch.cuda.get_device_name()
    # a measured peak: a large device-to-device copy (read + write)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = _graph_ms(partial(dst.copy_, src), reps=20)
    copy_gbs = 2 * src.numel() / copy_ms / 1e6
    del src, dst
    nominal = _nominal_peak(name)
    rows = []
    g = torch.Generator().manual_seed(0)
    for op in ("tokens", "kv"):
        for batch in (1, 8):
            for length in (1440, 2880):
                if op == "tokens":
                    hidden = torch.randn(batch, length, 4096, device=device, dtype=dtype)
                    positions = torch.arange(length, device=device).expand(3, batch, length).contiguous()
                    mask = torch.ones(batch, length, dtype=torch.long, device=device)
                else:
                    key = torch.randn(batch, 32, length, 128, device=device, dtype=dtype)
                    value = torch.randn_like(key)
                for ratio in (0.25, 0.5):
                    k = round(length * ratio)
                    keep = torch.zeros(batch, length, dtype=torch.bool)
                    for b in range(batch):
                        keep[b, torch.randperm(length, generator=g)[:k]] = True
                    index = keep_mask_to_index(keep).to(device)
                    if op == "tokens":
                        ms = _graph_ms(partial(tg.gather_tokens_triton, hidden, index, positions, mask))
                        moved = 2 * batch * k * (4096 * 2 + 4 * 8) + batch * k * 8
                    else:
                        ms = _graph_ms(partial(tg.gather_kv_triton, key, value, index))
                        moved = 2 * 2 * batch * 32 * k * 128 * 2 + batch * k * 8
                    gbs = moved / ms / 1e6
                    rows.append(
                        {
                            "op": op,
                            "batch": batch,
                            "length": length,
                            "kept": k,
                            "ms": ms,
                            "GBps": gbs,
                            "share_of_nominal_peak": gbs / nominal if nominal else None,
                            "share_of_copy": gbs / copy_gbs,
                        }
                    )
                    print(f"{op:6s} B={batch} L={length} K={k}: {ms:.4f} ms {gbs:.0f} GB/s", flush=True)
    # received attention at Qwen2-VL-7B's ViT (16 heads x 80, one 672px image = 2304 patches): kernel, twin, SDPA
    q = torch.randn(1, 16, 2304, 80, device=device, dtype=dtype)
    kk = torch.randn_like(q)
    received = {
        "triton_ms": _graph_ms(lambda: tr.received_attention_triton(q, kk, None, None)),
        "torch_twin_ms": _graph_ms(lambda: received_attention_torch(q, kk, None, None)),
        "sdpa_ms": _graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, kk)),
    }
    shares = [r["share_of_nominal_peak"] or r["share_of_copy"] for r in rows]
    big = [s for r, s in zip(rows, shares) if r["batch"] == 8]
    report = {
        "device": name,
        "nominal_peak_GBps": nominal,
        "copy_GBps": copy_gbs,
        "gathers": rows,
        "gather_share_of_peak_median_batch8": statistics.median(big),
        "gather_share_of_peak_max": max(shares),
        "received_attention_qwen7b_vit": received,
    }
    _write(out, report)
    return 0


# --------------------------------------------------------------------------------------------------------
# syncs / graph breaks in the decoding step
# --------------------------------------------------------------------------------------------------------


def syncs(out: str, dry_run: bool) -> int:
    """For a pre-LLM and an in-LLM method on the tiny LLaVA and Qwen2-VL: run a static-cache prefill, then
    generate()'s preparation and the decoding forward under ``torch.cuda.set_sync_debug_mode("error")``
    (a host sync raises), and count Dynamo graph breaks in that forward."""
    from vtprune.testing import TINY_FAMILIES

    device = "cpu" if dry_run else "cuda"
    rows = []
    for family in ("llava", "qwen2_vl"):
        for setting in ({"method": "fastervlm", "keep_ratio": 0.3}, {"method": "static_exit", "layer": 1}):
            row = {"family": family, "setting": setting}
            try:
                tiny = TINY_FAMILIES[family]
                model = tiny.build(text_layers=3).to(device)
                inputs = {k: v.to(device) for k, v in tiny.inputs(model).items()}
                vtprune.wrap(model, setting)
                calls, masks = [], []
                prepare = model.__dict__["create_masks_for_generate"]

                def record(_prepare=prepare, _masks=masks, **kwargs):
                    _masks.append(kwargs)
                    return _prepare(**kwargs)

                model.__dict__["create_masks_for_generate"] = record
                hook = model.register_forward_pre_hook(
                    lambda m, a, kw, _calls=calls: _calls.append(dict(kw)), with_kwargs=True
                )
                with torch.no_grad():
                    model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
                hook.remove()
                model.__dict__["create_masks_for_generate"] = prepare
                with torch.no_grad():
                    calls[0]["cache"].reset()
                    model(**calls[0])
                    if not dry_run:
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        step = calls[1] | {"attention_mask": prepare(**masks[-1])}
                        model(**step)
                        row["host_syncs"] = 0 if not dry_run else None
                    except RuntimeError as e:
                        row["host_syncs"] = f"sync: {str(e).splitlines()[0][:200]}"
                    finally:
                        if not dry_run:
                            torch.cuda.set_sync_debug_mode(0)
                    # the cache holds the prompt and one step now: refill it so the step is replayed at the
                    # same position (a static cache sized for max_new_tokens has no room for a third write)
                    calls[0]["cache"].reset()
                    model(**calls[0])
                    step = calls[1] | {"attention_mask": prepare(**masks[-1])}
                    explanation = torch._dynamo.explain(model)(**step)
                row["graph_breaks"] = explanation.graph_break_count
                row["break_reasons"] = [b.reason.splitlines()[0] for b in explanation.break_reasons]
                row["ok"] = row["graph_breaks"] == 0 and row["host_syncs"] in (0, None)
                vtprune.unwrap(model)
            except Exception as e:  # noqa: BLE001
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
            torch._dynamo.reset()
            rows.append(row)
            print(row, flush=True)
    _write(out, {"dry_run": dry_run, "steps": rows, "ok": all(r["ok"] for r in rows)})
    return 0


# --------------------------------------------------------------------------------------------------------
# prefill / decode benchmarks
# --------------------------------------------------------------------------------------------------------


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def _rows(results, settings) -> list[dict]:
    return [
        dict(vars(r), realised_vs_ideal=r.realised_vs_ideal, setting=s)
        for r, s in zip(results, [None, *settings])
    ]


def _decode_ms_per_token(model, inputs, tokens: int, compile_config=None, repeats: int = 3) -> float:
    """(generate of 1 + tokens) minus (generate of 1), per token: the decoding steps alone."""
    kwargs = dict(do_sample=False, cache_implementation="static")
    if compile_config is None:
        kwargs["disable_compile"] = True
    else:
        kwargs["compile_config"] = compile_config

    def gen(n):
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)

    with torch.inference_mode():
        gen(1 + tokens)  # warm-up (and compilation)
        gen(1 + tokens)
        long, short = [], []
        for _ in range(repeats):
            for n, out in ((1 + tokens, long), (1, short)):
                speed._sync(model.device)
                start = time.perf_counter()
                gen(n)
                speed._sync(model.device)
                out.append(time.perf_counter() - start)
    return 1e3 * (statistics.median(long) - statistics.median(short)) / tokens


def _compile_decoder_layers(model) -> None:
    """Regional compilation: each decoder layer's forward compiled in place (one graph shared by all layers;
    recompiled when the token count changes, then dynamic)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in get_family(model).decoder_layers:
        layer.compile()


def bench(family: str, out: str, deadline_s: float, decode_tokens: int, dry_run: bool) -> int:
    deadline = Deadline(deadline_s)
    report: dict = {"family": family, "dry_run": dry_run, "steps": {}, "skipped": [], "errors": {}}
    if dry_run:
        device, dtype, size = "cpu", torch.float32, "tiny"
        from vtprune.testing import TINY_FAMILIES

        model = TINY_FAMILIES[family].build(text_layers=4)
        batches = {1: TINY_FAMILIES[family].inputs(model)}
        batches[8] = batches[1]
        in_llm = [{"method": "static_exit", "layer": 2}, {"method": "fastv", "layer": 1, "keep_ratio": 0.25}]
        repeats = 1
    else:
        device, dtype, size = "cuda", torch.bfloat16, "7b"
        model = speed.bench_model(family, size, device=device, dtype=dtype)
        batches = {b: speed.bench_inputs(model, b, 40, device=device, dtype=dtype) for b in (1, 8)}
        in_llm = IN_LLM
        repeats = 5
    report["model"] = {
        "size": size,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype),
    }
    _write(out, report)

    def step(name: str, needs_s: float, fn) -> None:
        if deadline.left() < needs_s:
            report["skipped"].append(
                f"{name}: {deadline.left():.0f} s left of the budget, needs ~{needs_s:.0f}"
            )
        else:
            start = time.perf_counter()
            try:
                report["steps"][name] = fn()
            except Exception:  # noqa: BLE001 - a failed step is reported, the next one runs
                report["errors"][name] = traceback.format_exc()[-2000:]
            report.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        _write(out, report)
        print(f"{family} {name}: done ({deadline.left():.0f} s left)", flush=True)

    settings = FASTERVLM + in_llm
    for batch in (1, 8):
        step(
            f"prefill_eager_b{batch}",
            10,
            lambda b=batch: _rows(
                speed.prefill_speedups(model, batches[b], settings, repeats=repeats), settings
            ),
        )

    def decode(batch, compile_config=None):
        out = {}
        for setting in (None, FASTERVLM[1]):
            if setting is not None:
                vtprune.wrap(model, setting)
            try:
                out["unpruned" if setting is None else "fastervlm keep_ratio=0.25"] = _decode_ms_per_token(
                    model, batches[batch], decode_tokens, compile_config, repeats=1 if dry_run else 3
                )
            finally:
                if setting is not None:
                    vtprune.unwrap(model)
        return {"ms_per_token": out}

    for batch in (1, 8):
        step(f"decode_eager_b{batch}", 10, lambda b=batch: decode(b))

    compiled = {"done": False}

    def prefill_compiled(batch):
        if not compiled["done"]:
            _compile_decoder_layers(model)
            compiled["done"] = True
        return _rows(speed.prefill_speedups(model, batches[batch], FASTERVLM, repeats=repeats), FASTERVLM)

    for batch in (1, 8):
        step(f"prefill_compiled_b{batch}", 60, lambda b=batch: prefill_compiled(b))

    if compiled["done"]:  # back to eager layers before generate() compiles the whole decoding step
        for layer in get_family(model).decoder_layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()
    from transformers import CompileConfig

    config = CompileConfig(
        mode=None if dry_run else "reduce-overhead", backend="aot_eager" if dry_run else "inductor"
    )
    config._compile_all_devices = dry_run or None
    for batch in (1, 8):
        step(f"decode_compiled_b{batch}", 90, lambda b=batch: decode(b, config))
    report["total_seconds"] = round(deadline_s - deadline.left(), 1)
    _write(out, report)
    return 0


# --------------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------------


def _min_ratio(rows, methods=("fastervlm",)) -> float | None:
    values = [
        r["realised_vs_ideal"]
        for r in rows or []
        if r.get("setting") and r["setting"]["method"] in methods and r.get("realised_vs_ideal") is not None
    ]
    return min(values) if values else None


def merge(report_path: str, section_files: list[str]) -> int:
    report = {"issue": 13, "sections": {}}
    for path in section_files:
        data = json.loads(Path(path).read_text())
        report["sections"][data.pop("section")] = data
    targets = {}
    for name, section in report["sections"].items():
        result = section.get("result") or {}
        if name.startswith("bench_"):
            steps = result.get("steps", {})
            for key, target, label in (
                ("prefill_compiled_b1", TARGETS["b1_compiled_realised_vs_ideal"], "b1_compiled"),
                ("prefill_eager_b8", TARGETS["b8_realised_vs_ideal"], "b8_eager"),
                ("prefill_compiled_b8", TARGETS["b8_realised_vs_ideal"], "b8_compiled"),
            ):
                value = _min_ratio(steps.get(key))
                targets[f"{name[6:]}_{label}_min_realised_vs_ideal"] = {
                    "value": value,
                    "target": target,
                    "met": None if value is None else value >= target,
                }
        if name == "bandwidth" and "gather_share_of_peak_median_batch8" in result:
            value = result["gather_share_of_peak_median_batch8"]
            targets["gather_share_of_peak"] = {
                "value": value,
                "target": TARGETS["gather_share_of_peak"],
                "met": value >= TARGETS["gather_share_of_peak"],
            }
    report["targets"] = targets
    report["sections_failed"] = [n for n, s in report["sections"].items() if s.get("rc") not in (0, None)]
    _write(report_path, report)
    print(json.dumps({"targets": targets, "sections_failed": report["sections_failed"]}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("bandwidth", "syncs"):
        p = sub.add_parser(name)
        p.add_argument("out")
        p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("bench")
    p.add_argument("family", choices=speed.FAMILIES)
    p.add_argument("out")
    p.add_argument("--deadline", type=float, default=110.0, help="seconds this family may take")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("merge")
    p.add_argument("report")
    p.add_argument("sections", nargs="+")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.cmd == "bandwidth":
        return bandwidth(args.out, args.dry_run)
    if args.cmd == "syncs":
        return syncs(args.out, args.dry_run)
    if args.cmd == "bench":
        return bench(args.family, args.out, args.deadline, args.decode_tokens, args.dry_run)
    return merge(args.report, args.sections)


if __name__ == "__main__":
    raise SystemExit(main())
