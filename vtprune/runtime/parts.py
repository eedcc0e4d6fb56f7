"""What a method contributes to the runtime: parts, run by the pruner in a fixed order when present.

The pipeline of one prefill (:class:`~vtprune.runtime.pruner.Pruner`):

1. **probe** - while the vision encoder runs, record a registered attention statistic at one tower layer;
   the family maps it to one score per visual token of each budget unit.
2. **scorer** + **keep** - before the LLM, score each budget unit's tokens and keep the top ``keep(n)`` of
   them (a pre-LLM selection); **or** **transform** - replace each unit's tokens by fewer new ones
   (pooling, merging; it may read the probe's scores too): the new rows are written at some of the
   unit's placeholder positions and the others are compacted away, as for a selection.
3. **plan** - inside the LLM, a :class:`~vtprune.runtime.layer_drop.LayerPlan` may drop visual tokens
   after any decoder layer.
4. **adapters** - trainable modules run after self-attention of some decoder layers, reading the
   unpruned visual features kept aside at prefill (:mod:`vtprune.runtime.adapters`).

A method fills the parts it needs; a pre-LLM part and an in-LLM part compose with no new code (e.g.
FasterVLM's selection followed by FastV's plan on the kept tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .adapters import Adapters
from .layer_drop import LayerPlan

__all__ = ["VisionProbe", "VisualUnit", "Scorer", "Transform", "MethodParts", "compose"]


@dataclass(frozen=True)
class VisionProbe:
    """Record ``statistic`` (a name registered in :mod:`vtprune.runtime.statistics`) at tower layer
    ``layer`` (an index into the family's ``vision_tower().attention_modules()``)."""

    statistic: str
    layer: int


@dataclass
class VisualUnit:
    """One budget unit (an image, or all tiles of one image) as the LLM will see it.

    Attributes:
        features: ``(n, hidden)`` its visual tokens, in prompt order.
        score: ``(n,)`` the probe's statistic mapped to those tokens, or None without a probe.
        groups: ``(n,)`` long, the budget group of each token (the keep rule applies per group: tiles,
            crops), -1 for tokens that are always kept and not counted (layout tokens such as row
            separators); None: the whole unit is one group.
        grid: ``(rows, cols)`` with ``rows * cols == n`` when the family knows the unit's tokens form a
            row-major 2-D grid (:meth:`~vtprune.integrations.Integration.token_grids`); None otherwise.
            Set for transforms.
        text: ``(m, hidden)`` the language model's input embeddings of the text tokens of the sample the
            unit belongs to (its prompt tokens that are neither padding nor image placeholders, in prompt
            order); set only for scorers that run on the prompt (``MethodParts.prompt_scorer``).
    """

    features: torch.Tensor
    score: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    text: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.features.shape[0])


# scorer(units) -> one (n_i,) score per unit; higher is kept first.
Scorer = Callable[[list[VisualUnit]], list[torch.Tensor]]

# transform(units) -> per unit (positions, rows): ``positions`` (k,) long, ascending, the indices into the
# unit's tokens whose placeholders stay in the prompt; ``rows`` (k, hidden) the new features written there.
# The kept placeholder keeps its own position id (M-RoPE: its grid cell), so where a method puts a new token
# is a documented choice of the method.
Transform = Callable[[list[VisualUnit]], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class MethodParts:
    """The parts of one wrapped method. Every field is optional; a method sets the ones it uses.

    Attributes:
        probe: what the vision encoder must record for the scorer.
        scorer: pre-LLM token scores per budget unit (requires ``keep``).
        keep: ``keep(n) -> k``, tokens kept of a unit of ``n`` visual tokens.
        transform: pre-LLM replacement of each unit's tokens by fewer new ones (instead of a selection).
        plan: in-LLM dropping between decoder layers.
        adapters: modules run after self-attention of some decoder layers
            (:class:`~vtprune.runtime.adapters.Adapters`).
        positions: ``"contiguous"``, ``"original"`` or ``"auto"`` (the family's default) for the position
            ids of tokens kept before the LLM.
        budget: what one keep budget covers (``"image"``, or a family's finer unit such as ``"tile"``);
            ``"auto"`` is the family's default.
        prompt_scorer: the scorer runs once the prompt is known (at the multimodal forward) instead of at
            image encoding: it sees whole budget units (rows joined, e.g. all tiles of an image) with each
            unit's ``text`` set. Its scores still ride on the features, so one ``generate()`` call scores
            each encoded image once. Not with a probe (the probe's records are read at encoding).
    """

    probe: VisionProbe | None = None
    scorer: Scorer | None = None
    keep: Callable[[int], int] | None = None
    transform: Transform | None = None
    plan: LayerPlan | None = None
    adapters: Adapters | None = None
    positions: str = "auto"
    budget: str = "auto"
    prompt_scorer: bool = False

    def __post_init__(self) -> None:
        if (self.scorer is None) != (self.keep is None):
            raise ValueError("a pre-LLM selection needs both a scorer and a keep rule")
        if self.probe is not None and self.scorer is None and self.transform is None:
            raise ValueError("a vision probe is only read by a scorer or a transform")
        if self.prompt_scorer and (self.scorer is None or self.probe is not None):
            raise ValueError("prompt_scorer needs a scorer and no vision probe")
        if self.scorer is not None and self.transform is not None:
            raise ValueError("a unit's tokens are either selected or transformed before the LLM, not both")

    @property
    def pre_llm(self) -> bool:
        """Whether these parts change the visual tokens before the LLM (a selection or a transform)."""
        return self.scorer is not None or self.transform is not None


def compose(named_parts: list[tuple[str, MethodParts]]) -> MethodParts:
    """One set of parts from several methods' parts, e.g. a pre-LLM selection followed by an in-LLM plan.

    Each slot (the pre-LLM selection or transform with its probe, the layer plan, the adapters) may come
    from one method only.
    """
    if len(named_parts) == 1:
        return named_parts[0][1]
    selection = [(name, p) for name, p in named_parts if p.pre_llm]
    plans = [(name, p) for name, p in named_parts if p.plan is not None]
    adapters = [(name, p) for name, p in named_parts if p.adapters is not None]
    for slot, owners in (
        ("select tokens before the LLM", selection),
        ("drop tokens inside the LLM", plans),
        ("add modules to the LLM", adapters),
    ):
        if len(owners) > 1:
            names = " and ".join(name for name, _ in owners)
            raise UsageError(
                f"cannot compose {names}: both {slot}; combine one pre-LLM and one in-LLM method"
            )
    merged = MethodParts()
    if selection:
        pre = selection[0][1]
        merged = MethodParts(
            probe=pre.probe,
            scorer=pre.scorer,
            keep=pre.keep,
            transform=pre.transform,
            positions=pre.positions,
            budget=pre.budget,
            prompt_scorer=pre.prompt_scorer,
        )
    if plans:
        merged.plan = plans[0][1].plan
    if adapters:
        merged.adapters = adapters[0][1].adapters
    return merged
