"""Per-layer visual-token schedules (Zhao et al., CVPR 2025, "Accelerating Multimodal Large Language Models by
Searching Optimal Vision Token Reduction", arXiv 2412.00556): the method that runs what G-Search and
P-Sigmoid find (:mod:`vtprune.tune.search`).

A schedule says how many visual tokens each decoder layer processes: ``keep[l]`` for layer ``l``, as a
fraction of each sample's visual tokens at the LLM input (``unit="ratio"``) or as a token count
(``unit="count"``). It never increases with depth - the paper's assumption, drawn from its finding that the
ranking of visual tokens by attention is similar in every layer but the first, is that the number of
*essential* top tokens does not grow along the layers - so a layer keeps a subset of what the layer before
it kept. When ``keep[l + 1] < keep[l]`` the visual tokens are ranked by the attention layer ``l`` paid to
them and the top ``keep[l + 1]`` go on (the ranking of layer ``l + 1``'s tokens comes from the layer
before it, where the paper ranks them too). Layers whose count does not change cost nothing extra: no
probe, no ranking, no gather.

Where the paper is open (its §3 text could not be read here; only its abstract and secondary reviews),
these are this module's choices:

* **which queries rank** - ``rank="text"`` (default): the mean, over heads and over the text queries after
  the last visual token (the instruction, the prompt-aware signal the paper names), of the attention each
  visual token receives; ``rank="last"``: the last token's attention only (FastV's signal). ``"text"``
  reads the last :data:`TAIL_ROWS` query rows through the registered statistic ``"tail_rows"`` (no eager
  attention maps; memory bounded by rows x keys); text rows beyond those are not counted, and a sample whose
  prompt ends with its image falls back to the last row. Text between two images does not rank.
* **rank once or at every drop** - ``reuse_order=False`` (default) re-ranks at every layer where the count
  drops, with that layer's attention; ``True`` ranks once, at the first such layer, and later drops keep the
  top of that same order (one probe in all; the paper's similarity finding is what makes this sound).
* **layer 0** always processes every visual token (a plan drops tokens *after* a layer; pre-LLM pruning is
  :mod:`~vtprune.methods.fastervlm`'s job, and the paper finds layer 0's ranking unlike the others'): a ratio
  schedule starts with ``1.0``; a count schedule's first entry must be at least the visual tokens of every
  input (checked at prefill).
* **counts from ratios**: ``keep_count(n, r)`` (round half up, at least 1) as every method here, and ``0``
  for ``r == 0`` (every visual token leaves, as static exit). Positions of the kept tokens stay the original
  ones (the in-LLM engine's rule).

Schedules are JSON: ``vtprune.wrap(model, "schedule", keep=[1.0, 1.0, 0.5, 0.25])`` inline, or
``path="schedule.json"`` (a file holding a ``schedule`` config dict, as ``vtprune search`` writes it; fields
given explicitly override the file's).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..config import PruneConfig, check_number
from ..errors import UsageError
from ..kernels.gather import keep_mask_to_index, take_columns
from ..registry import register_method
from ..runtime.layer_drop import LayerPlan
from ..runtime.parts import MethodParts
from ..runtime.selection import keep_count
from ..runtime.statistics import apply_mask, register_statistic

__all__ = ["ScheduleConfig", "SchedulePlan", "load_schedule", "check_schedule", "layer_counts", "TAIL_ROWS"]

RANKS = ("text", "last")
UNITS = ("ratio", "count")
TAIL_ROWS = 256  # query rows (from the end of the prompt) the "text" ranking can read
_ROW_CHUNK = 64  # rows of the softmax materialised at once


# ----------------------------------------------------------------------------------------------- statistic
@register_statistic("tail_rows")
def tail_rows_attention(query, key, mask, scale) -> torch.Tensor:
    """Attention of each of the last ``R = min(TAIL_ROWS, queries)`` queries to every key, averaged over
    heads: ``(batch, keys, R)``; column ``r`` is query ``queries - R + r``. The plan keeps the text rows
    (it knows where the visual tokens are; the statistic does not). Rows are computed ``_ROW_CHUNK`` at a
    time; with no mask (SDPA's implicit causal mask) the causal mask is applied here."""
    batch, _, seq, _ = query.shape
    keys = key.shape[2]
    rows = min(TAIL_ROWS, seq)
    first = seq - rows
    out = torch.zeros(batch, keys, rows, device=query.device)
    kt = key.float().transpose(-1, -2)
    offset = keys - seq  # keys before the first query (a cache); queries see keys <= offset + row
    for start in range(first, seq, _ROW_CHUNK):
        sl = slice(start, min(start + _ROW_CHUNK, seq))
        logits = torch.matmul(query[:, :, sl].float(), kt) * scale
        if mask is None:
            row = torch.arange(sl.start, sl.stop, device=query.device)[:, None]
            future = torch.arange(keys, device=query.device)[None] > row + offset
            logits = logits.masked_fill(future, float("-inf"))
        else:
            logits = apply_mask(logits, mask, rows=sl)
        probs = logits.softmax(-1).mean(dim=1).nan_to_num(0.0)  # fully masked (padding) rows -> 0
        out[:, :, sl.start - first : sl.stop - first] = probs.transpose(1, 2)
    return out


def text_query_scores(record: torch.Tensor, visual: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` mean attention from the text queries after the last visual token, from a
    ``"tail_rows"`` record ``(batch, seq, R)``; a sample without such a row uses its last row."""
    batch, seq, rows = record.shape
    positions = torch.arange(seq, device=record.device)
    last_visual = torch.where(visual, positions, -1).amax(-1, keepdim=True)  # (batch, 1)
    text_rows = (positions[seq - rows :][None] > last_visual) & real[:, seq - rows :]  # (batch, R)
    text_rows[:, -1] |= ~text_rows.any(-1)
    weights = text_rows.to(record.dtype)
    return (record * weights[:, None, :]).sum(-1) / weights.sum(-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ config
def _count(value, unit: str, n: int) -> int:
    if unit == "count":
        return min(int(value), n)
    return 0 if value == 0 else keep_count(n, value)


def layer_counts(keep: list, unit: str, n: int) -> list[int]:
    """Visual tokens each layer processes under schedule ``keep`` for a sample with ``n`` visual tokens at
    the LLM input (layer 0 processes all ``n``)."""
    return [n] + [_count(value, unit, n) for value in keep[1:]]


def check_schedule(keep: Any, unit: str, where: str = "keep") -> list:
    """Validate a schedule's values (not its length: that needs the model); returns it as a list."""
    if unit not in UNITS:
        raise UsageError(f"unit must be one of {UNITS}, got {unit!r}")
    if isinstance(keep, (str, bytes)) or not isinstance(keep, (list, tuple)) or not keep:
        raise UsageError(
            f"{where} must be a non-empty list with one entry per decoder layer, e.g. [1.0, 1.0, 0.5, 0.25]; "
            f"got {keep!r}"
        )
    keep = list(keep)
    for i, value in enumerate(keep):
        if unit == "ratio":
            check_number(f"{where}[{i}] (a ratio)", value, 0.0, 1.0, closed_low=True, closed_high=True)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(
                f"{where}[{i}] must be a token count (an int >= 0) with unit='count', got {value!r}"
            )
    if unit == "ratio" and keep[0] != 1:
        raise UsageError(
            f"{where}[0] must be 1.0: layer 0 always processes every visual token (tokens leave after a layer; "
            "compose with fastervlm to prune before the LLM)"
        )
    for i in range(1, len(keep)):
        if keep[i] > keep[i - 1]:
            raise UsageError(
                f"{where} must not increase from one layer to the next (a dropped token cannot come back): "
                f"{where}[{i}]={keep[i]} > {where}[{i - 1}]={keep[i - 1]}"
            )
    return keep


def load_schedule(path: str | Path) -> dict:
    """The ``schedule`` config dict stored at ``path`` (``vtprune search`` writes one)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(
            f"schedule file {str(path)!r} does not exist; pass a JSON file written by vtprune search"
        )
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"schedule file {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or "keep" not in data:
        raise UsageError(f"schedule file {str(path)!r} must hold a JSON object with a 'keep' list")
    if data.get("method", "schedule") != "schedule":
        raise UsageError(f"schedule file {str(path)!r} is a {data['method']!r} config, not a schedule")
    if data.get("path") is not None:
        raise UsageError(f"schedule file {str(path)!r} points to another file; store the 'keep' list itself")
    unknown = sorted(set(data) - {"method", "version", "keep", "unit", "rank", "reuse_order", "path"})
    if unknown:
        raise UsageError(f"schedule file {str(path)!r} has unknown field(s) {unknown}")
    if data.get("version", ScheduleConfig.version) != ScheduleConfig.version:
        raise UsageError(
            f"schedule file {str(path)!r} was written by config version {data['version']}; this vtprune reads "
            f"version {ScheduleConfig.version}"
        )
    return data


@dataclasses.dataclass
class ScheduleConfig(PruneConfig):
    """Args:
    keep: per decoder layer, the visual tokens it processes (``unit`` says how); non-increasing, one entry
        per layer; layer 0 keeps everything. Give ``keep`` or ``path``.
    unit: ``"ratio"`` (of each sample's visual tokens at the LLM input) or ``"count"``; ``None``: the
        file's, else ``"ratio"``.
    path: a JSON file holding a schedule config dict (what ``vtprune search`` writes).
    rank: which queries rank the visual tokens at a drop: ``"text"`` (the text after the image) or
        ``"last"`` (the last token); ``None``: the file's, else ``"text"``.
    reuse_order: rank once, at the first drop, and reuse that order for later drops; ``None``: the file's,
        else False.
    """

    method = "schedule"

    keep: list | None = None
    unit: str | None = None
    path: str | None = None
    rank: str | None = None
    reuse_order: bool | None = None

    def validate(self) -> None:
        if isinstance(self.keep, tuple):
            self.keep = list(self.keep)
        if isinstance(self.path, Path):
            self.path = str(self.path)
        if self.path is not None and not isinstance(self.path, str):
            raise UsageError(f"path must be a JSON file path or None, got {self.path!r}")
        if self.path is not None and self.keep is not None:
            raise UsageError("give the schedule inline (keep=[...]) or as a file (path=...), not both")
        if self.unit is not None and self.unit not in UNITS:
            raise UsageError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.rank is not None and self.rank not in RANKS:
            raise UsageError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.reuse_order is not None and not isinstance(self.reuse_order, bool):
            raise UsageError(f"reuse_order must be true or false, got {self.reuse_order!r}")
        if self.keep is not None or self.path is not None:
            self.resolved()

    def resolved(self) -> dict:
        """``{"keep", "unit", "rank", "reuse_order"}`` with the file read and defaults applied."""
        stored = load_schedule(self.path) if self.path is not None else {}
        keep = self.keep if self.keep is not None else stored.get("keep")
        if keep is None:
            raise UsageError(
                "the schedule method needs keep=[one entry per decoder layer] or path=<schedule JSON file>"
            )
        unit = self.unit or stored.get("unit") or "ratio"
        rank = self.rank or stored.get("rank") or "text"
        reuse = self.reuse_order if self.reuse_order is not None else stored.get("reuse_order", False)
        where = f"keep (in {self.path})" if self.keep is None else "keep"
        if rank not in RANKS:
            raise UsageError(f"rank must be one of {RANKS}, got {rank!r}")
        if not isinstance(reuse, bool):
            raise UsageError(f"reuse_order must be true or false, got {reuse!r}")
        return {"keep": check_schedule(keep, unit, where), "unit": unit, "rank": rank, "reuse_order": reuse}


# -------------------------------------------------------------------------------------------------- plan
class SchedulePlan(LayerPlan):
    """Drop visual tokens where the schedule's count falls; rank by layer attention (see the module doc)."""

    def __init__(self, keep: list, unit: str, rank: str, reuse_order: bool, num_layers: int):
        if len(keep) != num_layers:
            raise UsageError(
                f"the schedule has {len(keep)} entries but the model has {num_layers} decoder layers: give one "
                "entry per layer"
            )
        self.keep, self.unit, self.rank, self.reuse_order = list(keep), unit, rank, reuse_order
        drops = [layer for layer in range(num_layers - 1) if keep[layer + 1] < keep[layer]]
        ranked = [layer for layer in drops if keep[layer + 1] > 0]  # dropping everything needs no ranking
        self.drop_layers = tuple(drops)
        self.probe_layers = tuple(ranked[:1] if reuse_order else ranked)
        self.probe_statistic = "tail_rows" if rank == "text" else "last"
        self.reset()

    def reset(self) -> None:
        self.visual_in: list[int] | None = None  # per sample, visual tokens at the LLM input
        self.scores: torch.Tensor | None = None  # reuse_order: the first ranking, in the current columns
        self.moved: torch.Tensor | None = None  # keep mask of the last drop, not yet applied to ``scores``

    def target(self, layer: int, n: int) -> int:
        """Visual tokens layer ``layer`` processes for a sample with ``n`` at the LLM input."""
        return _count(self.keep[layer], self.unit, n)

    def _layer_scores(self, layer, visual, real, attention) -> torch.Tensor:
        record = attention[layer].float()
        return text_query_scores(record, visual, real) if self.rank == "text" else record

    def decide(self, layer, hidden, visual, real, attention, counts):
        if self.visual_in is None:  # the first call (after layer 0): nothing was dropped yet
            self.visual_in = list(counts)
            if self.unit == "count" and max(counts, default=0) > self.keep[0]:
                raise UsageError(
                    f"the count schedule starts at {self.keep[0]} visual tokens but an input has {max(counts)}: "
                    "layer 0 processes every visual token, so keep[0] must be at least that (or use ratios)"
                )
        if self.moved is not None:  # carry the reused ranking to the columns the engine gathered
            index = keep_mask_to_index(self.moved, visual.shape[1])
            self.scores = take_columns(self.scores, index, float("-inf"))
            self.moved = None
        if self.reuse_order and self.scores is None and layer in self.probe_layers:
            self.scores = self._layer_scores(layer, visual, real, attention)
        if layer not in self.drop_layers:
            return None
        kept = [min(self.target(layer + 1, n), c) for n, c in zip(self.visual_in, counts)]
        if kept == counts:
            return None
        candidates = visual & real
        if all(k in (0, c) for k, c in zip(kept, counts)):  # some samples drop all, the rest keep all
            gone = torch.tensor([k == 0 for k in kept], device=visual.device)[:, None]
            keep = ~(candidates & gone)
        else:
            scores = self.scores if self.reuse_order else self._layer_scores(layer, visual, real, attention)
            scores = scores.masked_fill(~candidates, float("-inf"))
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(
                1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
            )
            keep = ~candidates | (rank < torch.tensor(kept, device=rank.device)[:, None])
        if self.reuse_order and self.scores is not None:
            self.moved = (keep | ~visual) & real  # exactly what the engine gathers
        return keep, kept


@register_method(ScheduleConfig)
def _parts(config: ScheduleConfig, family) -> MethodParts:
    spec = config.resolved()
    return MethodParts(
        plan=SchedulePlan(
            spec["keep"], spec["unit"], spec["rank"], spec["reuse_order"], len(family.decoder_layers)
        )
    )
