"""CPU prefill speed-up of FasterVLM-style pruning on a mid-size random Qwen3-VL with one 16-frame video.

    OMP_NUM_THREADS=1 python scripts/bench_video_prefill.py --repeats 3

The video is 16 temporal patch groups (the frames the LLM sees, each behind its timestamp token) of 224x224:
14x14 patches = 49 merged tokens a frame, 784 visual tokens; 40 text tokens. Realised (CPU time of the
process, 1 thread) and FLOPs-ideal speed-ups from :func:`vtprune.speed.prefill_speedups`.
"""

from __future__ import annotations

import argparse
import json

import torch

from vtprune.speed import prefill_speedups
from vtprune.testing.qwen2_vl import qwen_vl_media_inputs
from vtprune.testing.qwen3_vl import mid_qwen3_vl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=14, help="patches per frame side (16-px patches)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--budget", default="frame", choices=["frame", "image"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = mid_qwen3_vl()
    inputs = qwen_vl_media_inputs(
        model, samples=((("video", (args.frames, args.side, args.side)),),), text_lengths=(40,)
    )
    settings = [{"method": "fastervlm", "keep_ratio": r, "budget": args.budget} for r in args.ratios]
    rows = prefill_speedups(model, inputs, settings, repeats=args.repeats, clock=args.clock)
    for row in rows:
        print(
            json.dumps(
                {
                    "setting": row.label,
                    "visual_tokens": row.visual_tokens,
                    "prompt_tokens": row.prompt_tokens,
                    "median_s": round(row.median_s, 3),
                    "speedup": round(row.speedup, 2),
                    "ideal": None if row.ideal is None else round(row.ideal, 2),
                    "ideal_timed_encoder": None
                    if row.ideal_timed_encoder is None
                    else round(row.ideal_timed_encoder, 2),
                    "gflops": None if row.flops is None else round(row.flops / 1e9, 1),
                    "encoder": row.encoder,
                }
            )
        )


if __name__ == "__main__":
    main()
