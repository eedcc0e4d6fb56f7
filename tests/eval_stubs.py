"""A stub benchmark and answerer over a tiny random LLaVA, for harness tests (no processor needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtprune.eval.harness import timed_generate
from vtprune.testing import BOS, IMAGE_TOKEN, _left_pad


@dataclass
class StubSample:
    id: str
    prompt: str
    target: str
    images: list = field(default_factory=list)
    seed: int = 0


class StubBenchmark:
    name = "stub"
    protocol = {"prompt": "random tokens", "metric": "exact match of the first generated token"}
    generation_kwargs = {"max_new_tokens": 2}

    def __init__(self, n=10):
        self.samples = [StubSample(id=f"q{i}", prompt="", target=str(i % 7), seed=i) for i in range(n)]

    def score_sample(self, sample, prediction):
        return {"target": sample.target, "correct": float(prediction.split()[0] == sample.target)}

    def aggregate(self, records):
        return {"accuracy": sum(r["correct"] for r in records) / len(records)}


class StubAnswerer:
    """Builds each sample's row from its own seed (so batch composition does not change inputs)."""

    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, samples, model, generation_kwargs=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        vision = model.config.vision_config
        n_patches = (vision.image_size // vision.patch_size) ** 2
        rows, pixels = [], []
        for s in samples:
            g = torch.Generator().manual_seed(s.seed)
            text = torch.randint(4, model.config.text_config.vocab_size, (3 + s.seed % 4,), generator=g)
            rows.append(torch.cat([torch.tensor([BOS]), torch.full((n_patches,), IMAGE_TOKEN), text]))
            pixels.append(torch.randn(3, vision.image_size, vision.image_size, generator=g))
        inputs = _left_pad(rows) | {"pixel_values": torch.stack(pixels)}
        new, stats = timed_generate(model, inputs, do_sample=False, **(generation_kwargs or {}))
        predictions = [" ".join(str(t % 7) for t in row.tolist()) for row in new]
        mask = inputs["attention_mask"]
        visual = ((inputs["input_ids"] == IMAGE_TOKEN) & mask.bool()).sum(-1).tolist()
        stats["prompt"] = [{"text": int(r) - v, "visual": v} for r, v in zip(mask.sum(-1).tolist(), visual)]
        return predictions, stats
