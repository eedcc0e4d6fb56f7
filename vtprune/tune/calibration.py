"""Calibration data for schedule searches, and the objective a search scores a schedule with.

A :class:`CalibrationSet` is a list of processor batches (left-padded), optionally with the benchmark
samples they came from (targets) and the benchmark that scores answers. :class:`ScheduleObjective` wraps a
model with each candidate schedule and scores it on that set:

* ``"accuracy"`` - the benchmark's main metric of the greedy answers (needs targets);
* ``"agreement"`` - label-free *loyalty*: the fraction of samples whose greedy answer (up to the first
  end-of-sequence token) is the unpruned model's;
* ``"kl"`` - label-free: minus the mean KL divergence ``KL(unpruned || pruned)`` of the first answer
  token's distribution (a prefill only, no decoding); the threshold is ``-tolerance``.

The vision encoder runs once per calibration batch (its features are passed back as ``mm_encoder_outputs``
on every trial) and the unpruned answers / distributions are computed once; a trial runs only the language
model.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json

import torch

from ..api import unwrap, wrap
from ..errors import UsageError
from ..methods.schedule import ScheduleConfig
from ..registry import get_family
from .search import FlopsCost

__all__ = [
    "CalibrationSet",
    "ScheduleObjective",
    "OBJECTIVES",
    "toy_calibration",
    "benchmark_calibration",
    "random_calibration",
]

OBJECTIVES = ("accuracy", "agreement", "kl")


@dataclasses.dataclass
class CalibrationSet:
    """Attributes:
    batches: processor outputs (dicts of tensors), left-padded.
    samples: the benchmark samples behind the batches, in order (needed by the accuracy objective).
    benchmark: a :class:`vtprune.eval.benchmarks.Benchmark` that scores predictions of ``samples``.
    tokenizer: decodes generated answers (accuracy).
    description: where the data came from (written to the search summary).
    """

    batches: list[dict]
    samples: list | None = None
    benchmark: object | None = None
    tokenizer: object | None = None
    description: str = ""

    def __len__(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)


def _batches(processor, images_per_sample, texts, batch_size):
    out = []
    for i in range(0, len(texts), batch_size):
        imgs = [img for sample in images_per_sample[i : i + batch_size] for img in sample]
        enc = processor(
            images=imgs or None, text=texts[i : i + batch_size], return_tensors="pt", padding=True
        )
        out.append(dict(enc))
    return out


def toy_calibration(processor, samples: int = 512, images: int = 400, batch_size: int = 32) -> CalibrationSet:
    """Questions on train-split scenes the toy model was *not* trained on (those after the ones its training
    used), as ``vtprune train-dyvte`` calibrates; scored as the synthetic benchmark scores its test split."""
    from ..eval.benchmarks import Sample, Synthetic
    from ..toy import TOY_MODEL_DIR, build_prompt
    from ..toy.synthetic import generate

    seen = json.loads((TOY_MODEL_DIR / "training.json").read_text())["train_images"]
    rows = [
        (image, qtype, q, a)
        for _, image, qas in itertools.islice(generate("train", seen + images), seen, None)
        for qtype, q, a in qas
    ][:samples]
    if not rows:
        raise UsageError("no calibration questions: raise --images")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    items = [
        Sample(
            id=f"cal{i}",
            images=[r[0]],
            prompt=r[2],
            target=r[3],
            meta={"question": r[2], "question_type": r[1]},
        )
        for i, r in enumerate(rows)
    ]
    batches = _batches(
        processor, [s.images for s in items], [build_prompt(s.prompt) for s in items], batch_size
    )
    return CalibrationSet(
        batches,
        items,
        Synthetic(),
        tokenizer,
        f"toy: {len(items)} questions on train-split scenes {seen}.. (not seen in training)",
    )


def benchmark_calibration(
    benchmark: str,
    processor,
    prompt_fn,
    samples: int = 256,
    batch_size: int = 8,
    source: str | None = None,
) -> CalibrationSet:
    """The first ``samples`` of a benchmark the eval harness loads (``source``: a local folder mirroring the
    hub repository). ``prompt_fn(processor, prompt, num_images)`` as :func:`vtprune.eval.models.load_model`
    returns it."""
    from ..eval.benchmarks import get_benchmark

    bench = get_benchmark(benchmark)
    items = list(bench.load(source=source, limit=samples))
    if not items:
        raise UsageError(f"benchmark {benchmark!r} gave no samples")
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    texts = [prompt_fn(processor, s.prompt, len(s.images)) for s in items]
    batches = _batches(processor, [list(s.images) for s in items], texts, batch_size)
    return CalibrationSet(batches, items, bench, tokenizer, f"{benchmark}: first {len(items)} samples")


def random_calibration(model, samples: int = 8, text_tokens: int = 40, batch_size: int = 4, seed: int = 0):
    """Random images and prompts (``vtprune.testing.llava_inputs``) for random-weight LLaVA models: label-free
    objectives only."""
    from ..testing import llava_inputs

    batches = [
        llava_inputs(model, text_lengths=(text_tokens,) * min(batch_size, samples - i), seed=seed + i)
        for i in range(0, samples, batch_size)
    ]
    return CalibrationSet(batches, description=f"random: {samples} prompts of {text_tokens} text tokens")


class ScheduleObjective:
    """``objective(values, unit) -> score`` of a schedule on a calibration set (higher is better).

    Args:
        model: the (unwrapped) VLM.
        calibration: the data.
        objective: one of :data:`OBJECTIVES`.
        max_new_tokens: answer length for ``"accuracy"`` / ``"agreement"`` (default: the benchmark's, else 4).
        rank, reuse_order: the schedule plan's ranking options (:class:`~vtprune.methods.schedule.ScheduleConfig`).
    """

    def __init__(
        self,
        model,
        calibration: CalibrationSet,
        objective: str = "agreement",
        max_new_tokens: int | None = None,
        rank: str = "text",
        reuse_order: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "accuracy" and (calibration.samples is None or calibration.benchmark is None):
            raise UsageError(
                "the accuracy objective needs labelled calibration data (a benchmark); use the label-free "
                "'agreement' or 'kl' objective"
            )
        if not calibration.batches:
            raise UsageError("the calibration set is empty")
        self.model, self.calibration, self.objective = model, calibration, objective
        self.rank, self.reuse_order = rank, reuse_order
        self.family = get_family(model)
        self.num_layers = len(self.family.decoder_layers)
        generation = dict(getattr(calibration.benchmark, "generation_kwargs", None) or {})
        self.max_new_tokens = max_new_tokens or generation.get("max_new_tokens") or 4
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.encoder_calls = 0
        self.batches = [self._prepare(b) for b in calibration.batches]
        self.visual_tokens, self.text_tokens = [], []
        for b in self.batches:
            image = (b["input_ids"] == self.family.image_token_id) & b["attention_mask"].bool()
            self.visual_tokens += image.sum(-1).tolist()
            self.text_tokens += (b["attention_mask"].sum(-1) - image.sum(-1)).tolist()
        self.reference = [self._run(b) for b in self.batches]
        self.baseline = self._score(self.reference)

    # ------------------------------------------------------------------------------------ preparation
    @torch.no_grad()
    def _prepare(self, batch: dict) -> dict:
        device = self.model.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        if batch.get("pixel_values") is None:
            raise UsageError("calibration batches need images (pixel_values)")
        encode = self.family.base_model.get_image_features
        params = inspect.signature(encode).parameters
        kwargs = {k: batch[k] for k in params if k != "kwargs" and batch.get(k) is not None}
        if "pixel_values" in batch and batch["pixel_values"].dtype.is_floating_point:
            kwargs["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        features = encode(**kwargs, return_dict=True)
        self.encoder_calls += 1
        batch.pop("pixel_values")
        batch["mm_encoder_outputs"] = {"image": features}
        return batch

    def cost(self, unit: str) -> FlopsCost:
        dims = self.family.text_dims()
        return FlopsCost(
            tuple(self.text_tokens),
            tuple(self.visual_tokens),
            dims.hidden,
            dims.intermediate,
            dims.gated,
            unit,
        )

    # -------------------------------------------------------------------------------------- running
    @torch.inference_mode()
    def _run(self, batch: dict):
        if self.objective == "kl":
            logits = self.model(**batch, use_cache=True, logits_to_keep=1).logits[:, -1]
            return logits.float().log_softmax(-1).cpu()
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False)
        return out[:, batch["input_ids"].shape[1] :].cpu()

    def _answer(self, tokens: list[int]) -> list[int]:
        cut = next((i + 1 for i, t in enumerate(tokens) if t in self.eos), len(tokens))
        return tokens[:cut]

    def _score(self, outputs: list) -> float:
        if self.objective == "kl":
            kl = [
                (torch.exp(ref) * (ref - got)).sum(-1) for ref, got in zip(self.reference, outputs)
            ]  # KL(ref || got) per sample
            return -float(torch.cat(kl).mean())
        if self.objective == "agreement":
            same = [
                self._answer(a) == self._answer(b)
                for ref, got in zip(self.reference, outputs)
                for a, b in zip(ref.tolist(), got.tolist())
            ]
            return sum(same) / len(same)
        tokenizer, bench = self.calibration.tokenizer, self.calibration.benchmark
        predictions = [
            t.strip() for out in outputs for t in tokenizer.batch_decode(out, skip_special_tokens=True)
        ]
        records = [bench.score_sample(s, p) for s, p in zip(self.calibration.samples, predictions)]
        return float(bench.aggregate(records)[bench.main_metric])

    def __call__(self, values: list, unit: str) -> float:
        config = ScheduleConfig(keep=list(values), unit=unit, rank=self.rank, reuse_order=self.reuse_order)
        wrap(self.model, config)
        try:
            outputs = [self._run(b) for b in self.batches]
        finally:
            unwrap(self.model)
        return self._score(outputs)

    def threshold(self, tolerance: float) -> float:
        """The score a schedule must reach: the unpruned score minus ``tolerance`` (``-tolerance`` for KL)."""
        return -tolerance if self.objective == "kl" else self.baseline - tolerance
