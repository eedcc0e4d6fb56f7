"""Dynamic visual-token exit (DyVTE; Wu et al., 2024, "Accelerating Multimodal Large Language Models via
Dynamic Visual-Token Exit and the Empirical Findings").

Small hyper-networks (one per decoder layer) read the *text* tokens' state after a layer - the mean of the
text tokens that follow the image and the last token, concatenated - and decide whether the visual tokens
have stopped contributing. At the first layer whose gate says "exit", every visual token of that sample
leaves the LLM: later layers, and their KV caches, hold only text. The gates are trained on a calibration
set (:mod:`vtprune.tune.dyvte`): the label for (sample, layer) is 1 when removing the visual tokens after
that layer leaves the model's answer unchanged.

Deviations from the authors' code, all deliberate: the decision is taken once, at prefill (their decode
loop re-evaluates gates on single-token steps); labels compare greedy *generated* answers rather than
teacher-forced token accuracy and loss ratio; each gate is LayerNorm + a 2-layer MLP (width
``gate_hidden``), the LayerNorm because hidden-state scales grow with depth.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import PruneConfig, check_int, check_number
from ..errors import UsageError
from ..registry import register_method
from ..runtime.layer_drop import LayerPlan
from ..runtime.parts import MethodParts

__all__ = ["DyVTEConfig", "ExitGates", "text_state_features", "gates_folder", "GATES_DIRNAME"]

GATES_DIRNAME = "vtprune_dyvte"


@dataclasses.dataclass
class DyVTEConfig(PruneConfig):
    """Args:
    gates: folder with trained gates (``gates.safetensors`` + ``gates.json``); ``None`` looks for
        ``<model folder>/vtprune_dyvte`` (where ``vtprune train-dyvte`` saves them).
    threshold: exit when the gate's exit probability exceeds this (0.5 = the paper's argmax rule).
    min_layer: earliest layer allowed to exit after (layers below always see the visual tokens).
    """

    method = "dyvte"

    gates: str | None = None
    threshold: float = 0.5
    min_layer: int = 0

    def validate(self) -> None:
        if self.gates is not None and not isinstance(self.gates, (str, Path)):
            raise UsageError(f"gates must be a folder path or None, got {self.gates!r}")
        check_number("threshold", self.threshold, 0.0, 1.0, closed_low=False, closed_high=False)
        check_int("min_layer", self.min_layer, minimum=0)


class ExitGates(nn.Module):
    """One gate per decoder layer: ``(batch, 2 * hidden) -> (batch, 2)`` logits (keep, exit)."""

    def __init__(self, hidden_size: int, num_layers: int, gate_hidden: int = 64):
        super().__init__()
        self.hidden_size, self.num_layers, self.gate_hidden = hidden_size, num_layers, gate_hidden
        self.gates = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(2 * hidden_size),
                nn.Linear(2 * hidden_size, gate_hidden),
                nn.GELU(),
                nn.Linear(gate_hidden, 2),
            )
            for _ in range(num_layers)
        )

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.gates[layer](features.to(self.gates[layer][1].weight.dtype))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "gates.safetensors")
        meta = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "gate_hidden": self.gate_hidden,
        }
        (folder / "gates.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ExitGates:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "gates.json").is_file():
            raise FileNotFoundError(
                f"no DyVTE gates in {folder}; train them with `vtprune train-dyvte --model <model folder>` "
                "or pass DyVTEConfig(gates=<folder>)"
            )
        gates = cls(**json.loads((folder / "gates.json").read_text()))
        gates.load_state_dict(load_file(folder / "gates.safetensors"))
        return gates.eval()


def text_state_features(hidden: torch.Tensor, visual: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The gates' input: ``[mean of text tokens after the last visual token (last token excluded), last
    token]``, ``(batch, 2 * hidden)``. With no such text token the mean is the last token itself.

    Args:
        hidden: ``(batch, seq, hidden)``; visual, real: ``(batch, seq)`` bool.
    """
    seq = hidden.shape[1]
    pos = torch.arange(seq, device=hidden.device)
    last_visual = torch.where(visual, pos, -1).amax(-1, keepdim=True)  # (batch, 1); -1 when none
    after = real & (pos > last_visual) & (pos < seq - 1)
    weights = after.to(hidden.dtype)
    count = weights.sum(-1, keepdim=True)
    last = hidden[:, -1]
    mean = torch.where(count > 0, (weights[..., None] * hidden).sum(1) / count.clamp(min=1), last)
    return torch.cat([mean, last], dim=-1)


class DyVTEPlan(LayerPlan):
    def __init__(self, config: DyVTEConfig, num_layers: int, gates: ExitGates):
        if gates.num_layers != num_layers:
            raise UsageError(
                f"gates were trained for {gates.num_layers} decoder layers, the model has {num_layers}"
            )
        self.config, self.gates, self.num_layers = config, gates, num_layers
        self.exit_layer: torch.Tensor | None = None  # (batch,) layer after which visual tokens left; -1 none

    def reset(self) -> None:
        self.exit_layer = None

    @torch.no_grad()
    def decide(self, layer, hidden, visual, real, attention, counts):
        batch = hidden.shape[0]
        if self.exit_layer is None:
            self.exit_layer = torch.full((batch,), -1, dtype=torch.long)
        if layer < self.config.min_layer or layer >= self.num_layers - 1:
            return None
        pending = (self.exit_layer < 0) & torch.tensor([n > 0 for n in counts])
        if not pending.any():
            return None
        prob = self.gates(layer, text_state_features(hidden, visual, real)).float().softmax(-1)[:, 1].cpu()
        exits = pending & (prob > self.config.threshold)
        if not exits.any():
            return None
        self.exit_layer[exits] = layer
        kept = [0 if e else n for e, n in zip(exits.tolist(), counts)]
        return ~(visual & exits.to(visual.device)[:, None]), kept


def gates_folder(model) -> Path:
    """Where gates live beside a model loaded from a local folder (``<folder>/vtprune_dyvte``)."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not source or not Path(source).is_dir():
        raise UsageError(
            "DyVTE gates are looked up beside the model, but this model was not loaded from a local folder; "
            "pass gates=<folder saved by `vtprune train-dyvte`> (or out=<folder> when training)"
        )
    return Path(source) / GATES_DIRNAME


@register_method(DyVTEConfig)
def _parts(config: DyVTEConfig, family) -> MethodParts:
    model = family.model
    folder = config.gates if config.gates is not None else gates_folder(model)
    gates = ExitGates.load(folder).to(device=model.device)
    return MethodParts(plan=DyVTEPlan(config, len(family.decoder_layers), gates))
