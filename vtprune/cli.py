"""``vtprune`` command line: ``demo`` (the embedded default job), ``bench-prefill``, ``eval``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args) -> int:
    import torch

    from . import benchmark, get_pruner, unwrap, wrap

    torch.manual_seed(0)
    try:
        from .toy import load_toy_benchmark, load_toy_model
    except ImportError:
        load_toy_model = None
    if load_toy_model is not None and not args.random:
        model, processor = load_toy_model()
        data = load_toy_benchmark("test").select(range(args.samples))
        from .toy import answer_questions

        print(
            f"toy LLaVA ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on the synthetic VQA test split"
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
        inputs = processor(images=data["image"][:1], text=[data["question"][0]], return_tensors="pt")
    else:
        print("random mid-size LLaVA (576 visual tokens), random weights")
        model = benchmark.mid_llava()
        from .testing import llava_inputs

        inputs = llava_inputs(model, text_lengths=(40,))
    settings = [{"method": "fastervlm", "keep_ratio": r} for r in args.ratios]
    results = benchmark.prefill_speedups(model, inputs, settings, repeats=args.repeats)
    print("\nprefill (vision encoder + LLM, batch 1), FasterVLM vs unpruned, one run:")
    print(benchmark.format_table(results))
    return 0


def _bench_prefill(args) -> int:
    import torch

    from . import benchmark
    from .testing import llava_inputs

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = benchmark.mid_llava(device=args.device, dtype=getattr(torch, args.dtype))
    inputs = {k: v.to(args.device) for k, v in llava_inputs(model, text_lengths=(args.text_tokens,)).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
    print(
        f"mid-size random LLaVA: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
        f"device={args.device}, dtype={args.dtype}, threads={torch.get_num_threads()}"
    )
    if args.method in ("static_exit", "fastv") and args.layers:
        settings = [{"method": args.method, "layer": layer} for layer in args.layers]
        if args.method == "fastv":
            settings = [s | {"keep_ratio": r} for s in settings for r in args.ratios]
    else:
        settings = [{"method": args.method, "keep_ratio": r} for r in args.ratios]
    results = benchmark.prefill_speedups(model, inputs, settings, repeats=args.repeats)
    print(benchmark.format_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run pruning on the shipped toy model and print accuracy and speed-up")
    demo.add_argument("--samples", type=int, default=100)
    demo.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    demo.add_argument("--repeats", type=int, default=5)
    demo.add_argument(
        "--random", action="store_true", help="use a random mid-size LLaVA instead of the toy model"
    )
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench-prefill", help="prefill speed-up on a mid-size random LLaVA (576 tokens)")
    bench.add_argument("--method", default="fastervlm", help="fastervlm | random | fastv | static_exit")
    bench.add_argument("--layers", type=int, nargs="*", default=[], help="exit/FastV layers, e.g. 2 4 8")
    bench.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--text-tokens", type=int, default=40)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--threads", type=int, default=0)
    bench.set_defaults(func=_bench_prefill)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
