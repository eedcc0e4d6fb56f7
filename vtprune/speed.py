"""Speed of pruning: prefill and generate timed pruned vs unpruned in one run (ratios, not absolute times),
and the mid-size / 7B-shaped random LLaVA models they run on."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .api import get_pruner, unwrap, wrap
from .registry import get_family

__all__ = [
    "PrefillResult",
    "time_prefill",
    "time_generate",
    "prefill_speedups",
    "mid_llava",
    "llava_7b_shaped",
]


@dataclass
class PrefillResult:
    label: str
    visual_tokens: int
    prompt_tokens: int
    median_s: float
    speedup: float


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, inputs: dict, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one prefill (vision encoder + LLM forward, no decoding) over ``repeats``."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            _sync(model.device)
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(model.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def prefill_speedups(model, inputs: dict, settings, repeats: int = 5) -> list[PrefillResult]:
    """Time the unpruned model, then each setting (a config dict such as ``{"method": "fastervlm",
    "keep_ratio": 0.25}``), in one run. ``visual_tokens`` is the mean over decoder layers of the visual
    tokens a layer processes (equal to the kept count for methods that prune before the LLM)."""
    n_visual = int((inputs["input_ids"][0] == get_family(model).image_token_id).sum())
    n_prompt = (
        int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else inputs["input_ids"].shape[1]
    )
    base = time_prefill(model, inputs, repeats)
    results = [PrefillResult("unpruned", n_visual, n_prompt, base, 1.0)]
    for setting in settings:
        wrap(model, dict(setting))
        try:
            t = time_prefill(model, inputs, repeats)
            sel = get_pruner(model).last[0]
        finally:
            unwrap(model)
        label = " ".join(
            [setting["method"]]
            + [
                f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in setting.items()
                if k != "method"
            ]
        )
        mean_visual = sum(sel.layer_visual) / len(sel.layer_visual)
        results.append(PrefillResult(label, round(mean_visual, 1), sel.tokens_out, t, base / t))
    return results


def mid_llava(device="cpu", dtype=torch.float32):
    """A mid-size random LLaVA-1.5-shaped model: 336px CLIP/14 (576 visual tokens), 16-layer 768-d Llama."""
    from .testing import tiny_llava

    model = tiny_llava(
        image_size=336,
        patch_size=14,
        vision_hidden=256,
        vision_layers=6,
        text_hidden=768,
        text_layers=16,
        heads=8,
        vocab_size=4096,
        intermediate=2048,
    )
    return model.to(device=device, dtype=dtype)


def llava_7b_shaped(device="cuda", dtype=torch.bfloat16):
    """Random weights in LLaVA-1.5-7B's shapes: CLIP ViT-L/14 at 336px (576 visual tokens, 24 layers) and a
    32-layer 4096-d Llama. Built directly on ``device`` in ``dtype`` (no CPU copy of 7B parameters)."""
    from .testing import tiny_llava

    return tiny_llava(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        projection_dim=768,
        text_hidden=4096,
        text_layers=32,
        heads=32,
        kv_heads=32,
        vocab_size=32064,
        intermediate=11008,
        device=device,
        dtype=dtype,
    )


def time_generate(model, inputs: dict, new_tokens: int, repeats: int = 3) -> float:
    """Median seconds of a greedy ``generate`` of exactly ``new_tokens`` tokens."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(model.device)
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(model.device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_table(results: list[PrefillResult]) -> str:
    lines = [
        "| setting | visual tokens / layer | LLM input tokens | prefill median (ms) | speed-up |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.label} | {r.visual_tokens} | {r.prompt_tokens} | {r.median_s * 1e3:.1f} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)
