"""The runtime object ``vtprune.wrap`` attaches to a model: patches, per-call state, and what was kept.

It names no method and no family: the method's :class:`~vtprune.runtime.parts.MethodParts` say what runs,
the family's :class:`~vtprune.integrations.Integration` says where things are. Three instance-level
patches carry the whole mechanism (``unwrap`` removes them):

* ``get_image_features`` of the multimodal base model: after the vision encoder ran, attach each budget
  unit's token scores to its feature tensor (``feature._vtprune_score``), so they travel with features
  that ``generate()`` pre-encodes, expands for beams, or the caller passes back as ``mm_encoder_outputs``.
* the base model's ``forward``: at prefill, encode images if needed, score and select the kept visual
  tokens (the method's scorer and keep rule).
* the language model's ``forward``: at prefill, gather the kept tokens (embeddings, 2-D mask, position
  ids) before the first decoder layer; afterwards translate the caller's original-coordinate mask and
  positions to the shorter cache. The method's layer plan, if any, runs inside (each decoder layer is
  patched too).

``model.create_masks_for_generate`` is also shadowed: for static caches ``generate()`` would otherwise
build a 4-D mask in original coordinates, which cannot describe the compact cache.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import UsageError
from ..registry import get_family, method_parts
from .compact import Prefix, cache_length, compact
from .layer_drop import LayerEngine
from .parts import VisualUnit, compose
from .patching import Patcher
from .probe import AttentionProbe
from .selection import SampleSelection, kept_visual_indices, select_visual_tokens

__all__ = ["Pruner"]


@dataclass
class _Pending:
    """Selection made by the multimodal forward, consumed by the language model's forward.

    Host-side counts are read once, before the vision encoder is queued, so that nothing later in the
    prefill has to wait for the GPU to learn a shape.
    """

    keep: torch.Tensor  # (batch, seq) bool
    image_mask: torch.Tensor  # (batch, seq) bool
    visual_in: list[int]  # per sample
    real_in: list[int]  # per sample, padding excluded
    visual_kept: list[int]  # per sample


def _bind(fn, args, kwargs) -> dict:
    if not args:
        return dict(kwargs)
    bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    out = dict(bound.arguments)
    out.update(out.pop("kwargs", {}) or {})
    return out


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


class Pruner:
    """State and patches of one wrapped model. Reach it with :func:`vtprune.get_pruner`.

    Attributes:
        config: the validated method config (a tuple of configs when methods are composed).
        family: the model's :class:`~vtprune.integrations.Integration`.
        parts: what the method runs (:class:`~vtprune.runtime.parts.MethodParts`).
        last: per-sample :class:`~vtprune.runtime.selection.SampleSelection` of the latest pruned prefill.
        engine: the :class:`~vtprune.runtime.layer_drop.LayerEngine` when the method has a layer plan.
    """

    def __init__(self, model: nn.Module, config: PruneConfig | tuple[PruneConfig, ...]):
        self.model = model
        self.config = config  # a tuple when methods are composed
        self.family = get_family(model)
        configs = config if isinstance(config, tuple) else (config,)
        self.parts = compose([(c.method, method_parts(c, self.family)) for c in configs])
        self.engine: LayerEngine | None = None
        self.text_probes: dict[int, AttentionProbe] = {}
        self.contiguous = self.family.resolve_positions(self.parts.positions) == "contiguous"
        self.budget = self.family.resolve_budget(self.parts.budget)
        self.probe: AttentionProbe | None = None
        self.patcher = Patcher()
        self._last: list[SampleSelection] | None = None
        self._last_raw = None
        self._pending: _Pending | None = None
        self._prefix: Prefix | None = None

    # ----------------------------------------------------------------------------------------- patches
    def attach(self) -> None:
        family, parts = self.family, self.parts
        inner, lm = family.base_model, family.language_model
        try:
            if parts.probe is not None:
                module = family.vision_tower().attention_modules()[parts.probe.layer]
                self.probe = AttentionProbe(module, parts.probe.statistic)
                self.probe.attach(self.patcher)
            if parts.plan is not None:
                self._attach_layers()
            self._patch_method(inner, "get_image_features", self._get_image_features)
            self._patch_method(inner, "forward", self._multimodal_forward)
            self._patch_method(lm, "forward", self._language_forward)
            self.patcher.set_attr(self.model, "create_masks_for_generate", _passthrough_mask)
            self.patcher.set_attr(self.model, "_vtprune", self)
        except BaseException:
            self.patcher.restore()
            raise

    def _attach_layers(self) -> None:
        layers = self.family.decoder_layers
        plan = self.parts.plan
        self.engine = LayerEngine(plan, len(layers), self.family.language_model.config)
        for idx in plan.probe_layers:
            probe = AttentionProbe(layers[idx].self_attn, plan.probe_statistic, active=False)
            probe.attach(self.patcher)
            self.text_probes[idx] = probe
        self.engine.probes = self.text_probes
        for idx, layer in enumerate(layers):
            self._patch_method(layer, "forward", functools.partial(self._decoder_layer, idx))

    def detach(self) -> None:
        self.patcher.restore()
        self._pending = self._prefix = None
        self.probe = self.engine = None
        self.text_probes = {}

    def _decoder_layer(self, idx, original, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("vtprune expects decoder layers to be called as layer(hidden_states, **kwargs)")
        return self.engine.run_layer(idx, original, hidden_states, kwargs)

    def _patch_method(self, obj, name, impl) -> None:
        original = getattr(obj, name)

        # functools.wraps keeps the signature visible: generate() inspects get_image_features' parameters.
        @functools.wraps(original)
        def patched(*args, **kwargs):
            return impl(original, *args, **kwargs)

        self.patcher.set_attr(obj, name, patched)

    # ---------------------------------------------------------------------------------- vision encoder
    def _get_image_features(self, original, *args, **kwargs):
        if self.probe is not None:
            self.probe.clear()
        out = original(*args, **kwargs)
        features = getattr(out, "pooler_output", None)
        if features is None or self.parts.scorer is None:
            return out
        units = self.family.budget_units(features)
        encode_args = _bind(original, args, kwargs)
        groups = self.family.token_groups(units, encode_args, self.budget)
        scores = [None] * len(units)
        if self.probe is not None:
            try:
                scores = self.family.vision_tower().to_tokens(self.probe.records, units, encode_args)
            finally:
                self.probe.clear()
        for unit, score, group in zip(units, scores, groups):
            unit._vtprune_score = score
            unit._vtprune_groups = group
        return out

    # ------------------------------------------------------------------------------ multimodal forward
    def _multimodal_forward(self, original, *args, **kwargs):
        kwargs = _bind(original, args, kwargs)
        mm = dict(kwargs.get("mm_encoder_outputs") or {})
        if kwargs.get("pixel_values") is None and mm.get("image") is None:
            return original(**kwargs)
        if cache_length(_cache_of(kwargs)) > 0:
            raise NotImplementedError(
                "images fed after a non-empty cache (chunked prefill, multi-turn reuse of a cache) cannot be "
                "pruned; start from an empty cache or call vtprune.unwrap(model) first"
            )
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise UsageError(
                "vtprune needs input_ids (with image placeholder tokens) to locate visual tokens"
            )
        image_mask = input_ids == self.family.image_token_id
        attention_mask = kwargs.get("attention_mask")
        real = (
            attention_mask.bool()
            if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
            else None
        )
        counts = torch.stack(
            [
                image_mask.sum(-1),
                real.sum(-1)
                if real is not None
                else image_mask.new_full(image_mask.shape[:1], image_mask.shape[1], dtype=torch.long),
            ]
        )
        visual_in, real_in = counts.tolist()  # the one host sync, before the encoder is queued

        if mm.get("image") is None:
            # Encode here, as generate() does, so that both paths read scores from the features.
            encode = self.family.base_model.get_image_features
            params = inspect.signature(encode).parameters
            encode_kwargs = {k: kwargs[k] for k in params if k != "kwargs" and kwargs.get(k) is not None}
            mm["image"] = encode(**encode_kwargs, return_dict=True)
            kwargs["pixel_values"] = None
            kwargs["mm_encoder_outputs"] = mm

        features = self.family.budget_units(mm["image"].pooler_output)
        sizes = [f.shape[0] for f in features]
        if sum(sizes) != sum(visual_in):
            raise UsageError(
                f"the prompt has {sum(visual_in)} image tokens but the image features have {sum(sizes)}; "
                "the processor and the model disagree on the number of visual tokens per image"
            )
        parts = self.parts
        if parts.scorer is not None:
            units = [
                VisualUnit(f, getattr(f, "_vtprune_score", None), getattr(f, "_vtprune_groups", None))
                for f in features
            ]
            if parts.probe is not None and any(u.score is None for u in units):
                raise UsageError(
                    "these image features carry no vtprune scores: they were encoded before vtprune.wrap or "
                    "sliced (chunked prefill); pass pixel_values, or encode after wrapping"
                )
            keep, kept = select_visual_tokens(
                image_mask, parts.scorer(units), parts.keep, [u.groups for u in units], sum(visual_in)
            )
            visual_kept = _per_sample(kept, sizes, visual_in)
        else:  # nothing is selected before the LLM
            keep = torch.ones_like(image_mask)
            visual_kept = list(visual_in)
        self._pending = _Pending(keep, image_mask, visual_in, real_in, visual_kept)
        try:
            return original(**kwargs)
        finally:
            self._pending = None

    # -------------------------------------------------------------------------------- language model
    def _language_forward(self, original, *args, **kwargs):
        kwargs = _bind(original, args, kwargs)
        cache = _cache_of(kwargs)
        past = cache_length(cache)
        pending, self._pending = self._pending, None
        if pending is not None and past == 0:
            return self._prefill(original, kwargs, pending)
        prefix = self._prefix
        if prefix is not None and past > 0 and prefix.owns(cache):
            embeds = kwargs.get("inputs_embeds")
            q_len = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
            kwargs["attention_mask"], kwargs["position_ids"] = prefix.translate(
                kwargs.get("attention_mask"), kwargs.get("position_ids"), q_len, past
            )
            if self.engine is not None:
                self.engine.begin_decode(kwargs["attention_mask"])
                try:
                    return original(**kwargs)
                finally:
                    self.engine.end_decode()
        elif past == 0:
            self._prefix = None
        return original(**kwargs)

    def _prefill(self, original, kwargs, pending: _Pending):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("expected inputs_embeds from the multimodal forward")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
            raise UsageError("vtprune needs the 2-D padding mask at prefill (got a prepared 4-D/dict mask)")
        real_out = [r - v + k for r, v, k in zip(pending.real_in, pending.visual_in, pending.visual_kept)]
        packed = compact(
            embeds,
            attention_mask,
            kwargs.get("position_ids"),
            pending.keep,
            self.contiguous,
            size=max(real_out),
        )
        kwargs.update(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        engine = self.engine
        layer_counts = None
        if engine is not None:
            visual = torch.gather(pending.image_mask, 1, packed.index.clamp(min=0)) & (packed.index >= 0)
            engine.begin_prefill(visual, packed.attention_mask, real_out, pending.visual_kept)
            for probe in self.text_probes.values():
                probe.active = True
            try:
                out = original(**kwargs)
            finally:
                engine.end_prefill()
                for probe in self.text_probes.values():
                    probe.active = False
                    probe.clear()
            layer_counts = engine.visual_counts()
        else:
            out = original(**kwargs)
        self._last_raw = (pending, packed.index, real_out, layer_counts)
        self._last = None
        cache = getattr(out, "cache", None)
        self._prefix = None
        if cache is not None:
            self._prefix = Prefix(
                weakref.ref(cache),
                orig_len=pending.keep.shape[1],
                kept_len=packed.inputs_embeds.shape[1],
                mask=packed.attention_mask,
                shift=packed.shift,
            )
        return out

    @property
    def last(self) -> list[SampleSelection] | None:
        """Per-sample :class:`~vtprune.runtime.selection.SampleSelection` of the latest pruned prefill (built on first
        access, so that the forward pass itself never waits for the GPU)."""
        if self._last is None and self._last_raw is not None:
            pending, index, real_out, layer_counts = self._last_raw
            kept_visual = kept_visual_indices(pending.keep, pending.image_mask)
            n_layers = len(self.family.decoder_layers)
            per_layer = layer_counts.tolist() if layer_counts is not None else None
            self._last = [
                SampleSelection(
                    kept_visual=kept_visual[b],
                    kept_columns=index[b][index[b] >= 0].cpu(),
                    visual_in=pending.visual_in[b],
                    visual_out=pending.visual_kept[b],
                    tokens_in=pending.real_in[b],
                    tokens_out=real_out[b],
                    layer_visual=per_layer[b]
                    if per_layer is not None
                    else [pending.visual_kept[b]] * n_layers,
                )
                for b in range(len(real_out))
            ]
        return self._last


def _per_sample(per_image: list[int], sizes: list[int], visual_in: list[int]) -> list[int]:
    """Sum per-image counts into per-sample counts (images fill samples in placeholder order)."""
    out, image = [], 0
    for n in visual_in:
        total, covered = 0, 0
        while covered < n:
            covered += sizes[image]
            total += per_image[image]
            image += 1
        if covered != n:
            raise UsageError(
                "an image's visual tokens are split across samples; check the placeholder tokens"
            )
        out.append(total)
    return out


def _passthrough_mask(*, attention_mask=None, **_):
    """Keep generate()'s 2-D mask: the language model forward translates it and builds the 4-D one."""
    return attention_mask
