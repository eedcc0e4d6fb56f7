"""``vtprune search gsearch|psigmoid``: search a per-layer visual-token schedule on calibration data.

::

    vtprune search gsearch                            # toy model, accuracy on 512 unseen train-split questions
    vtprune search psigmoid --budget 0.4              # best calibration accuracy at 40% of the prefill FLOPs
    vtprune search gsearch --model mid-llava --objective kl --tolerance 0.01   # label-free, random LLaVA
    vtprune search gsearch --model llava-hf/llava-1.5-7b-hf --benchmark gqa=/data/GQA --objective agreement

The folder (``--out``) receives ``schedule.json`` (a whole ``schedule`` config dict: ``vtprune eval --methods
<out>/schedule.json``, or ``vtprune.wrap(model, "schedule", path=<it>)``), ``schedule.png`` (keep count per
layer), ``search.json`` + ``summary.md`` (settings, result, wall time, every trial) and ``trials.jsonl`` (one
line per evaluated schedule, written as the search goes: started again with the same settings, a killed
search replays it and continues to the same result). :func:`run_search` is the same from Python.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import UsageError
from .calibration import OBJECTIVES, CalibrationSet, ScheduleObjective
from .search import Space, TrialLog, greedy_search, psigmoid_search, require_optuna

__all__ = ["run_search", "add_parser"]

KINDS = ("gsearch", "psigmoid")


def _fingerprint(model, calibration: CalibrationSet) -> dict:
    ids = hashlib.sha1()
    for batch in calibration.batches:
        ids.update(batch["input_ids"].cpu().numpy().tobytes())
        if batch.get("pixel_values") is not None:
            ids.update(batch["pixel_values"].float().cpu().numpy().tobytes()[:4096])
    return {
        "model_type": model.config.model_type,
        "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype),
        "calibration": calibration.description,
        "calibration_samples": len(calibration),
        "calibration_hash": ids.hexdigest()[:16],
    }


def run_search(
    kind: str,
    model,
    calibration: CalibrationSet,
    out: str | Path | None,
    *,
    objective: str = "agreement",
    tolerance: float = 0.0,
    budget: float | None = None,
    trials: int = 30,
    startup: int = 10,
    seed: int = 0,
    grid: int | None = None,
    rank: str = "text",
    reuse_order: bool = False,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Run G-Search (``kind="gsearch"``) or P-Sigmoid (``"psigmoid"``, needs ``budget``) and write its files
    to ``out`` (``None``: nothing written, trials kept in memory). Returns the summary dict (also
    ``search.json``)."""
    if kind not in KINDS:
        raise UsageError(f"search kind must be one of {KINDS}, got {kind!r}")
    if kind == "psigmoid":
        if budget is None:
            raise UsageError("psigmoid needs --budget (the FLOPs ratio against the unpruned model, e.g. 0.4)")
        if not 0 < budget <= 1:
            raise UsageError(f"budget must be a FLOPs ratio in (0, 1], got {budget}")
        require_optuna()  # before the calibration set is encoded
    if tolerance < 0:
        raise UsageError(f"tolerance must be >= 0, got {tolerance}")
    start = time.perf_counter()
    scorer = ScheduleObjective(model, calibration, objective, max_new_tokens, rank, reuse_order)
    space = Space.grid(scorer.num_layers, scorer.visual_tokens, grid)
    cost = scorer.cost(space.unit)
    header = _fingerprint(model, calibration) | {
        "objective": objective,
        "max_new_tokens": scorer.max_new_tokens if objective != "kl" else None,
        "rank": rank,
        "reuse_order": reuse_order,
        "unit": space.unit,
        "num_layers": space.num_layers,
    }
    out = Path(out) if out is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = trials if kind == "psigmoid" else None
        bar = tqdm(total=total, desc=f"{kind} ({objective})", unit="trial")

    shown: set[int] = set()

    def on_trial(record: dict) -> None:
        if bar is None or record["trial"] in shown:
            return
        shown.add(record["trial"])
        bar.update(1)
        values = ",".join(f"{v:g}" for v in record["values"])
        bar.set_postfix(score=f"{record['score']:.4f}", flops=f"{record['flops_ratio']:.3f}")
        bar.write(
            f"  trial {record['trial']:>3}: keep [{values}]  score {record['score']:.4f}  "
            f"FLOPs {record['flops_ratio']:.3f}  ({record['seconds']:.1f} s{', from the log' if record['trial'] < logged else ''})"
        )

    log = TrialLog(
        out / "trials.jsonl" if out is not None else None,
        header,
        lambda values: scorer(values, space.unit),
        cost,
        on_trial,
    )
    logged = len(log)  # trials already on disk (a resumed search)
    threshold = scorer.threshold(tolerance)
    try:
        if kind == "gsearch":
            result = greedy_search(log.evaluate, space, threshold, cost)
        else:
            result = psigmoid_search(
                log.evaluate, space, budget, cost, trials=trials, seed=seed, startup=startup
            )
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    schedule = {
        "method": "schedule",
        "version": 1,
        "keep": result.values,
        "unit": space.unit,
        "rank": rank,
        "reuse_order": reuse_order,
    }
    summary = {
        "search": kind,
        "settings": header
        | {
            "tolerance": tolerance if kind == "gsearch" else None,
            "budget": budget,
            "trials": trials if kind == "psigmoid" else None,
            "seed": seed if kind == "psigmoid" else None,
            "candidates": list(space.candidates),
        },
        "schedule": schedule,
        "visual_tokens_per_layer": _per_layer(result.values, space, scorer.visual_tokens),
        "score": result.score,
        "unpruned_score": scorer.baseline,
        "threshold": threshold if kind == "gsearch" else None,
        "flops_ratio": result.flops_ratio,
        "evaluations": result.evaluations,
        "trials_logged": len(log),
        "evaluated_this_run": log.fresh,
        "replayed_from_log": log.replayed,
        "vision_encoder_calls": scorer.encoder_calls,
        "wall_s": round(wall, 1),
        "trial_seconds_logged": round(sum(r["seconds"] for r in log.order), 1),
        **result.details,
    }
    if out is not None:
        _write(out, schedule, summary, log.order)
    return summary


def _per_layer(values, space: Space, visual: list[int]) -> list[float]:
    from ..methods.schedule import layer_counts

    rows = [layer_counts(list(values), space.unit, n) for n in visual]
    return [round(sum(col) / len(col), 2) for col in zip(*rows)]


def _write(out: Path, schedule: dict, summary: dict, trials: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "schedule.json").write_text(json.dumps(schedule, indent=2) + "\n")
    (out / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    s = summary
    lines = [
        f"# {s['search']} schedule search",
        "",
        f"- calibration: {s['settings']['calibration']} ({s['settings']['calibration_samples']} samples)",
        f"- objective: {s['settings']['objective']}; unpruned score {s['unpruned_score']:.4f}"
        + (f"; threshold {s['threshold']:.4f}" if s["threshold"] is not None else "")
        + (f"; FLOPs budget {s['settings']['budget']:g}" if s["settings"]["budget"] is not None else ""),
        f"- ranking: {s['settings']['rank']} queries, reuse_order={s['settings']['reuse_order']}",
        f"- result: keep {s['schedule']['keep']} ({s['schedule']['unit']}); visual tokens per layer "
        f"{s['visual_tokens_per_layer']}",
        f"- score {s['score']:.4f}, FLOPs ratio {s['flops_ratio']:.4f}",
        f"- {s['evaluations']} schedules evaluated ({s['evaluated_this_run']} in this run, "
        f"{s['replayed_from_log']} answers replayed from trials.jsonl); wall time of this run {s['wall_s']} s; "
        f"logged trial time {s['trial_seconds_logged']} s; vision encoder calls {s['vision_encoder_calls']}",
        "",
        "| trial | keep per layer | score | FLOPs ratio | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in trials:
        values = ", ".join(f"{v:g}" for v in r["values"])
        lines.append(
            f"| {r['trial']} | {values} | {r['score']:.4f} | {r['flops_ratio']:.4f} | {r['seconds']} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(out / "schedule.png", summary)


def _plot(path: Path, summary: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional (pip install vtprune[plot])
        return
    per_layer = summary["visual_tokens_per_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.step(range(len(per_layer)), per_layer, where="post", marker="o")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens kept")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{summary['search']}: FLOPs ratio {summary['flops_ratio']:.3f}, "
        f"{summary['settings']['objective']} {summary['score']:.3f}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================================
# Command line
# ============================================================================================================


def _load(args):
    import torch

    if args.model == "mid-llava":
        from ..speed import mid_llava
        from .calibration import random_calibration

        if args.benchmark:
            raise UsageError("--model mid-llava has random weights and no processor: drop --benchmark")
        torch.manual_seed(args.seed)
        model = mid_llava(device=args.device).eval()
        return model, random_calibration(
            model, args.samples or 8, args.text_tokens, args.batch_size or 4, args.seed
        )
    from ..eval.models import load_model
    from .calibration import benchmark_calibration, toy_calibration

    model, processor, prompt_fn = load_model(args.model, args.device, args.dtype)
    if args.benchmark:
        name, _, source = args.benchmark.partition("=")
        calibration = benchmark_calibration(
            name, processor, prompt_fn, args.samples or 256, args.batch_size or 8, source or None
        )
    elif args.model == "toy":
        calibration = toy_calibration(processor, args.samples or 512, args.images, args.batch_size or 32)
    else:
        raise UsageError(
            "pass --benchmark NAME[=local folder] for calibration data (only the toy model has a default set)"
        )
    return model, calibration


def _search(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, calibration = _load(args)
    objective = args.objective or ("accuracy" if calibration.samples is not None else "agreement")
    tolerance = args.tolerance if args.tolerance is not None else 0.0
    out = args.out or (f"runs/search-{args.kind}" + (f"-{args.budget:g}" if args.kind == "psigmoid" else ""))
    summary = run_search(
        args.kind,
        model,
        calibration,
        out,
        objective=objective,
        tolerance=tolerance,
        budget=getattr(args, "budget", None),
        trials=getattr(args, "trials", 30),
        startup=getattr(args, "startup", 10),
        seed=args.seed,
        grid=args.grid,
        rank=args.rank,
        reuse_order=args.reuse_order,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    print(
        f"{args.kind}: keep {summary['schedule']['keep']} ({summary['schedule']['unit']}), "
        f"{objective} {summary['score']:.4f} (unpruned {summary['unpruned_score']:.4f}), "
        f"FLOPs ratio {summary['flops_ratio']:.3f}, {summary['evaluations']} schedules, {summary['wall_s']} s"
    )
    print(f"wrote {out}/schedule.json (evaluate it: vtprune eval --methods {out}/schedule.json)")
    return 0


def _common(p) -> None:
    from ..eval.options import DTYPES, positive_int

    p.add_argument(
        "--model", default="toy", help="'toy', 'mid-llava' (random weights), a local folder or hub id"
    )
    p.add_argument(
        "--benchmark",
        default=None,
        help="calibration data: a benchmark the eval harness loads, NAME[=local folder] (default: the toy "
        "model's unseen train-split scenes; random prompts for mid-llava)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=None, help="calibration samples (512 toy, 256, 8 random)"
    )
    p.add_argument("--images", type=positive_int, default=400, help="toy: train-split scenes generated")
    p.add_argument("--text-tokens", type=positive_int, default=40, help="mid-llava: text tokens per prompt")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="accuracy (labels) | agreement: same greedy answer as unpruned | kl: of the first answer token "
        "(default: accuracy when the data has labels, else agreement)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="gsearch: allowed drop from the unpruned score (accuracy/agreement), or the KL bound (default 0)",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="answer length (default: the benchmark's)"
    )
    p.add_argument("--rank", choices=("text", "last"), default="text", help="queries that rank visual tokens")
    p.add_argument("--reuse-order", action="store_true", help="rank once, at the first drop")
    p.add_argument(
        "--grid",
        type=positive_int,
        default=None,
        help="candidate levels per layer (default: every count up to 64)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="results folder (default runs/search-<kind>[-budget]); resumable"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub) -> None:
    """Register ``vtprune search gsearch|psigmoid`` on the CLI's subparsers."""
    from ..eval.options import positive_int

    search = sub.add_parser(
        "search", help="search a per-layer visual-token schedule (G-Search, P-Sigmoid) on calibration data"
    )
    kinds = search.add_subparsers(dest="kind", required=True)
    g = kinds.add_parser("gsearch", help="least visual tokens per layer without a calibration score drop")
    _common(g)
    p = kinds.add_parser(
        "psigmoid", help="best calibration score under a FLOPs budget (Bayesian optimisation)"
    )
    _common(p)
    p.add_argument(
        "--budget", type=float, required=True, help="FLOPs ratio against the unpruned model, e.g. 0.4"
    )
    p.add_argument("--trials", type=positive_int, default=30)
    p.add_argument(
        "--startup", type=positive_int, default=10, help="random trials before the GP sampler models"
    )
    for parser in (g, p):
        parser.set_defaults(func=_search)
