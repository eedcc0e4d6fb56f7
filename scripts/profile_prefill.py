"""Profile one prefill of the 7B-shaped LLaVA, unpruned vs a pruned setting (CUDA).

PYTHONPATH=. python scripts/profile_prefill.py '{"method": "fastervlm", "keep_ratio": 0.25}'
"""

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vtprune
from vtprune.speed import llava_7b_shaped
from vtprune.testing import llava_inputs


def main():
    setting = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"method": "fastervlm", "keep_ratio": 0.25}
    model = llava_7b_shaped()
    inputs = {k: v.cuda() for k, v in llava_inputs(model, text_lengths=(40,)).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    for label, wrapped in (("unpruned", False), (str(setting), True)):
        if wrapped:
            vtprune.wrap(model, dict(setting))
        with torch.inference_mode():
            for _ in range(3):
                model(**inputs, logits_to_keep=1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                start = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
        print(f"\n=== {label}: wall {wall * 1e3:.1f} ms")
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
        )
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60)
        )
        if wrapped:
            vtprune.unwrap(model)


if __name__ == "__main__":
    main()
