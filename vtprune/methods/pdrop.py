"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", arXiv 2410.17247; code: github.com/Cooperx521/PyramidDrop).

The decoder is split into stages at ``layers``; each stage keeps ``ratio`` (the paper's lambda) of the visual
tokens the stage before it kept, ranked by the attention the last instruction token pays them. With the
paper's LLaVA-1.5-7B setting (32 layers, stages starting at layers 8, 16, 24, lambda 0.5), layers 0-7 see
all 576 visual tokens, 8-15 see 288, 16-23 see 144 and 24-31 see 72.

It runs on :class:`~vtprune.methods.schedule.SchedulePlan` (``rank="last"``): the per-layer counts are a
schedule, and the ranking at each drop is the last prompt token's attention read by the registered probe
(``"last"``: one query row, no eager attention maps).

``layers`` are the first decoder layer (0-based) of each new stage, i.e. the authors' ``layer_list``
(``rank_layer = layer_idx + 1``: the drop happens after layer ``l - 1``). Give them as integer layer indices
(``[8, 16, 24]``), or as fractions of the depth in (0, 1) (``[0.25, 0.5, 0.75]``, the default: the paper's
layers on a 32-layer LLM, and the same split on a model of any depth). A fraction ``f`` on a model of ``L``
layers means layer ``floor(f * L + 0.5)``; the resolved layers must be strictly increasing and within
``1..L-1`` (refused at wrap time otherwise, with the resolved values).

Choices and deviations from the authors' code (``llava/model/modeling_llama_pdrop.py``):

* **which attention ranks**: the authors rank the tokens entering layer ``l`` with layer ``l``'s own query
  and key projections applied to layer ``l - 1``'s output (a manual attention computation before the layer
  runs). Here the ranking is layer ``l - 1``'s attention (the last layer that processed the stage's tokens),
  read by the probe while that layer runs - FastV's convention, and the engine's (a plan decides after a
  layer); no extra projection, and no per-family rotary code.
* **counts**: stage ``s`` keeps ``keep_count(n, ratio ** s)`` of the ``n`` visual tokens at the LLM input
  (round half up, at least 1, as every method here); the authors truncate (``int(n * ratio ** s)``). Equal on
  576 tokens at lambda 0.5 (288 / 144 / 72).
* **positions**: kept tokens keep their original rotary positions (the in-LLM engine's rule); the
  authors renumber the shorter sequence contiguously after each drop.
* **batches**: left padding and per-sample counts are handled by the engine; the authors loop per sample
  with right padding and one image per sample. Here all visual tokens of a sample (several images
  included) are ranked together.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import PruneConfig, check_ratio
from ..errors import UsageError
from ..registry import register_method
from ..runtime.parts import MethodParts
from .schedule import SchedulePlan

__all__ = ["PDropConfig", "resolve_layers", "pdrop_keep"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class PDropConfig(PruneConfig):
    """Args:
    layers: the first decoder layer of each new stage: integer layer indices (``[8, 16, 24]``) or fractions
        of the depth in (0, 1) (default ``[0.25, 0.5, 0.75]``: the paper's 8 / 16 / 24 on 32 layers).
    ratio: the paper's lambda: each stage keeps this fraction of the visual tokens the stage before it kept
        (default 0.5).
    """

    method = "pdrop"

    layers: list = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])
    ratio: float = 0.5

    def validate(self) -> None:
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if isinstance(self.layers, (int, float)) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if not isinstance(self.layers, list) or not self.layers:
            raise UsageError(
                f"layers must be a non-empty list of layer indices ([8, 16, 24]) or depth fractions "
                f"([0.25, 0.5, 0.75]), got {self.layers!r}"
            )
        ints = [_is_int(v) for v in self.layers]
        if any(ints) and not all(ints):
            raise UsageError(
                f"layers mixes layer indices and depth fractions: {self.layers!r}; give all as integers "
                "([8, 16, 24]) or all as fractions in (0, 1) ([0.25, 0.5, 0.75])"
            )
        for i, value in enumerate(self.layers):
            if _is_int(value):
                if value < 1:
                    raise UsageError(
                        f"layers[{i}]={value}: a stage starts at decoder layer 1 or later (layer 0 sees every "
                        "visual token; compose with a pre-LLM method to prune before the LLM)"
                    )
            elif not isinstance(value, float) or not 0.0 < value < 1.0:
                raise UsageError(
                    f"layers[{i}]={value!r}: give an integer layer index, or a fraction of the depth strictly "
                    "between 0 and 1"
                )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise UsageError(f"layers must be strictly increasing, got {self.layers!r}")
        check_ratio("ratio (PyramidDrop's lambda)", self.ratio)


def resolve_layers(layers: list, num_layers: int) -> list[int]:
    """The stage-start layers of ``layers`` (indices or depth fractions) on a model of ``num_layers``
    decoder layers; refuses layers outside ``1..num_layers-1`` or that collide after rounding."""
    resolved = [v if _is_int(v) else math.floor(v * num_layers + 0.5) for v in layers]
    shown = f"layers={layers!r} resolve to {resolved} on this model's {num_layers} decoder layers"
    if any(not 1 <= v <= num_layers - 1 for v in resolved):
        raise UsageError(f"{shown}; each must be within 1..{num_layers - 1}")
    if any(b <= a for a, b in zip(resolved, resolved[1:])):
        raise UsageError(f"{shown}: two stages start at the same layer; give fewer or more spread layers")
    return resolved


def pdrop_keep(starts: list[int], ratio: float, num_layers: int) -> list[float]:
    """The per-layer schedule (fractions of the LLM-input visual tokens): ``ratio ** s`` in stage ``s``."""
    return [ratio ** sum(1 for start in starts if start <= layer) for layer in range(num_layers)]


@register_method(PDropConfig)
def _parts(config: PDropConfig, family) -> MethodParts:
    num_layers = len(family.decoder_layers)
    keep = pdrop_keep(resolve_layers(config.layers, num_layers), config.ratio, num_layers)
    return MethodParts(plan=SchedulePlan(keep, "ratio", "last", False, num_layers))
