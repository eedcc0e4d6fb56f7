"""Decoder-layer throughput against tokens per forward (why the FLOPs ratio overstates small forwards).

python scripts/layer_curve.py --family llava --threads 1 --clock cpu
python scripts/layer_curve.py --family qwen2_vl --size 7b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtprune import speed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=speed.FAMILIES, default="llava")
    parser.add_argument("--size", choices=["mid", "7b"], default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(speed.CLOCKS), default="wall")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[16, 32, 41, 64, 101, 128, 185, 256, 400, 619, 1024]
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = speed.bench_model(args.family, args.size, device=args.device, dtype=getattr(torch, args.dtype))
    rows = speed.layer_throughput(model, args.tokens, repeats=args.repeats, clock=args.clock)
    print(
        f"{args.size} {args.family} decoder layer, {args.device} {args.dtype}, threads={torch.get_num_threads()}"
    )
    print("| tokens per forward | ms | GFLOP | GFLOP/s | share of best |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tokens']} | {r['ms']:.2f} | {r['gflops']:.2f} | {r['gflop_s']:.1f} | {r['relative']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
