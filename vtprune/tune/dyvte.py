"""Train DyVTE's exit gates on a calibration set.

For every calibration sample and every candidate layer ``l`` the label says whether removing all visual
tokens after layer ``l`` (the static exit at ``l + 1``) leaves the model's greedy answer unchanged. The
gate of layer ``l`` learns to predict that label from the text tokens' state after layer ``l`` in the
unpruned model (:func:`vtprune.methods.dyvte.text_state_features`). Gates are saved beside the model
(``<model folder>/vtprune_dyvte``) and loaded by ``vtprune.wrap(model, "dyvte")``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import unwrap, wrap
from ..methods.dyvte import ExitGates, gates_folder, text_state_features
from ..registry import get_family

__all__ = ["ExitData", "collect_exit_data", "train_gates", "train_dyvte"]


@dataclass
class ExitData:
    features: torch.Tensor  # (samples, layers, 2 * hidden)
    labels: torch.Tensor  # (samples, layers) 1 = exiting after this layer keeps the answer


def _greedy(model, inputs, max_new_tokens) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _same_answers(a: torch.Tensor, b: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """Per row: equal up to (and including) the first end-of-sequence token."""
    same = []
    for x, y in zip(a.tolist(), b.tolist()):
        cut = lambda s: s[: next((i + 1 for i, t in enumerate(s) if t in eos), len(s))]  # noqa: E731
        same.append(cut(x) == cut(y))
    return torch.tensor(same)


@torch.no_grad()
def collect_exit_data(model, batches: Iterable[dict], max_new_tokens: int = 4) -> ExitData:
    """Features of the unpruned model and exit labels, for every sample of ``batches`` (processor outputs)."""
    family = get_family(model)
    layers = len(family.decoder_layers)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    image_token = family.image_token_id
    all_feats, all_labels = [], []
    for inputs in batches:
        base = _greedy(model, inputs, max_new_tokens)
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # (layers + 1) x (B, L, D)
        visual = inputs["input_ids"] == image_token
        real = inputs.get("attention_mask", torch.ones_like(visual)).bool()
        feats = torch.stack([text_state_features(hidden[i + 1], visual, real) for i in range(layers)], 1)
        labels = torch.zeros(visual.shape[0], layers, dtype=torch.long)
        for layer in range(layers - 1):
            wrap(model, "static_exit", layer=layer + 1)
            try:
                labels[:, layer] = _same_answers(_greedy(model, inputs, max_new_tokens), base, eos).long()
            finally:
                unwrap(model)
        all_feats.append(feats.float().cpu())
        all_labels.append(labels)
    return ExitData(torch.cat(all_feats), torch.cat(all_labels))


def train_gates(
    data: ExitData, gate_hidden: int = 64, epochs: int = 200, lr: float = 1e-2, seed: int = 0
) -> tuple[ExitGates, dict]:
    """Fit one gate per layer with cross-entropy (the last layer has no gate to train: nothing follows)."""
    torch.manual_seed(seed)
    samples, layers, dim = data.features.shape
    gates = ExitGates(dim // 2, layers, gate_hidden)
    report = {"samples": samples, "layers": {}}
    for layer in range(layers - 1):
        x, y = data.features[:, layer], data.labels[:, layer]
        gate = gates.gates[layer]
        opt = torch.optim.Adam(gate.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(gate(x), y)
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (gate(x).argmax(-1) == y).float().mean().item()
        report["layers"][layer] = {
            "exit_rate": y.float().mean().item(),
            "train_accuracy": acc,
            "loss": loss.item(),
        }
    return gates.eval(), report


def train_dyvte(
    model, batches: Iterable[dict], out: str | Path | None = None, max_new_tokens: int = 4, **train_kwargs
) -> tuple[Path, dict]:
    """Collect labels, train the gates, save them (default: beside the model) with a JSON report."""
    if out is None:
        out = gates_folder(model)
    start = time.process_time()
    data = collect_exit_data(model, batches, max_new_tokens)
    gates, report = train_gates(data, **train_kwargs)
    report["cpu_seconds"] = time.process_time() - start
    folder = gates.save(out)
    (Path(folder) / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(folder), report
