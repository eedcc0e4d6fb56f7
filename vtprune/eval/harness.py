"""Accuracy against realised speed-up: run benchmarks under several pruning settings in one command.

Layout of an output folder::

    <out>/run.json                       what was run: model, settings, protocols, FLOPs convention, versions
    <out>/<benchmark>/<setting>.jsonl    one record per sample, appended as batches finish (rank-suffixed
                                         files under ``accelerate launch``); a rerun skips what is there
    <out>/summary.md, summary.csv        one row per (benchmark, setting)
    <out>/pareto.png                     accuracy against prefill speed-up

Batches are formed from the benchmark order before sharding, and ranks take whole batches round-robin, so
a run over N processes computes exactly the batches a single process would.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..api import get_pruner, unwrap, wrap
from .flops import FLOPS_CONVENTION, prefill_flops, text_config_dims

__all__ = ["EvalRun", "parse_settings", "setting_label", "run_eval", "summarize"]

NONE = {"method": "none"}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_settings(specs: list[str]) -> list[dict]:
    """``["none", "fastervlm:keep_ratio=0.5,0.25", "static_exit:layer=2,4"]`` -> config dicts (cartesian
    product over comma-separated values). A spec may also be a JSON object or a path to a JSON file."""
    settings = []
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("{"):
            settings.append(json.loads(spec))
            continue
        if spec.endswith(".json") and Path(spec).is_file():
            settings.append(json.loads(Path(spec).read_text()))
            continue
        name, *fields = spec.split(":")
        if name == "none":
            if fields:
                raise ValueError("the 'none' setting takes no options")
            settings.append(dict(NONE))
            continue
        grid = []
        for item in fields:
            if "=" not in item:
                raise ValueError(f"bad option {item!r} in {spec!r}: expected key=value[,value...]")
            key, values = item.split("=", 1)
            grid.append([(key, _parse_value(v)) for v in values.split(",")])
        for combo in itertools.product(*grid) if grid else [()]:
            settings.append({"method": name, **dict(combo)})
    for setting in settings:  # validate now, not after an hour of running
        if setting.get("method") != "none":
            from ..config import PruneConfig

            PruneConfig.from_dict(setting)
    return settings


def setting_label(setting: dict) -> str:
    parts = [setting["method"]] + [f"{k}={v}" for k, v in setting.items() if k != "method"]
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", "-".join(parts))


@dataclass
class EvalRun:
    """Everything one ``vtprune eval`` invocation needs.

    ``answer(samples, model, generation_kwargs) -> (predictions, stats)`` runs one batch (see
    :class:`~vtprune.eval.models.Answerer`); ``model`` is the HF model that settings wrap.
    """

    model: Any
    answer: Any
    benchmarks: dict  # name -> (Benchmark, list[Sample])
    settings: list[dict]
    out: Path
    batch_size: int = 8
    warmup: int = 1
    meta: dict = field(default_factory=dict)


class _FirstTokenTimer:
    """A generate() streamer recording when the first new token appears (time to first token)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = 0
        self.first = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first put is the prompt
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first = time.perf_counter()

    def end(self):
        pass


def timed_generate(model, inputs: dict, **generate_kwargs) -> tuple[torch.Tensor, dict]:
    """``model.generate`` with time to first token, end-to-end latency and decode speed."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer = _FirstTokenTimer(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, streamer=timer, **generate_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    ttft = (timer.first or end) - start
    n_new = new.shape[1]
    stats = {
        "ttft_s": ttft,
        "latency_s": end - start,
        "new_tokens": n_new,
        "decode_tok_s": (n_new - 1) * new.shape[0] / (end - timer.first)
        if timer.first and n_new > 1
        else None,
        "peak_mem_mb": _peak_memory_mb(device),
    }
    return new, stats


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _state():
    """accelerate's process state; on machines without CUDA, processes started by ``accelerate launch``
    (or torchrun) join a gloo group (accelerate only does so itself when told the run is CPU-only)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _rank_info() -> tuple[int, int]:
    state = _state()
    return state.process_index, state.num_processes


def _barrier() -> None:
    state = _state()
    if state.num_processes > 1:
        state.wait_for_everyone()


def _done_ids(folder: Path, label: str) -> set[str]:
    done = set()
    for path in folder.glob(f"{label}*.jsonl"):
        if not re.fullmatch(re.escape(label) + r"(\.rank\d+)?\.jsonl", path.name):
            continue
        for line in path.read_text().splitlines():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by a kill: its sample is redone
    return done


def _records(folder: Path, label: str) -> list[dict]:
    records = {}
    for path in sorted(folder.glob(f"{label}*.jsonl")):
        if not re.fullmatch(re.escape(label) + r"(\.rank\d+)?\.jsonl", path.name):
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[str(rec["id"])] = rec
    return list(records.values())


def run_eval(run: EvalRun, progress: bool = True) -> list[dict]:
    """Run every (benchmark, setting); returns the summary rows (computed on rank 0, all ranks return)."""
    rank, world = _rank_info()
    run.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run.out / "run.json").write_text(
            json.dumps(
                run.meta
                | {
                    "settings": run.settings,
                    "benchmarks": {
                        name: getattr(b, "protocol", {}) for name, (b, _) in run.benchmarks.items()
                    },
                    "flops_convention": FLOPS_CONVENTION,
                    "batch_size": run.batch_size,
                    "processes": world,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )
    d, m, gated = text_config_dims(run.model)
    for (name, (bench, samples)), setting in itertools.product(run.benchmarks.items(), run.settings):
        folder = run.out / name
        folder.mkdir(parents=True, exist_ok=True)
        label = setting_label(setting)
        batches = [samples[i : i + run.batch_size] for i in range(0, len(samples), run.batch_size)]
        mine = [(i, b) for i, b in enumerate(batches) if i % world == rank]
        done = _done_ids(folder, label)
        todo = [(i, [s for s in b if str(s.id) not in done]) for i, b in mine]
        todo = [(i, b) for i, b in todo if b]
        path = folder / (f"{label}.rank{rank}.jsonl" if world > 1 else f"{label}.jsonl")
        if todo:
            _run_setting(run, bench, setting, todo, path, name, label, (d, m, gated), progress and rank == 0)
        _barrier()
    _barrier()
    rows = summarize(
        run.out, list(run.benchmarks), run.settings, {n: b for n, (b, _) in run.benchmarks.items()}
    )
    if rank == 0:
        write_reports(run.out, rows)
    return rows


def _run_setting(run, bench, setting, todo, path, name, label, dims, progress):
    from tqdm.auto import tqdm

    model = run.model
    pruned = setting["method"] != "none"
    if pruned:
        wrap(model, dict(setting))
    try:
        for _ in range(run.warmup):  # a full first batch: kernels, caches, allocator; nothing recorded
            run.answer(todo[0][1], model, bench.generation_kwargs)
        bar = tqdm(todo, desc=f"{name} {label}", disable=not progress, unit="batch")
        for batch_index, samples in bar:
            predictions, stats = run.answer(samples, model, bench.generation_kwargs)
            selections = get_pruner(model).last if pruned else None
            lines = []
            for j, (sample, pred) in enumerate(zip(samples, predictions)):
                rec = {
                    "id": str(sample.id),
                    "benchmark": name,
                    "setting": label,
                    "prediction": pred,
                    "batch": batch_index,
                    **bench.score_sample(sample, pred),
                    **stats,
                }
                rec |= _token_stats(model, selections[j] if selections else None, stats["prompt"][j], dims)
                rec.pop("prompt")
                lines.append(json.dumps(rec, default=_jsonable))
            with open(path, "a") as f:  # one write + fsync per batch: a kill loses at most this batch
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
    finally:
        if pruned:
            unwrap(model)


def _token_stats(model, selection, prompt, dims) -> dict:
    d, m, gated = dims
    n_layers = len(model.model.language_model.layers)
    if selection is not None:
        text = selection.tokens_in - selection.visual_in
        layer_visual = list(selection.layer_visual)
        visual_in = selection.visual_in
    else:
        text, visual_in = prompt["text"], prompt["visual"]
        layer_visual = [visual_in] * n_layers
    full = prefill_flops(text, [visual_in] * n_layers, d, m, gated)
    flops = prefill_flops(text, layer_visual, d, m, gated)
    return {
        "visual_in": visual_in,
        "visual_per_layer": layer_visual,
        "visual_mean": sum(layer_visual) / len(layer_visual),
        "text_tokens": text,
        "prefill_tflops": flops / 1e12,
        "flops_ratio": flops / full if full else 1.0,
    }


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def summarize(out: Path, benchmarks: list[str], settings: list[dict], bench_objs: dict) -> list[dict]:
    rows = []
    for name in benchmarks:
        base_ttft = None
        per_setting = []
        for setting in settings:
            label = setting_label(setting)
            recs = _records(out / name, label)
            if not recs:
                continue
            metrics = bench_objs[name].aggregate(recs)
            batches = {}
            for r in recs:
                batches.setdefault(r["batch"], r)
            b = list(batches.values())
            row = {
                "benchmark": name,
                "setting": label,
                "samples": len(recs),
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                "visual_tokens_mean": statistics.fmean(r["visual_mean"] for r in recs),
                "flops_ratio": statistics.fmean(r["flops_ratio"] for r in recs),
                "ttft_ms": 1e3 * statistics.median(x["ttft_s"] for x in b),
                "latency_ms": 1e3 * statistics.median(x["latency_s"] for x in b),
                "decode_tok_s": _median([x["decode_tok_s"] for x in b]),
                "peak_mem_mb": max(x["peak_mem_mb"] for x in b),
            }
            if setting["method"] == "none":
                base_ttft = row["ttft_ms"]
            per_setting.append(row)
        for row in per_setting:
            row["speedup"] = base_ttft / row["ttft_ms"] if base_ttft else None
        rows.extend(per_setting)
    return rows


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_reports(out: Path, rows: list[dict]) -> None:
    import csv

    if not rows:
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        plot_pareto(out / "pareto.png", rows)
    except ImportError as err:
        (out / "pareto.txt").write_text(f"no plot: {err}\n")


def plot_pareto(path: Path, rows: list[dict], metric: str | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the Pareto plot needs matplotlib: pip install 'vtprune[plot]'") from err
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["benchmark"] for r in rows):
        bench_rows = [r for r in rows if r["benchmark"] == name]
        key = metric or _main_metric(bench_rows[0])
        for method in dict.fromkeys(r["setting"].split("-")[0] for r in bench_rows):
            pts = [r for r in bench_rows if r["setting"].split("-")[0] == method]
            for ax, x in zip(axes, ("speedup", "flops_ratio")):
                xs = [(r[x] if x == "speedup" else 1 / r[x]) for r in pts]
                ys = [r[key] for r in pts]
                ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=f"{name}: {method}")
        for ax, title in zip(axes, ("realised prefill speed-up (TTFT)", "FLOPs reduction (x)")):
            ax.set_xlabel(title)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _main_metric(row: dict) -> str:
    for key in ("accuracy", "exact_match", "vqa_accuracy", "f1", "score", "perception"):
        if key in row:
            return key
    skip = {
        "samples",
        "visual_tokens_mean",
        "flops_ratio",
        "ttft_ms",
        "latency_ms",
        "decode_tok_s",
        "peak_mem_mb",
        "speedup",
    }
    return next(k for k, v in row.items() if isinstance(v, (int, float)) and k not in skip)
