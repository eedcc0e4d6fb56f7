"""CPU prefill speed-up on a mid-size random InternVL (several tiles), pruned vs unpruned in one run, beside
the FLOPs-ideal speed-up (FastV's convention, text model only) of the same settings.

    PYTHONPATH=. python scripts/bench_internvl.py [--tiles 7] [--threads 1] [--repeats 5]

The model is :func:`vtprune.testing.internvl.mid_internvl` (448px tiles of 14px patches = 256 tokens a
tile, 6-layer 256-d InternViT, 16-layer 768-d Qwen2); one sample of ``--tiles`` tiles (6 + thumbnail).
"""

from __future__ import annotations

import argparse

import torch

from vtprune.eval.flops import prefill_flops
from vtprune.registry import get_family
from vtprune.speed import format_table, prefill_speedups
from vtprune.testing.internvl import internvl_inputs, mid_internvl


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = mid_internvl()
    inputs = internvl_inputs(model, images=((args.tiles,),), text_lengths=(24,))
    settings = [{"method": "fastervlm", "keep_ratio": r} for r in args.ratios]
    results = prefill_speedups(model, inputs, settings, repeats=args.repeats)
    dims = get_family(model).text_dims()
    n_text = results[0].prompt_tokens - results[0].visual_tokens

    def flops(visual: float) -> float:
        return prefill_flops(
            n_text, [round(visual)] * dims.num_layers, dims.hidden, dims.intermediate, dims.gated
        )

    print(format_table(results))
    print()
    print("| setting | measured speed-up | FLOPs-ideal speed-up (text model) |")
    print("|---|---|---|")
    for r in results:
        print(
            f"| {r.label} | {r.speedup:.2f}x | {flops(results[0].visual_tokens) / flops(r.visual_tokens):.2f}x |"
        )


if __name__ == "__main__":
    main()
