"""``vtprune`` command line: ``demo`` (the embedded default job), ``bench-prefill``, ``eval``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args) -> int:
    import torch

    from . import get_pruner, speed, unwrap, wrap

    torch.manual_seed(0)
    if not args.random:
        from .toy import answer_questions, load_toy_benchmark, load_toy_model

        model, processor = load_toy_model()
        data = load_toy_benchmark("test").select(range(args.samples))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"Accuracy: the shipped toy LLaVA ({params:.1f}M params, 36 visual tokens per image) answering "
            f"{len(data)} questions of the synthetic VQA test split, each method keeping a share of the visual "
            "tokens before the LLM."
        )
        print("| method | keep | visual tokens kept | accuracy |")
        print("|---|---|---|---|")
        for method, ratio in [("none", 1.0)] + [(m, r) for r in args.ratios for m in ("fastervlm", "random")]:
            if method != "none":
                wrap(model, method, keep_ratio=ratio)
            answers = answer_questions(model, processor, data["image"], data["question"])
            kept = get_pruner(model).last[0].visual_out if method != "none" else None
            if method != "none":
                unwrap(model)
            acc = sum(a == t for a, t in zip(answers, data["answer"])) / len(answers)
            print(f"| {method} | {ratio:g} | {kept if kept is not None else 'all'} | {acc:.3f} |")
        print()
    if not args.speed_ratios or not args.batches:
        return 0
    # Speed on the toy would mislead: its 4-layer 64-d LLM costs little next to fixed overheads, so pruning
    # 90% of its tokens shows ~1.1x. A mid-size model shows what pruning does to a prefill.
    model = speed.mid_llava()
    dims = model.config.text_config
    settings = [{"method": "fastervlm", "keep_ratio": r} for r in args.speed_ratios]
    visual = int((speed.bench_inputs(model, 1, 1)["input_ids"] == model.config.image_token_id).sum())
    print(
        f"Speed: prefill time (vision encoder + LLM) of a mid-size random LLaVA ({dims.num_hidden_layers}-layer "
        f"{dims.hidden_size}-d LLM, {visual} visual + {args.text_tokens} text tokens per sample), FasterVLM vs "
        f"unpruned timed interleaved in one run (median of {args.repeats}, threads={torch.get_num_threads()}): "
        "realised = measured speed-up, ideal = counted FLOPs ratio."
    )
    print(
        "| batch | setting | visual tokens | prefill (ms) | realised speed-up | ideal speed-up (FLOPs) "
        "| realised / ideal |"
    )
    print("|---|---|---|---|---|---|---|")
    ideal = None
    for batch in args.batches:
        inputs = speed.bench_inputs(model, batch, args.text_tokens)
        # Every sample is the same prompt shape, so FLOPs scale with the batch and their ratios do not:
        # counted once (at the first batch size), reused for the others.
        rows = speed.prefill_speedups(model, inputs, settings, repeats=args.repeats, flops=ideal is None)
        if ideal is None:
            ideal = [r.ideal for r in rows]
        for row, value in zip(rows, ideal):
            row.ideal = value
            ratio = "" if row.realised_vs_ideal is None else f"{row.realised_vs_ideal:.2f}"
            print(
                f"| {batch} | {row.label} | {row.visual_tokens:g} | {row.median_s * 1e3:.0f} "
                f"| {row.speedup:.2f}x | {value:.2f}x | {ratio} |"
            )
    return 0


def _bench_prefill(args) -> int:
    import json

    import torch

    from . import speed

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = speed.bench_model(args.family, args.size, device=args.device, dtype=dtype)
    inputs = speed.bench_inputs(model, args.batch, args.text_tokens, device=args.device, dtype=dtype)
    print(
        f"{args.size} random {args.family}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
        f"batch={args.batch}, device={args.device}, dtype={args.dtype}, threads={torch.get_num_threads()}, "
        f"clock={args.clock}, repeats={args.repeats} (interleaved, medians)"
    )
    if args.settings:
        from .eval.harness import parse_settings

        settings = [s for s in parse_settings(args.settings) if s != {"method": "none"}]
    elif args.method in ("static_exit", "fastv") and args.layers:
        settings = [{"method": args.method, "layer": layer} for layer in args.layers]
        if args.method == "fastv":
            settings = [s | {"keep_ratio": r} for s in settings for r in args.ratios]
    else:
        settings = [{"method": args.method, "keep_ratio": r} for r in args.ratios]
    results = speed.prefill_speedups(
        model, inputs, settings, repeats=args.repeats, clock=args.clock, flops=args.flops
    )
    print(speed.format_table(results))
    report = {
        "family": args.family,
        "size": args.size,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "clock": args.clock,
        "threads": torch.get_num_threads(),
        "prefill": [
            dict(vars(r), realised_vs_ideal=r.realised_vs_ideal, setting=s)
            for r, s in zip(results, [None, *settings])
        ],
    }
    if args.decode_tokens:
        from . import unwrap, wrap

        base = speed.time_generate(model, inputs, args.decode_tokens)
        print(
            f"\ngenerate {args.decode_tokens} tokens (prefill + decode), median of 3: unpruned {base * 1e3:.1f} ms"
        )
        report["generate"] = [{"setting": None, "median_s": base, "speedup": 1.0}]
        for setting in settings:
            wrap(model, [dict(p) for p in setting] if isinstance(setting, list) else dict(setting))
            try:
                t = speed.time_generate(model, inputs, args.decode_tokens)
            finally:
                unwrap(model)
            print(f"  {setting}: {t * 1e3:.1f} ms, speed-up {base / t:.2f}x")
            report["generate"].append({"setting": setting, "median_s": t, "speedup": base / t})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _eval(args) -> int:
    from pathlib import Path

    from .errors import UsageError
    from .eval.benchmarks import get_benchmark
    from .eval.harness import EvalRun, parse_settings, run_eval
    from .eval.models import Answerer, load_model, resolve_device, resolve_dtype

    out = Path(args.out)
    if out.exists() and not out.is_dir():  # checked first: before an hour of loading and running
        raise UsageError(f"--out {args.out!r} is a file; pass a folder (created if missing)")
    resolve_device(args.device)
    resolve_dtype(args.dtype)
    settings = parse_settings(args.methods)
    benchmarks = {}
    for spec in args.benchmarks:
        name, _, source = spec.partition("=")
        bench = get_benchmark(name)
        if bench.name in benchmarks:
            raise UsageError(f"--benchmarks: {bench.name!r} is given twice; evaluate one source per run")
        samples = bench.load(source=source or None, limit=args.limit)
        benchmarks[bench.name] = (bench, samples)
    model, processor, prompt_fn = load_model(args.model, device=args.device, dtype=args.dtype)
    run = EvalRun(
        model=model,
        answer=Answerer(processor, prompt_fn, device=args.device),
        benchmarks=benchmarks,
        settings=settings,
        out=out,
        batch_size=args.batch_size,
        warmup=args.warmup,
        meta={"model": args.model, "device": args.device, "dtype": args.dtype, "limit": args.limit},
    )
    summary = run_eval(run)
    if summary.files:  # rank 0 (the others have nothing to say)
        print((out / "summary.md").read_text())
        written = ", ".join(f"{out / f}" for f in summary.files)
        print(f"wrote {written} and per-sample JSONL under {out}/<benchmark>/")
    return 0


def _train_dyvte(args) -> int:
    import itertools
    import json

    import torch

    from .tune.dyvte import train_dyvte

    torch.manual_seed(args.seed)
    if args.model != "toy":
        raise SystemExit(
            "train-dyvte builds its calibration set from the synthetic benchmark's train split, which only the "
            "toy model reads; for other models call vtprune.tune.dyvte.train_dyvte(model, batches) with "
            "processor outputs of your calibration data"
        )
    from .toy import TOY_MODEL_DIR, build_prompt, load_toy_model
    from .toy.synthetic import generate

    model, processor = load_toy_model()
    # Calibrate on train-split scenes the model was not trained on: those after the ones its training used.
    seen = json.loads((TOY_MODEL_DIR / "training.json").read_text())["train_images"]
    rows = [
        (image, q)
        for _, image, qas in itertools.islice(generate("train", seen + args.images), seen, None)
        for _, q, _ in qas
    ]
    rows = rows[: args.samples]
    batches = [
        processor(
            images=[r[0] for r in rows[i : i + args.batch_size]],
            text=[build_prompt(r[1]) for r in rows[i : i + args.batch_size]],
            return_tensors="pt",
            padding=True,
        )
        for i in range(0, len(rows), args.batch_size)
    ]
    out = args.out or (TOY_MODEL_DIR / "vtprune_dyvte")
    folder, report = train_dyvte(
        model, [dict(b) for b in batches], out=out, max_new_tokens=3, epochs=args.epochs
    )
    print(
        f"saved DyVTE gates to {folder} ({report['samples']} calibration samples, {report['cpu_seconds']:.0f} CPU s)"
    )
    for layer, stats in report["layers"].items():
        print(
            f"  layer {layer}: exit label rate {stats['exit_rate']:.2f}, gate train accuracy {stats['train_accuracy']:.2f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="accuracy of pruning on the shipped toy model, and prefill speed-up (realised and FLOPs-ideal) "
        "on a mid-size random LLaVA",
    )
    demo.add_argument("--samples", type=int, default=100, help="toy questions for the accuracy table")
    demo.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1], help="accuracy table")
    demo.add_argument(
        "--speed-ratios",
        type=float,
        nargs="*",
        default=[0.25, 0.1],
        help="speed table (none: no speed table)",
    )
    demo.add_argument("--batches", type=int, nargs="*", default=[1, 4], help="speed table batch sizes")
    demo.add_argument("--repeats", type=int, default=3, help="timed prefills per setting (median)")
    demo.add_argument("--text-tokens", type=int, default=40, help="text tokens per prompt in the speed table")
    demo.add_argument("--random", action="store_true", help="only the speed table (skip the toy accuracy)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser(
        "bench-prefill",
        help="prefill speed-up, realised and FLOPs-ideal, on a random LLaVA / Qwen2-VL (576 visual tokens)",
    )
    bench.add_argument("--family", choices=["llava", "qwen2_vl"], default="llava")
    bench.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="settings as for eval --methods (e.g. fastervlm:keep_ratio=0.5,0.25 static_exit:layer=2); "
        "replaces --method/--layers/--ratios",
    )
    bench.add_argument("--method", default="fastervlm", help="fastervlm | random | fastv | static_exit")
    bench.add_argument("--layers", type=int, nargs="*", default=[], help="exit/FastV layers, e.g. 2 4 8")
    bench.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--text-tokens", type=int, default=40)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument(
        "--size", choices=["mid", "7b"], default="mid", help="7b: LLaVA-1.5-7B / Qwen2-VL-7B shapes (GPU)"
    )
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--decode-tokens", type=int, default=0, help="also time generate() of N tokens")
    bench.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (steadier on a shared CPU; single-threaded runs)",
    )
    bench.add_argument(
        "--no-flops", dest="flops", action="store_false", help="skip counting FLOPs (no ideal speed-up)"
    )
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    bench.set_defaults(func=_bench_prefill)

    ev = sub.add_parser("eval", help="accuracy vs realised speed-up over benchmarks x pruning settings")
    ev.add_argument(
        "--model",
        default="toy",
        help="'toy' (shipped), 'toy-video' (its video fine-tune, for synthetic_video), a local folder or a hub id",
    )
    ev.add_argument(
        "--benchmarks",
        nargs="+",
        default=["synthetic"],
        help="names, optionally NAME=local-folder mirroring the hub repo (offline)",
    )
    ev.add_argument(
        "--methods",
        nargs="+",
        default=["none", "fastervlm:keep_ratio=0.5,0.25,0.1", "random:keep_ratio=0.25"],
        help="settings: none | METHOD[:key=v1,v2[:key=...]] | JSON object | config.json; compose a pre-LLM "
        "and an in-LLM method with +, e.g. fastervlm:keep_ratio=0.25+fastv:layer=2",
    )
    from .eval.options import DTYPES, non_negative_int, positive_int

    ev.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="first N samples of each benchmark (a rerun reuses rows by sample id and reports only these N)",
    )
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument("--warmup", type=non_negative_int, default=1, help="untimed warm-up batches per setting")
    ev.add_argument(
        "--out", default="runs/eval", help="results folder; a rerun resumes it (same model and settings only)"
    )
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (checked before loading)")
    ev.add_argument("--dtype", default="auto", choices=DTYPES)
    ev.set_defaults(func=_eval)

    dy = sub.add_parser(
        "train-dyvte", help="train DyVTE exit gates on a calibration set and save them beside the model"
    )
    dy.add_argument("--model", default="toy")
    dy.add_argument("--samples", type=int, default=512, help="calibration questions")
    dy.add_argument(
        "--images", type=int, default=400, help="calibration scenes generated (train split stream)"
    )
    dy.add_argument("--batch-size", type=int, default=32)
    dy.add_argument("--epochs", type=int, default=300)
    dy.add_argument("--seed", type=int, default=0)
    dy.add_argument("--out", default=None, help="default: <model folder>/vtprune_dyvte")
    dy.set_defaults(func=_train_dyvte)
    from .tune.crosslmm_cli import add_parser as _add_crosslmm_parser

    _add_crosslmm_parser(sub)
    from .tune.search_cli import add_parser as _add_search_parser

    _add_search_parser(sub)

    args = parser.parse_args(argv)
    from .errors import UsageError

    try:
        return args.func(args)
    except UsageError as err:  # bad input: one line saying what to do; anything else is a bug: traceback
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        parser.exit(2, f"vtprune {args.command}: error: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
