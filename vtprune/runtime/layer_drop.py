"""Drop visual tokens *between* decoder layers of the language model.

One engine serves every method that prunes inside the LLM (FastV, static visual-token exit, DyVTE...). A
method supplies a *plan*: after each decoder layer the plan may return which of the current tokens the
next layers keep. The engine then gathers, for the remaining layers,

* the hidden states and the rotary ``(cos, sin)`` of the kept tokens (positions stay the original ones),
* the text position ids the layers receive,
* a per-layer 2-D padding mask, from which the layer's 4-D mask is rebuilt with HF's own
  ``create_causal_mask(..., layer_idx=...)`` so that its format matches the attention implementation and
  its size matches that layer's cache (shorter caches in later layers; padded for static caches).

At decode the new token is never dropped, so only the masks differ per layer: each layer's cache holds its
own subset of the prompt, and the engine rebuilds the mask for layers whose subset differs from layer 0's.
Samples of a batch may keep different numbers of tokens: rows are re-left-padded (see
:func:`vtprune.kernels.keep_mask_to_index`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kernels.gather import gather_tokens, keep_mask_to_index, take_columns, take_rows
from .compact import padded_length
from .timing import Stopwatch

__all__ = ["LayerPlan", "LayerEngine"]


class LayerPlan:
    """Base of in-LLM pruning plans. Subclasses override :meth:`decide` (and may use an attention probe).

    Attributes:
        probe_layers: decoder layers whose attention the plan reads (the engine arms a probe on each).
        probe_statistic: the registered statistic those probes record (:mod:`vtprune.runtime.statistics`).
    """

    probe_layers: tuple[int, ...] = ()
    probe_statistic: str = "last"

    def reset(self) -> None:
        """Called at the start of every prefill."""

    def decide(
        self,
        layer: int,
        hidden: torch.Tensor,
        visual: torch.Tensor,
        real: torch.Tensor,
        attention: dict,
        counts: list[int],
    ) -> tuple[torch.Tensor, list[int]] | None:
        """Tokens kept by the layers after ``layer``.

        Args:
            layer: index of the decoder layer that just ran.
            hidden: ``(batch, seq, hidden)`` its output.
            visual: ``(batch, seq)`` bool, True at (still present) visual tokens.
            real: ``(batch, seq)`` bool, False at padding.
            attention: ``{layer: (batch, seq) tensor}`` probe records of this prefill so far.
            counts: visual tokens still present per sample (host ints).

        Returns:
            None to keep everything, or ``(keep, kept)``: a ``(batch, seq)`` bool keep mask (text and
            padding positions are kept whatever it says) and the visual tokens kept per sample (host ints,
            so that the engine learns the new length without waiting for the GPU).
        """
        return None


def _extend(decision, width: int):
    """A recorded decision applied to the same tokens followed by appended (text) columns, kept."""
    if decision is None:
        return None
    keep, kept = decision
    extra = width - keep.shape[1]
    if extra < 0:
        raise RuntimeError(f"cannot reuse a decision over {keep.shape[1]} tokens for {width} tokens")
    if extra:
        keep = torch.cat([keep, keep.new_ones(keep.shape[0], extra)], dim=1)
    return keep, list(kept)


@dataclass
class _Current:
    """Token set the next layers see during a prefill, once something was dropped."""

    index: torch.Tensor  # (batch, seq) index into the LLM input columns, -1 at padding
    mask2d: torch.Tensor  # (batch, seq) long
    visual: torch.Tensor  # (batch, seq) bool
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    mask4d: object = None


@dataclass
class LayerEngine:
    """Per-model state of in-LLM dropping. ``num_layers`` decoder layers, ``config`` the text config."""

    plan: LayerPlan
    num_layers: int
    config: object
    # prefill state
    current: _Current | None = None
    visual: torch.Tensor | None = None
    real: torch.Tensor | None = None
    attention: dict = field(default_factory=dict)
    counts: list = field(default_factory=list)  # per layer: (batch,) visual tokens the layer processed
    layer_index: list = field(default_factory=list)  # per layer: (batch, seq) LLM-input columns, or None=all
    # decode state: per layer, the 2-D padding mask of the prompt part its cache holds (None = as layer 0)
    prompt_masks: list = field(default_factory=list)
    prompt_len: int = 0
    host_real: list = field(default_factory=list)  # per sample, tokens (padding excluded) now present
    host_visual: list = field(default_factory=list)  # per sample, visual tokens now present
    decode_masks: dict = field(default_factory=dict)  # per decode call: prompt mask id -> 4-D mask
    decode_mask2d: torch.Tensor | None = None
    # per layer: the plan's decision in the latest prefill (None: nothing dropped); a replayed prefill's source
    decisions: list = field(default_factory=list)
    replay: list | None = None
    prefilling: bool = False
    decoding: bool = False
    prepared: bool = False  # the decoding call's mask is generate()'s compact 4-D one (static caches)
    probes: dict = field(default_factory=dict)  # layer -> AttentionProbe armed on its self-attention
    stopwatch: Stopwatch = field(default_factory=Stopwatch)  # times the plan's decisions (selection overhead)
    pad_multiple: int | None = None  # left-pad the shortened sequence to a multiple of this (compiled graphs)

    # ------------------------------------------------------------------------------------------ phases
    def begin_prefill(
        self,
        visual: torch.Tensor,
        mask2d: torch.Tensor,
        host_real: list[int],
        host_visual: list[int],
        replay: list | None = None,
    ) -> None:
        """visual, mask2d: ``(batch, seq)`` of the LLM input; host_real / host_visual: per-sample counts.

        replay: the ``decisions`` of an earlier prefill over a prefix of this input (the same prompt, with
        text appended: a no-cache step of the same generate() call); the plan is not asked again, its
        decisions are reused with the appended columns kept."""
        self.replay = replay
        self.decisions = [None] * self.num_layers
        if replay is None:
            self.plan.reset()
        self.host_real, self.host_visual = list(host_real), list(host_visual)
        self.prefilling = True
        self.current = None
        self.visual, self.real = visual, mask2d.bool()
        self.attention = {}
        self.counts = []
        self.layer_index = []
        self.prompt_masks = [None] * self.num_layers
        self.prompt_len = visual.shape[1]

    def end_prefill(self) -> None:
        self.prefilling = False
        self.current = None

    def begin_decode(
        self,
        mask2d: torch.Tensor | None,
        prompt_masks: list | None = None,
        prompt_len: int | None = None,
        prepared: bool = False,
    ) -> None:
        """A later call on a cache a pruned prefill filled (only then do per-layer masks apply).

        mask2d: the call's compact 2-D mask. prompt_masks / prompt_len: the per-layer prompt masks and the
        compact prompt length of the prefill that filled this cache (default: this engine's latest
        prefill), so that a cache continues correctly after other prefills ran (another conversation).
        prepared: the layers receive the compact 4-D mask of layer 0's cache (a static cache, the mask
        ``generate()`` built before the forward); each layer's mask is derived from it with fixed shapes
        (:meth:`_prepared_mask`), so a compiled decoding step neither syncs nor changes shape."""
        if prompt_masks is not None:
            self.prompt_masks = list(prompt_masks)
            self.prompt_len = prompt_len
        self.decode_mask2d = mask2d
        self.decode_masks = {}
        self.decoding = True
        self.prepared = prepared

    def end_decode(self) -> None:
        self.decoding = False
        self.prepared = False
        self.decode_mask2d = None
        self.decode_masks = {}

    # --------------------------------------------------------------------------------- layer wrapper
    def run_layer(self, layer: int, original, hidden, kwargs: dict):
        if self.prefilling:
            return self._prefill_layer(layer, original, hidden, kwargs)
        if not self.decoding:
            return original(hidden, **kwargs)
        prompt_mask = self.prompt_masks[layer]
        if prompt_mask is not None:
            if self.prepared and isinstance(kwargs.get("attention_mask"), torch.Tensor):
                kwargs["attention_mask"] = self._prepared_mask(kwargs["attention_mask"], prompt_mask)
            else:
                kwargs["attention_mask"] = self._decode_mask(layer, hidden, prompt_mask, kwargs.get("cache"))
        return original(hidden, **kwargs)

    def _prefill_layer(self, layer, original, hidden, kwargs):
        cur = self.current
        if cur is not None:
            kwargs["attention_mask"] = cur.mask4d
            if cur.position_embeddings is not None:
                kwargs["position_embeddings"] = cur.position_embeddings
            if "position_ids" in kwargs and kwargs["position_ids"] is not None:
                kwargs["position_ids"] = cur.position_ids
            self.prompt_masks[layer] = cur.mask2d
        visual = cur.visual if cur is not None else self.visual
        real = cur.mask2d.bool() if cur is not None else self.real
        self.counts.append((visual & real).sum(-1))
        self.layer_index.append(cur.index if cur is not None else None)
        out = original(hidden, **kwargs)
        probe = self.probes.get(layer)
        if probe is not None and probe.records:
            # Static caches hand attention the whole buffer: the prefill's keys are its first columns.
            self.attention[layer] = probe.records.pop()[:, : out.shape[1]]
            probe.clear()
        if layer == self.num_layers - 1:
            return out
        if self.replay is not None:
            decision = _extend(self.replay[layer], visual.shape[1])
        else:
            with self.stopwatch:
                decision = self.plan.decide(layer, out, visual, real, self.attention, list(self.host_visual))
            self.decisions[layer] = decision
        if decision is None:
            return out
        keep, kept = decision
        keep = (keep | ~visual) & real  # text is never dropped by a plan; padding leaves now
        self.host_real = [r - v + k for r, v, k in zip(self.host_real, self.host_visual, kept)]
        self.host_visual = list(kept)
        return self._drop(layer, out, keep, kwargs)

    def _drop(self, layer, out, keep, kwargs):
        cur = self.current
        index_in_cur = keep_mask_to_index(
            keep, padded_length(max(self.host_real), self.pad_multiple, out.shape[1])
        )
        base_index = cur.index if cur is not None else None
        base_mask = cur.mask2d if cur is not None else self.real.long()
        base_visual = cur.visual if cur is not None else self.visual
        pe = kwargs.get("position_embeddings")
        hidden, _, mask2d = gather_tokens(out, index_in_cur, None, base_mask, check=False)
        visual = take_columns(base_visual, index_in_cur, False)
        index = (
            take_columns(base_index, index_in_cur, -1)
            if base_index is not None
            else take_columns(
                torch.arange(out.shape[1], device=out.device).expand(out.shape[0], -1), index_in_cur, -1
            )
        )
        new = _Current(index=index, mask2d=mask2d, visual=visual)
        if pe is not None:
            new.position_embeddings = tuple(
                take_rows(t.expand(out.shape[0], *t.shape[1:]), index_in_cur) for t in pe
            )
        pos = kwargs.get("position_ids")
        if pos is not None:
            new.position_ids = take_columns(
                pos.expand(*pos.shape[:-2], out.shape[0], pos.shape[-1]), index_in_cur, 0
            )
        new.mask4d = self._mask(hidden, mask2d, kwargs.get("cache"), layer + 1)
        self.current = new
        return hidden

    # -------------------------------------------------------------------------------------- masks
    def _mask(self, hidden, mask2d, cache, layer_idx):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=None,
            layer_idx=layer_idx if cache is not None else None,
        )

    def _decode_mask(self, layer, hidden, prompt_mask, cache):
        # Layers holding the same prompt subset share one mask per call (e.g. every layer after an exit).
        key = id(prompt_mask)
        if key not in self.decode_masks:
            self.decode_masks[key] = self._build_decode_mask(layer, hidden, prompt_mask, cache)
        return self.decode_masks[key]

    def _build_decode_mask(self, layer, hidden, prompt_mask, cache):
        batch, q = hidden.shape[:2]
        call = self.decode_mask2d
        past_new = (call.shape[1] - self.prompt_len - q) if call is not None else None
        if call is None:
            # Tokens generated since the prompt: what this layer's cache holds beyond its prompt part.
            past_new = (
                int(cache.layers[layer].get_seq_length()) - prompt_mask.shape[1] if cache is not None else 0
            )
            tail = prompt_mask.new_ones(batch, past_new + q)
        else:
            tail = call[:, self.prompt_len :].to(prompt_mask.dtype)
        mask2d = torch.cat([prompt_mask, tail], dim=-1)
        return self._mask(hidden, mask2d, cache, layer)

    def _prepared_mask(self, mask4d: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """A layer's 4-D decoding mask from layer 0's (``(B, 1, q, kv)``, static cache: ``kv`` its size).

        Layer 0's cache holds the ``prompt_len`` compact prompt columns then the tokens fed since; a layer
        holding a shorter prompt subset (``p`` columns, ``prompt_mask``) holds the same later tokens right
        after it. Its mask is the subset's padding mask, then layer 0's columns after the prompt moved
        ``prompt_len - p`` to the left, then masked columns: the same width, with no host value read."""
        batch, _, q, _ = mask4d.shape
        p = prompt_mask.shape[1]
        allowed = prompt_mask.bool()[:, None, None, :].expand(batch, 1, q, p)
        if mask4d.dtype == torch.bool:
            head, fill = allowed, False
        else:
            fill = torch.finfo(mask4d.dtype).min
            head = torch.zeros((), dtype=mask4d.dtype, device=mask4d.device).masked_fill(~allowed, fill)
        tail = mask4d[..., self.prompt_len :]
        pad = mask4d.new_full((batch, 1, q, self.prompt_len - p), fill)
        return torch.cat([head.to(mask4d.device), tail, pad], dim=-1)

    def visual_counts(self) -> torch.Tensor:
        """``(batch, num_layers)`` visual tokens each layer processed in the last prefill."""
        return torch.stack(self.counts, dim=-1) if self.counts else torch.zeros(0)
