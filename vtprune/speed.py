"""Speed of pruning: prefill and generate timed pruned vs unpruned in one run (ratios, not absolute times),
the FLOPs-ideal speed-up beside the realised one, and the random models they run on (mid-size and 7B-shaped
LLaVA-1.5 and Qwen2-VL, 576 visual tokens each)."""

from __future__ import annotations

import functools
import inspect
import statistics
import time
from dataclasses import dataclass

import torch

from .api import get_pruner, unwrap, wrap
from .registry import get_family

__all__ = [
    "PrefillResult",
    "count_flops",
    "flop_counter",
    "format_table",
    "layer_throughput",
    "time_prefill",
    "time_generate",
    "prefill_speedups",
    "mid_llava",
    "llava_7b_shaped",
    "mid_qwen2_vl",
    "qwen2_vl_7b_shaped",
    "bench_model",
    "bench_inputs",
]


@dataclass
class PrefillResult:
    """One row of :func:`prefill_speedups`.

    Attributes:
        label: the setting (``"unpruned"`` for the baseline).
        visual_tokens: mean over decoder layers of the visual tokens a layer processed (sample 0).
        prompt_tokens: tokens the language model received (sample 0).
        median_s: median seconds of one prefill (vision encoder + LLM, ``logits_to_keep=1``).
        speedup: realised prefill speed-up, the baseline's median over this one.
        flops: FLOPs of one prefill counted by ``torch.utils.flop_counter.FlopCounterMode`` (vision encoder,
            probe, LLM and the kept logits; CPU SDPA included, see :func:`count_flops`), or None.
        ideal: the FLOPs-ideal speed-up, the baseline's ``flops`` over this one (None without ``flops``).
        llm_flops_ratio: the language model's FLOPs against the unpruned one in FastV's convention
            (:mod:`vtprune.eval.flops`, the eval summary's ``flops_ratio``; vision encoder not counted).
        ideal_timed_encoder: the ideal speed-up when the vision encoder's *measured* time is fixed and only
            the rest of the prefill (the LLM, the probe, the logits) shrinks with its FLOPs: the FLOPs-ideal
            speed-up assumes the encoder runs at the LLM's FLOP/s, which a ViT over thousands of patches may
            not (None without ``flops``).
    """

    label: str
    visual_tokens: float
    prompt_tokens: int
    median_s: float
    speedup: float
    flops: float | None = None
    ideal: float | None = None
    llm_flops_ratio: float | None = None
    ideal_timed_encoder: float | None = None
    encoder: dict | None = None  # unpruned row: the encoder's median_s, time_share and flops_share

    @property
    def realised_vs_ideal(self) -> float | None:
        """Realised over FLOPs-ideal speed-up (1.0: the wall clock fell as much as the FLOPs)."""
        return None if self.ideal is None else self.speedup / self.ideal


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _prefill(model, inputs: dict):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def _time_once(model, inputs: dict, clock, run=_prefill) -> float:
    _sync(model.device)
    start = clock()
    run(model, inputs)
    _sync(model.device)
    return clock() - start


def _encode(model, inputs: dict):
    """The vision encoder alone (and its projector), as the model's prefill runs it: the model's own
    ``get_image_features`` (and ``get_video_features``...: every modality the family prunes whose input is
    given) with the inputs it takes (pixel values, grids, image sizes)."""
    base = get_family(model).base_model
    out = None
    for modality in get_family(model).modalities():
        if inputs.get(modality.pixels) is None:
            continue
        encode = getattr(base, modality.encoder)
        names = inspect.signature(encode).parameters
        out = encode(**{k: v for k, v in inputs.items() if k in names and k != "input_ids"})
    return out


def time_prefill(model, inputs: dict, repeats: int = 5, warmup: int = 1, clock: str = "wall") -> float:
    """Median seconds of one prefill (vision encoder + LLM forward, no decoding) over ``repeats``.

    ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: this process's CPU
    time, steadier than the wall clock on a CPU shared with other jobs; single-threaded runs only)."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            elapsed = _time_once(model, inputs, CLOCKS[clock])
            if i >= warmup:
                times.append(elapsed)
    return statistics.median(times)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """A ``FlopCounterMode`` that also counts CPU SDPA: torch's registry has formulas for the CUDA fused
    attention ops but none for ``aten._scaled_dot_product_flash_attention_for_cpu``, which ``F.scaled_dot_
    product_attention`` calls on CPU (without it, attention is missing from CPU counts). Its formula is the
    CUDA flash op's: ``4 * B * H * Q * K * D`` (both products over the full matrix, masks ignored)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(model, inputs: dict) -> float:
    """FLOPs of one prefill (vision encoder, probe, language model, kept logits) as counted by
    :func:`flop_counter`. Triton kernels are not seen by the counter (GPU only; the probe's torch twin is)."""
    with torch.inference_mode(), flop_counter() as counter:
        _prefill(model, inputs)
    return float(counter.get_total_flops())


def _label(setting: dict | list) -> str:
    if isinstance(setting, list):  # composed methods
        return " + ".join(_label(part) for part in setting)
    return " ".join(
        [setting["method"]]
        + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items() if k != "method"]
    )


def _copy(setting: dict | list):
    """A fresh config dict (or list of them, composed) for ``wrap``."""
    return [dict(p) for p in setting] if isinstance(setting, list) else dict(setting)


def _llm_flops(model, text_tokens: int, layer_visual: list) -> float:
    from .eval.flops import prefill_flops

    dims = get_family(model).text_dims()
    return prefill_flops(text_tokens, list(layer_visual), dims.hidden, dims.intermediate, dims.gated)


def prefill_speedups(
    model, inputs: dict, settings, repeats: int = 5, *, clock: str = "wall", flops: bool = True
) -> list[PrefillResult]:
    """Time the unpruned model and each setting (a config dict such as ``{"method": "fastervlm",
    "keep_ratio": 0.25}``) in one run, interleaved: every repeat times the unpruned model and then each
    setting once (a slower or faster stretch of a shared machine hits all of them alike); medians.

    Each setting is wrapped and run once untimed first (its selection gives ``visual_tokens``, the mean over
    decoder layers of the visual tokens a layer processes), and, with ``flops``, counted once under
    :func:`flop_counter`: ``ideal`` is then the FLOPs-ideal speed-up and ``realised_vs_ideal`` the share of it
    the wall clock (or ``clock="cpu"``: CPU time) realised."""
    family = get_family(model)
    n_visual = sum(int((inputs["input_ids"][0] == m.token_id).sum()) for m in family.modalities())
    n_prompt = (
        int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else inputs["input_ids"].shape[1]
    )
    n_layers = len(family.decoder_layers)
    llm_full = _llm_flops(model, n_prompt - n_visual, [n_visual] * n_layers)
    settings = [[dict(p) for p in s] if isinstance(s, list) else dict(s) for s in settings]
    rows = [PrefillResult("unpruned", float(n_visual), n_prompt, 0.0, 1.0, llm_flops_ratio=1.0)]
    encoder_flops = None
    with torch.inference_mode():
        _prefill(model, inputs)  # warm-up
        if flops:
            rows[0].flops = count_flops(model, inputs)
            _encode(model, inputs)
            with flop_counter() as counter:
                _encode(model, inputs)
            encoder_flops = counter.get_total_flops()
        for setting in settings:
            wrap(model, _copy(setting))
            try:
                _prefill(model, inputs)  # warm-up; its selection describes the setting
                sel = get_pruner(model).last[0]
                if flops:
                    flop_count = count_flops(model, inputs)
            finally:
                unwrap(model)
            mean_visual = sum(sel.layer_visual) / len(sel.layer_visual)
            llm = _llm_flops(model, sel.tokens_out - sel.visual_out, sel.layer_visual)
            row = PrefillResult(_label(setting), round(mean_visual, 1), sel.tokens_out, 0.0, 0.0)
            row.llm_flops_ratio = llm / llm_full if llm_full else 1.0
            if flops:
                row.flops = flop_count
            rows.append(row)
    times: list[list[float]] = [[] for _ in rows]
    encoder_times: list[float] = []
    with torch.inference_mode():
        for _ in range(repeats):
            for i, setting in enumerate([None, *settings]):
                if setting is not None:
                    wrap(model, _copy(setting))
                try:
                    times[i].append(_time_once(model, inputs, CLOCKS[clock]))
                finally:
                    if setting is not None:
                        unwrap(model)
            if encoder_flops is not None:
                encoder_times.append(_time_once(model, inputs, CLOCKS[clock], _encode))
    base = statistics.median(times[0])
    for row, ts in zip(rows, times):
        row.median_s = statistics.median(ts)
        row.speedup = base / row.median_s
        if row.flops:
            row.ideal = rows[0].flops / row.flops
            encoder = statistics.median(encoder_times)
            rest = (row.flops - encoder_flops) / (rows[0].flops - encoder_flops)
            row.ideal_timed_encoder = base / (encoder + (base - encoder) * rest)
    if encoder_flops is not None:
        rows[0].encoder = {  # the unpruned encoder's share of the prefill: time vs FLOPs
            "median_s": statistics.median(encoder_times),
            "time_share": statistics.median(encoder_times) / base,
            "flops_share": encoder_flops / rows[0].flops,
        }
    return rows


def layer_throughput(model, token_counts, repeats: int = 5, clock: str = "wall") -> list[dict]:
    """Throughput of one decoder layer of ``model``'s language model against the tokens per forward.

    Runs decoder layer 0 alone (batch 1, a causal prefill of ``n`` random hidden states, no cache) for each
    ``n`` in ``token_counts``; FLOPs are counted by :func:`flop_counter`. Rows: ``tokens``, ``ms`` (median),
    ``gflops`` (per forward), ``gflop_s``, and ``relative`` (throughput over the best one measured): the
    share of the FLOPs ratio a pruned forward can realise at that size, since weights are read whatever the
    token count."""
    family = get_family(model)
    layer = family.decoder_layers[0]
    lm = family.language_model
    dims = family.text_dims()
    param = next(layer.parameters())
    rows = []
    with torch.inference_mode():
        for n in token_counts:
            hidden = torch.randn(1, n, dims.hidden, device=param.device, dtype=param.dtype)
            position_ids = torch.arange(n, device=param.device)[None]
            if getattr(lm.config, "model_type", "") in ("qwen2_vl", "qwen2_vl_text"):
                position_ids = position_ids.expand(3, 1, n)
            embeddings = lm.rotary_emb(hidden, position_ids)
            mask = torch.ones(n, n, dtype=torch.bool, device=param.device).tril()[None, None]

            run = functools.partial(
                layer, hidden, attention_mask=mask, position_embeddings=embeddings, position_ids=position_ids
            )
            run()
            with flop_counter() as counter:
                run()
            times = []
            for _ in range(repeats):
                _sync(param.device)
                start = CLOCKS[clock]()
                run()
                _sync(param.device)
                times.append(CLOCKS[clock]() - start)
            ms = 1e3 * statistics.median(times)
            gflops = counter.get_total_flops() / 1e9
            rows.append({"tokens": n, "ms": ms, "gflops": gflops, "gflop_s": gflops / ms * 1e3})
    best = max(r["gflop_s"] for r in rows)
    for r in rows:
        r["relative"] = r["gflop_s"] / best
    return rows


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


def qwen2_vl_model(
    *,
    vision_depth: int,
    vision_dim: int,
    vision_heads: int,
    text_hidden: int,
    text_layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int,
    mrope_section: tuple[int, int, int],
    attn_implementation: str = "sdpa",
    seed: int = 0,
    device=None,
    dtype=None,
):
    """A random ``Qwen2VLForConditionalGeneration`` (14-px patches, 2x2 merge), built on ``device`` in ``dtype``.

    Token ids follow :mod:`vtprune.testing.qwen2_vl` (so :func:`vtprune.testing.qwen_vl_inputs` fits)."""
    import transformers as tf

    from .testing import BOS, PAD
    from .testing.qwen2_vl import QWEN_IMAGE, QWEN_VEND, QWEN_VSTART

    text = dict(
        hidden_size=text_hidden,
        intermediate_size=intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section)},
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    vision = dict(
        depth=vision_depth,
        embed_dim=vision_dim,
        hidden_size=text_hidden,
        num_heads=vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        mlp_ratio=4,
    )
    config = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=QWEN_IMAGE,
        vision_start_token_id=QWEN_VSTART,
        vision_end_token_id=QWEN_VEND,
    )
    from .testing import instantiate

    return instantiate(
        tf.Qwen2VLForConditionalGeneration,
        config,
        attn_implementation=attn_implementation,
        seed=seed,
        device=device,
        dtype=dtype,
    )


def mid_qwen2_vl(device="cpu", dtype=torch.float32):
    """A mid-size random Qwen2-VL: 6-block 256-d ViT (8 heads), 16-layer 768-d text model; one 672x672 image is
    a 48x48 patch grid = 576 merged visual tokens (see :func:`bench_inputs`)."""
    return qwen2_vl_model(
        vision_depth=6,
        vision_dim=256,
        vision_heads=8,
        text_hidden=768,
        text_layers=16,
        heads=8,
        kv_heads=4,
        intermediate=2048,
        vocab_size=4096,
        mrope_section=(16, 16, 16),
        device=device,
        dtype=dtype,
    )


def qwen2_vl_7b_shaped(device="cuda", dtype=torch.bfloat16):
    """Random weights in Qwen2-VL-7B's shapes: 32-block 1280-d ViT (16 heads) and a 28-layer 3584-d text model
    (28 heads, 4 KV heads). Built directly on ``device`` in ``dtype``."""
    return qwen2_vl_model(
        vision_depth=32,
        vision_dim=1280,
        vision_heads=16,
        text_hidden=3584,
        text_layers=28,
        heads=28,
        kv_heads=4,
        intermediate=18944,
        vocab_size=152064,
        mrope_section=(16, 24, 24),
        device=device,
        dtype=dtype,
    )


FAMILIES = ("llava", "qwen2_vl")
QWEN_GRID = (1, 48, 48)  # a 672x672 image in 14-px patches: 2304 patches, 576 merged tokens


def bench_model(family: str = "llava", size: str = "mid", device="cpu", dtype=torch.float32):
    """The benchmark model of ``family`` (``"llava"`` / ``"qwen2_vl"``) at ``size`` (``"mid"`` / ``"7b"``)."""
    builders = {
        ("llava", "mid"): mid_llava,
        ("llava", "7b"): llava_7b_shaped,
        ("qwen2_vl", "mid"): mid_qwen2_vl,
        ("qwen2_vl", "7b"): qwen2_vl_7b_shaped,
    }
    if (family, size) not in builders:
        raise ValueError(f"no benchmark model for family={family!r} size={size!r}; families: {FAMILIES}")
    return builders[family, size](device=device, dtype=dtype)


def bench_inputs(model, batch: int = 1, text_tokens: int = 40, device="cpu", dtype=None) -> dict:
    """A batch of ``batch`` identical-length prompts, one image each (576 visual tokens on both families)."""
    from .testing import llava_inputs, qwen_vl_inputs

    if model.config.model_type == "llava":
        inputs = llava_inputs(model, text_lengths=(text_tokens,) * batch)
    else:
        inputs = qwen_vl_inputs(model, grids=(QWEN_GRID,) * batch, text_lengths=(text_tokens,) * batch)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


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
    """Markdown table: realised speed-up beside the FLOPs-ideal one and their ratio."""
    lines = [
        "| setting | visual tokens / layer | LLM input tokens | prefill median (ms) | GFLOPs (counted) "
        "| realised speed-up | ideal speed-up (FLOPs) | realised / ideal | ideal, encoder timed "
        "| realised / that | LLM FLOPs ratio (FastV) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gflops = "" if r.flops is None else f"{r.flops / 1e9:.1f}"
        ideal = "" if r.ideal is None else f"{r.ideal:.2f}x"
        ratio = "" if r.realised_vs_ideal is None else f"{r.realised_vs_ideal:.2f}"
        llm = "" if r.llm_flops_ratio is None else f"{r.llm_flops_ratio:.2f}"
        timed = "" if r.ideal_timed_encoder is None else f"{r.ideal_timed_encoder:.2f}x"
        timed_ratio = "" if r.ideal_timed_encoder is None else f"{r.speedup / r.ideal_timed_encoder:.2f}"
        lines.append(
            f"| {r.label} | {r.visual_tokens:g} | {r.prompt_tokens} | {r.median_s * 1e3:.1f} | {gflops} "
            f"| {r.speedup:.2f}x | {ideal} | {ratio} | {timed} | {timed_ratio} | {llm} |"
        )
    encoder = results[0].encoder if results else None
    if encoder:
        lines.append(
            f"\nvision encoder (unpruned): {encoder['median_s'] * 1e3:.1f} ms, {encoder['time_share']:.0%} of "
            f"the prefill's time for {encoder['flops_share']:.0%} of its FLOPs"
        )
    return "\n".join(lines)
