"""The runtime object ``vtprune.wrap`` attaches to a model: patches, per-call state, and what was kept.

Three instance-level patches carry the whole mechanism (``unwrap`` removes them):

* ``model.model.get_image_features``: after the vision encoder ran, attach each image's token scores to
  its feature tensor (``feature._vtprune_score``), so they travel with features that ``generate()``
  pre-encodes, expands for beams, or the caller passes back as ``mm_encoder_outputs``.
* ``model.model.forward``: at prefill, encode images if needed, score and select the kept visual tokens.
* ``model.model.language_model.forward``: at prefill, gather the kept tokens (embeddings, 2-D mask,
  position ids) before the first decoder layer; afterwards translate the caller's original-coordinate
  mask and positions to the shorter cache.

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

from .config import PruneConfig
from .integrations import get_integration
from .layers import LayerEngine
from .methods import get_method
from .patching import Patcher
from .probe import AttentionProbe
from .selection import SampleSelection, select_visual_tokens
from .sequence import Prefix, cache_length, compact

__all__ = ["Pruner"]


@dataclass
class _Pending:
    """Selection made by the multimodal forward, consumed by the language model's forward."""

    keep: torch.Tensor  # (batch, seq) bool
    image_mask: torch.Tensor  # (batch, seq) bool
    kept_visual: list[torch.Tensor]
    visual_in: list[int]


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
        config: the validated method config.
        last: per-sample :class:`~vtprune.selection.SampleSelection` of the latest pruned prefill.
    """

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.model = model
        self.config = config
        self.integration = get_integration(model)
        self.integration.check(config)
        self.spec = get_method(config)
        self.scorer = self.spec.make_scorer(config) if self.spec.stage == "pre" else None
        self.engine: LayerEngine | None = None
        self.text_probes: dict[int, AttentionProbe] = {}
        positions = getattr(config, "positions", "auto")
        positions = positions if positions != "auto" else self.integration.default_positions
        self.contiguous = positions == "contiguous"
        self.probe: AttentionProbe | None = None
        self.patcher = Patcher()
        self.last: list[SampleSelection] | None = None
        self._pending: _Pending | None = None
        self._prefix: Prefix | None = None

    # ----------------------------------------------------------------------------------------- patches
    def attach(self) -> None:
        integration = self.integration
        inner, lm = integration.inner, integration.language_model
        try:
            if self.spec.probe is not None:
                module, kind = integration.probe_target(self.config, self.spec.probe)
                self.probe = AttentionProbe(module, kind)
                self.probe.attach(self.patcher)
            if self.spec.stage == "layers":
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
        layers = self.integration.decoder_layers
        plan = self.spec.make_plan(self.config, len(layers), model=self.model)
        self.engine = LayerEngine(plan, len(layers), self.integration.language_model.config)
        for idx in plan.probe_layers:
            probe = AttentionProbe(layers[idx].self_attn, plan.probe_kind, active=False)
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
        if self.probe is not None and features is not None:
            try:
                scores = self.integration.image_scores(
                    self.probe.records, list(features), _bind(original, args, kwargs)
                )
            finally:
                self.probe.clear()
            for feature, score in zip(features, scores):
                feature._vtprune_score = score
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
            raise ValueError(
                "vtprune needs input_ids (with image placeholder tokens) to locate visual tokens"
            )

        if mm.get("image") is None:
            # Encode here, as generate() does, so that both paths read scores from the features.
            encode = self.integration.inner.get_image_features
            params = inspect.signature(encode).parameters
            encode_kwargs = {k: kwargs[k] for k in params if k != "kwargs" and kwargs.get(k) is not None}
            mm["image"] = encode(**encode_kwargs, return_dict=True)
            kwargs["pixel_values"] = None
            kwargs["mm_encoder_outputs"] = mm

        features = list(mm["image"].pooler_output)
        if features and features[0].ndim == 3:  # a (num_images, tokens, dim) tensor
            features = [f for batch in features for f in batch]
        sizes = [f.shape[0] for f in features]
        probe_scores = None
        if self.spec.probe is not None:
            probe_scores = [getattr(f, "_vtprune_score", None) for f in features]
            if any(s is None for s in probe_scores):
                raise ValueError(
                    "these image features carry no vtprune scores: they were encoded before vtprune.wrap or "
                    "sliced (chunked prefill); pass pixel_values, or encode after wrapping"
                )
        image_mask = input_ids == self.integration.image_token_id
        if self.scorer is not None:
            scores = self.scorer(probe_scores, sizes)
            keep, kept_visual = select_visual_tokens(image_mask, scores, self.config.keep_ratio)
        else:  # in-LLM methods: the LLM input keeps every visual token
            keep = torch.ones_like(image_mask)
            kept_visual = [torch.arange(int(n)) for n in image_mask.sum(-1).tolist()]
        self._pending = _Pending(keep, image_mask, kept_visual, image_mask.sum(-1).tolist())
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
            raise ValueError("vtprune needs the 2-D padding mask at prefill (got a prepared 4-D/dict mask)")
        packed = compact(embeds, attention_mask, kwargs.get("position_ids"), pending.keep, self.contiguous)
        kwargs.update(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(pending.keep)
        engine = self.engine
        if engine is not None:
            image_mask = pending.image_mask
            visual = torch.gather(image_mask, 1, packed.index.clamp(min=0)) & (packed.index >= 0)
            engine.begin_prefill(visual, packed.attention_mask)
            for probe in self.text_probes.values():
                probe.active = True
            try:
                out = original(**kwargs)
            finally:
                engine.end_prefill()
                for probe in self.text_probes.values():
                    probe.active = False
                    probe.clear()
            layer_visual = engine.visual_counts().tolist()
        else:
            out = None
            n_layers = len(self.integration.decoder_layers)
            layer_visual = [[len(v)] * n_layers for v in pending.kept_visual]
        self.last = [
            SampleSelection(
                kept_visual=pending.kept_visual[b],
                kept_columns=packed.index[b][packed.index[b] >= 0].cpu(),
                visual_in=pending.visual_in[b],
                visual_out=int(pending.kept_visual[b].numel()),
                tokens_in=int(real[b].sum()),
                tokens_out=int(packed.attention_mask[b].sum()),
                layer_visual=layer_visual[b],
            )
            for b in range(pending.keep.shape[0])
        ]
        if out is None:
            out = original(**kwargs)
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


def _passthrough_mask(*, attention_mask=None, **_):
    """Keep generate()'s 2-D mask: the language model forward translates it and builds the 4-D one."""
    return attention_mask
