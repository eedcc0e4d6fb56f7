"""The runtime object ``vtprune.wrap`` attaches to a model: patches, per-call state, and what was kept.

It names no method and no family: the method's :class:`~vtprune.runtime.parts.MethodParts` say what runs,
the family's :class:`~vtprune.integrations.Integration` says where things are. Three instance-level
patches carry the whole mechanism (``unwrap`` removes them):

* ``get_image_features`` of the multimodal base model (and the encoder of every further modality the family
  prunes, ``get_video_features`` on Qwen-VL; :meth:`~vtprune.integrations.Integration.modalities`): after the
  vision encoder ran, attach each budget unit's token scores to its feature tensor
  (``feature._vtprune_score``), so they travel with features that ``generate()`` pre-encodes, expands for
  beams, or the caller passes back as ``mm_encoder_outputs`` (an encoder that returns one stacked tensor
  hands out its rows as a list while wrapped).
* the base model's ``forward``: at prefill, encode images if needed, score and select the kept visual
  tokens (the method's scorer and keep rule).
* the language model's ``forward``: at prefill, gather the kept tokens (embeddings, 2-D mask, position
  ids) before the first decoder layer; afterwards translate the caller's original-coordinate mask and
  positions to the shorter cache. The method's layer plan, if any, runs inside (each decoder layer is
  patched too).

``model.create_masks_for_generate`` is also shadowed: for static caches ``generate()`` would otherwise
build a 4-D mask in original coordinates, which cannot describe the compact cache. At a decoding step on a
cache a pruned prefill filled it builds the compact 4-D mask instead (outside the model's forward, where
``generate()`` compiles nothing), so that the forward itself - the part ``generate()`` compiles for static
caches - reads no cache length, syncs nothing with the device and sees the same shapes at every step.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PruneConfig
from ..errors import UnsupportedError, UsageError
from ..kernels.gather import take_columns
from ..registry import get_family, method_parts
from .adapters import AdapterContext, pad_per_sample
from .compact import Prefix, cache_length, compact, compact_view, padded_length, prefix_of
from .layer_drop import LayerEngine
from .parts import VisualUnit, compose
from .patching import Patcher
from .probe import AttentionProbe
from .selection import SampleSelection, frame_floor, kept_visual_indices, select_visual_tokens
from .timing import Stopwatch
from .visual_inputs import take_visual_rows

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
    # a transform's new rows (kept visual tokens, hidden), in placeholder order
    rows: torch.Tensor | None = None
    # adapters: every sample's unpruned visual features, zero-padded, and their mask
    aside: tuple[torch.Tensor, torch.Tensor] | None = None
    # the layer plan's decisions to reuse (a later forward of the same generate() call), or None
    replay: list | None = None


@dataclass
class _Call:
    """One ``generate()`` call in progress: one selection per sample for all its steps and beams.

    Pre-LLM scores travel with the encoded features (every beam and step of a call reuses the same
    tensors). The layer plan decides from the prompt's hidden states, so the call records the decisions of
    its first pruned prefill, and a later prefill of the same call over that prompt followed by generated
    tokens (``use_cache=False`` re-feeds the whole sequence at every step) reuses them instead of deciding
    again from a longer sequence.
    """

    prompt: torch.Tensor | None = None  # (batch, seq) input ids of the first pruned prefill
    real: torch.Tensor | None = None  # its 2-D padding mask, or None
    decisions: list | None = None  # the engine's decisions of that prefill

    def reuse(self, input_ids: torch.Tensor, real: torch.Tensor | None) -> list | None:
        """The recorded decisions when ``input_ids`` extends the recorded prompt, else None (and the first
        call's prompt is noted, to be recorded with its decisions)."""
        if self.decisions is None:
            self.prompt, self.real = input_ids, real
            return None
        n = self.prompt.shape[1]
        if input_ids.shape[0] != self.prompt.shape[0] or input_ids.shape[1] < n:
            return None
        if (real is None) != (self.real is None) or not torch.equal(input_ids[:, :n], self.prompt):
            return None
        if real is not None and not torch.equal(real[:, :n], self.real):
            return None
        return self.decisions


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
        # Selection overhead (vtprune eval's selection_ms): the method's scoring and selection run as timed
        # regions - its scorer / transform here, probes, the keep rule and the layer plan where they run.
        self.stopwatch = Stopwatch()
        self.parts = dataclasses.replace(
            self.parts,
            scorer=self.stopwatch.timed(self.parts.scorer),
            transform=self.stopwatch.timed(self.parts.transform),
        )
        multiples = {c.pad_to_multiple_of for c in configs} - {None}
        if len(multiples) > 1:
            raise UsageError(
                f"composed configs ask for different pad_to_multiple_of {sorted(multiples)}; set it on one"
            )
        self.pad_multiple = multiples.pop() if multiples else None
        self.engine: LayerEngine | None = None
        self.text_probes: dict[int, AttentionProbe] = {}
        self.contiguous = self.family.resolve_positions(self.parts.positions) == "contiguous"
        self.budget = self.family.resolve_budget(self.parts.budget)
        self.probe: AttentionProbe | None = None
        self.patcher = Patcher()
        self._last: list[SampleSelection] | None = None
        self._last_raw = None
        self._out_cols: torch.Tensor | None = None  # latest prefill: LM-input columns of its output, or None
        self._pending: _Pending | None = None
        self._prefix: Prefix | None = None
        self._call: _Call | None = None  # the generate() call in progress
        self._decode_ready = False  # generate() prepared the next call's compact 4-D mask
        self._mark = object()  # tags the scores this pruner attached to features
        self.modalities = self.family.modalities()  # images first; videos where the family prunes them
        self._encoding = False  # inside an encoder call (one encoder may call another)
        # adapters: features kept aside by the latest prefill, its context while it runs, a layer's input
        self._aside: tuple[torch.Tensor, torch.Tensor] | None = None
        self._adapter_ctx: AdapterContext | None = None
        self._residual: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------- patches
    def attach(self) -> None:
        family, parts = self.family, self.parts
        inner, lm = family.base_model, family.language_model
        try:
            if parts.probe is not None:
                module = family.vision_tower().attention_modules()[parts.probe.layer]
                self.probe = AttentionProbe(module, parts.probe.statistic)
                self.probe.record = self.stopwatch.timed(self.probe.record)
                self.probe.attach(self.patcher)
            if parts.plan is not None:
                self._attach_layers()
                self._attach_side_consumer()
            if parts.adapters is not None:
                self._attach_adapters()
            self._patch_method(inner, "get_image_features", self._get_image_features)
            for modality in self.modalities[1:]:  # e.g. get_video_features
                self._patch_method(inner, modality.encoder, functools.partial(self._encode, modality))
            self._patch_method(inner, "forward", self._multimodal_forward)
            self._patch_method(lm, "forward", self._language_forward)
            self._patch_method(self.model, "generate", self._generate)
            self._patch_method(self.model, "forward", self._model_forward)
            self.patcher.set_attr(self.model, "create_masks_for_generate", self._masks_for_generate)
            # Copies: copy.deepcopy and pickle look these up on the instance (nn.Module defines neither
            # __deepcopy__ nor its own __reduce_ex__); a copy is the unpatched model, wrapped anew.
            self.patcher.set_attr(self.model, "__deepcopy__", self._deepcopy_model)
            self.patcher.set_attr(self.model, "__reduce_ex__", self._reduce_model)
            self.patcher.set_attr(self.model, "_vtprune", self)
        except BaseException:
            self.patcher.restore()
            raise

    def _attach_layers(self) -> None:
        layers = self.family.decoder_layers
        plan = self.parts.plan
        self.engine = LayerEngine(
            plan, len(layers), self.family.language_model.config, pad_multiple=self.pad_multiple
        )
        for idx in plan.probe_layers:
            probe = AttentionProbe(layers[idx].self_attn, plan.probe_statistic, active=False)
            probe.record = self.stopwatch.timed(probe.record)
            probe.attach(self.patcher)
            self.text_probes[idx] = probe
        self.engine.probes = self.text_probes
        self.engine.stopwatch = self.stopwatch
        for idx, layer in enumerate(layers):
            self._patch_method(layer, "forward", functools.partial(self._decoder_layer, idx))

    def _attach_side_consumer(self) -> None:
        """The language model's method that reads per-visual-position inputs between decoder layers
        (:mod:`vtprune.runtime.visual_inputs`): patched so that it sees them sliced to the tokens left."""
        side = self.family.visual_side_inputs()
        if side is not None and side.consumer is not None:
            self._patch_method(self.family.language_model, side.consumer, self._side_consumer)

    def _side_consumer(self, original, *args, **kwargs):
        engine, side = self.engine, self.family.visual_side_inputs()
        if engine is None or not engine.prefilling or engine.current is None:
            return original(*args, **kwargs)
        kwargs = _bind(original, args, kwargs)
        mask_arg, rows_arg = side.consumer_args
        # The mask and rows are in the LM input's columns (sliced at compaction); the engine's current
        # index maps the layers' shorter sequence to those columns.
        kwargs[mask_arg], kwargs[rows_arg] = take_visual_rows(
            kwargs[mask_arg], kwargs[rows_arg], engine.current.index
        )
        return original(**kwargs)

    def _attach_adapters(self) -> None:
        layers = self.family.decoder_layers
        for idx, module in sorted(self.parts.adapters.modules.items()):
            if not 0 <= idx < len(layers):
                raise UsageError(f"an adapter is meant for decoder layer {idx}; the model has {len(layers)}")
            self._patch_method(layers[idx], "forward", self._adapter_layer)
            self._patch_method(
                layers[idx].self_attn, "forward", functools.partial(self._adapter_attention, module)
            )

    def detach(self) -> None:
        self.patcher.restore()
        self._pending = self._prefix = None
        self._aside = self._adapter_ctx = self._residual = None
        self.probe = self.engine = None
        self.text_probes = {}

    def _decoder_layer(self, idx, original, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("vtprune expects decoder layers to be called as layer(hidden_states, **kwargs)")
        return self.engine.run_layer(idx, original, hidden_states, kwargs)

    def _adapter_layer(self, original, hidden_states, *args, **kwargs):
        self._residual = hidden_states  # the residual stream the self-attention output is added to
        try:
            return original(hidden_states, *args, **kwargs)
        finally:
            self._residual = None

    def _adapter_attention(self, module, original, *args, **kwargs):
        out = original(*args, **kwargs)
        context = self._adapter_context(kwargs)
        if context is None or self._residual is None:
            return out
        attn = out[0] if isinstance(out, tuple) else out
        attn = attn + module(self._residual + attn, context)
        return (attn, *out[1:]) if isinstance(out, tuple) else attn

    def _adapter_context(self, kwargs) -> AdapterContext | None:
        """The current call's context: the prefill's (with the tokens a layer plan left), a later call's on
        the cache that prefill filled, or None (the call continues no pruned prefill)."""
        ctx = self._adapter_ctx
        if ctx is not None:
            engine = self.engine
            if engine is not None and engine.prefilling and engine.current is not None:
                return dataclasses.replace(
                    ctx, visual=engine.current.visual, real=engine.current.mask2d.bool()
                )
            return ctx
        prefix = prefix_of(_cache_of(kwargs))  # the features kept aside by the prefill that filled it
        if prefix is None or prefix.aside is None or prefix.owner() is not self:
            return None
        return AdapterContext(prefix.aside[0], prefix.aside[1], prefill=False)

    def _patch_method(self, obj, name, impl) -> None:
        original = getattr(obj, name)

        # functools.wraps keeps the signature visible: generate() inspects get_image_features' parameters.
        @functools.wraps(original)
        def patched(*args, **kwargs):
            return impl(original, *args, **kwargs)

        self.patcher.set_attr(obj, name, patched)

    def _generate(self, original, *args, **kwargs):
        outer, self._call = self._call, _Call()
        try:
            return original(*args, **kwargs)
        finally:
            self._call = outer
            self._decode_ready = False

    def _masks_for_generate(self, *, attention_mask=None, cache=None, is_first_iteration=False, **kwargs):
        """``generate()``'s mask preparation for compilable (static) caches, outside the model forward.

        A prefill (or a later prompt continuing a cache) keeps the 2-D mask: the language model forward
        translates it. A decoding step on a cache this wrap's prefill filled gets the compact 4-D mask,
        built as the model would build it for the shorter cache, and the forward takes it as is (see
        :meth:`_decode_step`): the original mask's width and the prefix give the compact length on the host,
        with no read of the cache's (device) length."""
        prefix = prefix_of(cache)
        self._decode_ready = False
        if (
            is_first_iteration
            or prefix is None
            or prefix.owner() is not self
            or not isinstance(attention_mask, torch.Tensor)
            or attention_mask.ndim != 2
        ):
            return attention_mask
        q_len = kwargs["inputs_embeds"].shape[1]
        new = attention_mask.shape[1] - prefix.orig_len - q_len
        mask2d, _ = prefix.translate(attention_mask, None, q_len, prefix.kept_len + new)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            position_ids = position_ids - prefix.shift.to(position_ids.device)[:, None]
        creator = getattr(type(self.model), "create_masks_for_generate", None)
        if creator is None:
            from transformers.masking_utils import create_masks_for_generate as creator
        else:
            creator = creator.__get__(self.model)
        with compact_view():
            mask = creator(
                attention_mask=mask2d,
                cache=cache,
                position_ids=position_ids,
                is_first_iteration=is_first_iteration,
                **kwargs,
            )
        self._decode_ready = True
        return mask

    # ------------------------------------------------------------------------------------------ copies
    def _deepcopy_model(self, memo: dict) -> nn.Module:
        """``copy.deepcopy(model)``: a deep copy of the unpatched model, wrapped anew with a copy of the
        config (its own Pruner, patches bound to its own modules). References to the original's modules
        and to this pruner met in the same ``deepcopy`` call map to the copy's."""
        view, clones = self.patcher.unpatched(self.model)
        copied = copy.deepcopy(view, memo)
        for key, clone in clones.items():
            memo[key] = memo[id(clone)]
        pruner = Pruner(copied, copy.deepcopy(self.config, memo))
        pruner.attach()
        memo[id(self)] = pruner
        return copied

    def _reduce_model(self, protocol):
        """``pickle`` / ``torch.save(model)`` / ``copy.copy``: the unpatched model (sharing every tensor and
        unpatched module; nothing is copied) and the config; loading wraps it again."""
        return _rewrap, (self.patcher.unpatched(self.model)[0], self.config)

    def __deepcopy__(self, memo: dict) -> Pruner:
        if self.model.__dict__.get("_vtprune") is not self:  # unwrapped: an unattached copy
            return Pruner(copy.deepcopy(self.model, memo), copy.deepcopy(self.config, memo))
        if id(self) not in memo:
            copy.deepcopy(self.model, memo)  # a pruner is copied with its model
        return memo[id(self)]

    def __reduce_ex__(self, protocol):
        if self.model.__dict__.get("_vtprune") is not self:
            raise TypeError("this Pruner's model was unwrapped; pickle the model instead")
        return get_pruner_of, (self.model,)

    # ---------------------------------------------------------------------------------- vision encoder
    def _get_image_features(self, original, *args, **kwargs):
        return self._encode(self.modalities[0], original, *args, **kwargs)

    def _encode(self, modality, original, *args, **kwargs):
        """An encoder call of one modality (images, videos): score its budget units and attach the scores."""
        if self._encoding:  # an encoder calling another (Qwen3-VL's videos): the outer call scores
            return original(*args, **kwargs)
        if self.probe is not None:
            self.probe.clear()
        self._encoding = True
        try:
            out = original(*args, **kwargs)
        finally:
            self._encoding = False
        features = getattr(out, "pooler_output", None)
        if features is None or not self.parts.pre_llm:
            return out
        if isinstance(features, torch.Tensor):
            # One stacked tensor (InternVL: a row per tile): hand it out as a list of rows, the layout whose
            # tensors generate()'s beam expansion keeps (it re-stacks a tensor), so the scores riding on
            # them survive; the multimodal forward stacks them back for the model (_restack).
            features = out.pooler_output = list(features.unbind(0))
            out._vtprune_stacked = True
        units = self.family.budget_units(features)
        encode_args = modality.layout_args(_bind(original, args, kwargs))
        groups = self.family.token_groups(units, encode_args, self.budget)
        for unit, frames in zip(units, self.family.token_frames(units, encode_args)):
            unit._vtprune_frames = frames  # the per-frame floor of a budget over several frames
        if self.parts.prompt_scorer:  # scored by the multimodal forward, which knows the prompt
            for unit, group in zip(units, groups):
                unit._vtprune_groups, unit._vtprune_grouped = group, self._mark
            return out
        scores = [None] * len(units)
        if self.probe is not None:
            try:
                with self.stopwatch:
                    scores = self.family.token_scores(self.probe.records, units, encode_args)
            finally:
                self.probe.clear()
        if self.parts.transform is not None:  # a transform reads each unit's grid, groups, probe scores
            for unit, grid, score, group in zip(
                units, self.family.token_grids(units, encode_args), scores, groups
            ):
                unit._vtprune_grid, unit._vtprune_score, unit._vtprune_groups = grid, score, group
                unit._vtprune_mark = self._mark
            return out
        self._score(units, scores, groups)
        return out

    def _score(self, units, probe_scores, groups) -> None:
        """Run the scorer once per encoded unit and attach its scores (marked as this pruner's) to the
        feature tensors: every later use of the same tensors - the beams and returned sequences
        ``generate()`` expands them into, the whole sequence re-fed at each step without a cache - selects
        the same tokens. A new encoding (a later ``generate()`` call) scores again."""
        scores = self.parts.scorer([VisualUnit(*a) for a in zip(units, probe_scores, groups)])
        for unit, score, group in zip(units, scores, groups):
            unit._vtprune_score = score
            unit._vtprune_groups = group
            unit._vtprune_mark = self._mark

    # ------------------------------------------------------------------------------ multimodal forward
    def _multimodal_forward(self, original, *args, **kwargs):
        kwargs = _bind(original, args, kwargs)
        mm = dict(kwargs.get("mm_encoder_outputs") or {})
        if (kwargs.get("pixel_values_videos") is not None or mm.get("video") is not None) and "video" not in {
            m.name for m in self.modalities
        }:
            raise UnsupportedError(
                f"vtprune does not prune {self.family.model.config.model_type} videos yet (their tokens would "
                "pass unpruned and be counted as text); call vtprune.unwrap(model) for video inputs, or use a "
                "Qwen-VL model (video supported)"
            )
        mods = [m for m in self.modalities if kwargs.get(m.pixels) is not None or mm.get(m.name) is not None]
        if not mods:
            return original(**kwargs)
        cache = _cache_of(kwargs)
        if cache_length(cache) > 0:
            ids = kwargs.get("input_ids")
            new_images = ids is not None and any(bool((ids == m.token_id).any()) for m in mods)
            if prefix_of(cache) is not None and not new_images:
                raise UsageError(
                    "this call continues a cache that already holds the conversation's (pruned) images: pass "
                    "input_ids and attention_mask of the whole conversation with the cache, without "
                    "pixel_values or image features (the images are not encoded again)"
                )
            raise UnsupportedError(
                "images fed after a non-empty cache (a new image in a later turn, chunked prefill) cannot be "
                "pruned; start from an empty cache with every image of the conversation, or call "
                "vtprune.unwrap(model) first"
            )
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise UsageError(
                "vtprune needs input_ids (with image placeholder tokens) to locate visual tokens"
            )
        masks = [input_ids == m.token_id for m in mods]
        image_mask = functools.reduce(torch.logical_or, masks)  # every pruned visual token (images, videos)
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

        for modality in mods:
            if mm.get(modality.name) is not None:
                continue
            # Encode here, as generate() does, so that both paths read scores from the features.
            encode = getattr(self.family.base_model, modality.encoder)
            params = inspect.signature(encode).parameters
            encode_kwargs = {k: kwargs[k] for k in params if k != "kwargs" and kwargs.get(k) is not None}
            mm[modality.name] = encode(**encode_kwargs, return_dict=True)
            kwargs[modality.pixels] = None
            kwargs["mm_encoder_outputs"] = mm

        features = self._visual_units(mods, masks, mm)
        sizes = [f.shape[0] for f in features]
        if sum(sizes) != sum(visual_in):
            raise UsageError(
                f"the prompt has {sum(visual_in)} image tokens but the image features have {sum(sizes)}; "
                "the processor and the model disagree on the number of visual tokens per image"
            )
        parts = self.parts
        rows = None
        # Features that never passed the vision hook (encoded before wrap) are laid out from the forward's
        # arguments, which describe one modality at a time.
        layout = mods[0].layout_args(kwargs) if len(mods) == 1 else None
        if parts.scorer is not None:
            unscored = [getattr(f, "_vtprune_mark", None) is not self._mark for f in features]
            if parts.prompt_scorer:
                if any(unscored):
                    self._score_on_prompt(features, layout, input_ids, image_mask, real, visual_in)
            elif any(unscored):
                if parts.probe is not None:
                    raise UsageError(
                        "these image features carry no vtprune scores: they were encoded before vtprune.wrap "
                        "(or under another wrap) or sliced (chunked prefill); pass pixel_values, or encode "
                        "after wrapping"
                    )
                # Scored here, once per distinct tensor (beams share them), as at encoding.
                groups = self.family.token_groups(features, self._layout(layout), self.budget)
                todo = {id(f): (f, g) for f, g, u in zip(features, groups, unscored) if u}
                self._score([f for f, _ in todo.values()], [None] * len(todo), [g for _, g in todo.values()])
            units = self._join_rows(
                [
                    VisualUnit(
                        f,
                        frame_floor(f._vtprune_score, getattr(f, "_vtprune_frames", None)),
                        f._vtprune_groups,
                    )
                    for f in features
                ],
                image_mask,
            )
            with self.stopwatch:
                keep, kept = select_visual_tokens(
                    image_mask,
                    [u.score for u in units],
                    parts.keep,
                    [u.groups for u in units],
                    sum(visual_in),
                )
            visual_kept = _per_sample(kept, [u.size for u in units], visual_in)
        elif parts.transform is not None:
            keep, rows, kept, unit_sizes = self._transform(features, layout, image_mask)
            visual_kept = _per_sample(kept, unit_sizes, visual_in)
        else:  # nothing is selected before the LLM
            keep = torch.ones_like(image_mask)
            visual_kept = list(visual_in)
        aside = pad_per_sample(features, visual_in) if parts.adapters is not None else None
        self._pending = _Pending(keep, image_mask, visual_in, real_in, visual_kept, rows, aside)
        if self.engine is not None and self._call is not None:
            self._pending.replay = self._call.reuse(input_ids, real)
        _restack(kwargs, mm)
        try:
            return original(**kwargs)
        finally:
            self._pending = None
            self._adapter_ctx = None

    def _score_on_prompt(self, features, kwargs, input_ids, image_mask, real, visual_in) -> None:
        """Run a prompt scorer (``MethodParts.prompt_scorer``) on whole budget units, each with its sample's
        text embeddings, and attach each row's share of the scores to its feature tensor (marked as this
        pruner's), so that later forwards of the same ``generate()`` call select the same tokens."""
        if all(getattr(f, "_vtprune_grouped", None) is self._mark for f in features):
            groups = [f._vtprune_groups for f in features]  # read at encoding, with the encoder's args
        else:  # features encoded before wrapping: ask with the forward's args
            groups = self.family.token_groups(features, self._layout(kwargs), self.budget)
        units = self._join_rows([VisualUnit(f, None, g) for f, g in zip(features, groups)], image_mask)
        embed = self.family.base_model.get_input_embeddings()
        text_mask = ~image_mask if real is None else real & ~image_mask
        texts = [embed(input_ids[b][text_mask[b]]) for b in range(input_ids.shape[0])]
        sample, covered = 0, 0  # units fill samples in placeholder order
        for unit in units:
            while covered >= visual_in[sample]:
                sample, covered = sample + 1, 0
            unit.text = texts[sample]
            covered += unit.size
        scores = self.parts.scorer(units)
        rows = iter(zip(features, groups))
        for unit, score in zip(units, scores):
            start = 0
            while start < unit.size:  # the rows joined into this unit, in order
                row, group = next(rows)
                row._vtprune_score = score[start : start + row.shape[0]]
                row._vtprune_groups = group
                row._vtprune_mark = self._mark
                start += row.shape[0]

    @staticmethod
    def _layout(args: dict | None) -> dict:
        if args is None:
            raise UsageError(
                "these image and video features were encoded before vtprune.wrap (or under another wrap): "
                "their layout cannot be read from one call's arguments; pass pixel_values and "
                "pixel_values_videos, or encode after wrapping"
            )
        return args

    def _visual_units(self, mods, masks, mm) -> list[torch.Tensor]:
        """Every budget unit's features (images, videos) in placeholder order over the flattened
        ``(batch, seq)`` prompt, the order of the union mask the selection fills."""
        per_modality = [self.family.budget_units(mm[m.name].pooler_output) for m in mods]
        if len(per_modality) == 1:
            return per_modality[0]
        starts = []
        for units, mask in zip(per_modality, masks):
            where = mask.reshape(-1).nonzero().squeeze(-1)
            sizes = torch.tensor([0] + [int(u.shape[0]) for u in units[:-1]], dtype=torch.long)
            offsets = sizes.cumsum(0)
            if len(units) and int(offsets[-1]) + int(units[-1].shape[0]) != where.numel():
                raise UsageError(
                    f"the prompt has {where.numel()} placeholder tokens of one modality but its features have "
                    f"{sum(int(u.shape[0]) for u in units)}; the processor and the model disagree"
                )
            starts.append(where[offsets.to(where.device)].tolist() if len(units) else [])
        order = sorted(
            ((start, m, i) for m, st in enumerate(starts) for i, start in enumerate(st)), key=lambda x: x[0]
        )
        return [per_modality[m][i] for _, m, i in order]

    def _transform(self, features, kwargs, image_mask):
        """Run the method's transform: the ``(batch, seq)`` keep mask, the new rows of the kept visual
        tokens in placeholder order, and the visual tokens kept per unit (host ints)."""
        if all(getattr(f, "_vtprune_mark", None) is self._mark for f in features):
            grids = [f._vtprune_grid for f in features]
            scores = [f._vtprune_score for f in features]
            groups = [f._vtprune_groups for f in features]
        else:  # features encoded before wrapping: ask with the forward's args
            if self.parts.probe is not None:
                raise UsageError(
                    "these image features carry no vtprune scores: they were encoded before vtprune.wrap "
                    "(or under another wrap) or sliced (chunked prefill); pass pixel_values, or encode "
                    "after wrapping"
                )
            grids = self.family.token_grids(features, self._layout(kwargs))
            # no groups either: a family may need the encoder's arguments for them (LLaVA-NeXT's
            # image_sizes), and the transforms that read groups read probe scores too (refused above)
            scores, groups = [None] * len(features), [None] * len(features)
        units = self._join_rows(
            [VisualUnit(f, s, g, grid) for f, s, g, grid in zip(features, scores, groups, grids)], image_mask
        )
        out = self.parts.transform(units)
        masks, rows, kept = [], [], []
        for unit, (positions, new) in zip(units, out):
            if new.shape[0] != positions.shape[0] or not 0 < positions.shape[0] <= unit.size:
                raise RuntimeError(
                    f"a transform returned {new.shape[0]} rows at {positions.shape[0]} positions for a unit of "
                    f"{unit.size} tokens"
                )
            if (
                positions.device.type == "cpu"
                and positions.numel() > 1
                and not bool((positions.diff() > 0).all())
            ):
                raise RuntimeError("a transform must return each unit's kept positions in ascending order")
            mask = torch.zeros(unit.size, dtype=torch.bool, device=image_mask.device)
            masks.append(mask.index_fill_(0, positions.to(image_mask.device), True))
            rows.append(new)
            kept.append(int(positions.shape[0]))
        keep = image_mask.logical_not().masked_scatter(image_mask, torch.cat(masks))
        return keep, torch.cat(rows), kept, [u.size for u in units]

    def _join_rows(self, units: list[VisualUnit], image_mask: torch.Tensor) -> list[VisualUnit]:
        """Join consecutive feature rows into the family's budget units (``Integration.unit_rows``: e.g. all
        tiles of one InternVL image). Features and scores are concatenated; groups are None when no row has
        any (one budget over the joined unit), else each row's groups (a row without: one group) offset past
        the tokens before it; a grid survives only for a unit of one row."""
        counts = self.family.unit_rows([u.features for u in units], image_mask)
        if all(c == 1 for c in counts):
            return units
        if sum(counts) != len(units) or min(counts) < 1:
            raise UsageError(
                f"the prompt's images span {sum(counts)} feature rows but the encoder returned {len(units)}"
            )
        joined, start = [], 0
        for count in counts:
            part = units[start : start + count]
            start += count
            if count == 1:
                joined.append(part[0])
                continue
            score = None if any(u.score is None for u in part) else torch.cat([u.score for u in part])
            groups, offset = None, 0
            if any(u.groups is not None for u in part):
                device = next(u.groups for u in part if u.groups is not None).device
                groups = []
                for u in part:
                    g = u.groups
                    if g is None:
                        g = torch.zeros(u.size, dtype=torch.long, device=device)
                    groups.append(torch.where(g >= 0, g + offset, g))
                    offset += u.size
                groups = torch.cat(groups)
            joined.append(VisualUnit(torch.cat([u.features for u in part]), score, groups))
        return joined

    # -------------------------------------------------------------------------------- language model
    def _language_forward(self, original, *args, **kwargs):
        kwargs = _bind(original, args, kwargs)
        cache = _cache_of(kwargs)
        if self._decode_ready and self._pending is None:
            return self._decode_step(original, kwargs, cache)
        past = cache_length(cache)
        pending, self._pending = self._pending, None
        with compact_view():  # inside the language model a pruned cache reports what it holds
            if pending is not None and past == 0:
                return self._prefill(original, kwargs, pending)
            prefix = prefix_of(cache)
            if prefix is not None and past > 0:
                # A later call on a cache a pruned prefill filled (a decoding step, a later turn): the
                # prefix travels with the cache, so any such cache continues, whatever ran in between.
                if prefix.owner() is not self:
                    raise UsageError(
                        "this cache holds a prompt pruned by another vtprune wrap (another model, or this "
                        "model before it was unwrapped); continue it on the model that filled it, or start "
                        "from an empty cache"
                    )
                embeds = kwargs.get("inputs_embeds")
                q_len = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
                kwargs["attention_mask"], kwargs["position_ids"] = prefix.translate(
                    kwargs.get("attention_mask"), kwargs.get("position_ids"), q_len, past
                )
                if self.engine is not None:
                    self.engine.begin_decode(kwargs["attention_mask"], prefix.layer_masks, prefix.kept_len)
                    try:
                        return original(**kwargs)
                    finally:
                        self.engine.end_decode()
            elif prefix is not None:  # emptied (a reset static cache) and now filled without pruning
                Prefix.detach(cache)
            return original(**kwargs)

    def _decode_step(self, original, kwargs, cache):
        """A decoding step ``generate()`` prepared (:meth:`_masks_for_generate`): the mask is the compact 4-D
        one already; positions move down by the prefix's shift. Reads no host value off the device and
        branches on nothing but Python state, so ``torch.compile`` captures it in the model's graph."""
        self._decode_ready = False
        prefix = prefix_of(cache)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            kwargs["position_ids"] = position_ids - prefix.shift.to(position_ids.device)[:, None]
        with compact_view():
            if self.engine is None:
                return original(**kwargs)
            self.engine.begin_decode(None, prefix.layer_masks, prefix.kept_len, prepared=True)
            try:
                return original(**kwargs)
            finally:
                self.engine.end_decode()

    def _prefill(self, original, kwargs, pending: _Pending):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("expected inputs_embeds from the multimodal forward")
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim != 2):
            raise UsageError("vtprune needs the 2-D padding mask at prefill (got a prepared 4-D/dict mask)")
        real_out = [r - v + k for r, v, k in zip(pending.real_in, pending.visual_in, pending.visual_kept)]
        if pending.rows is not None:  # a transform's new rows replace the features at the kept placeholders
            written = (pending.keep & pending.image_mask).unsqueeze(-1)
            embeds = embeds.masked_scatter(
                written.to(embeds.device), pending.rows.to(embeds.device, embeds.dtype)
            )
        packed = compact(
            embeds,
            attention_mask,
            kwargs.get("position_ids"),
            pending.keep,
            self.contiguous,
            size=padded_length(max(real_out), self.pad_multiple, embeds.shape[1]),
        )
        kwargs.update(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        side = self.family.visual_side_inputs()
        if side is not None and kwargs.get(side.mask) is not None:
            mask, rows = kwargs[side.mask], [kwargs.get(name) for name in side.rows]
            kwargs[side.mask], rows = take_visual_rows(mask, rows, packed.index)
            kwargs.update(zip(side.rows, rows))
        self._aside = pending.aside  # read by the adapters at this prefill and at later calls on its cache
        if pending.aside is not None:
            visual = torch.gather(pending.image_mask, 1, packed.index.clamp(min=0)) & (packed.index >= 0)
            self._adapter_ctx = AdapterContext(
                *pending.aside, visual=visual, real=packed.attention_mask.bool()
            )
        engine = self.engine
        layer_counts = None
        if engine is not None:
            visual = torch.gather(pending.image_mask, 1, packed.index.clamp(min=0)) & (packed.index >= 0)
            engine.begin_prefill(visual, packed.attention_mask, real_out, pending.visual_kept, pending.replay)
            for probe in self.text_probes.values():
                probe.active = pending.replay is None  # a reused decision needs no attention
            try:
                out = original(**kwargs)
            finally:
                engine.end_prefill()
                for probe in self.text_probes.values():
                    probe.active = False
                    probe.clear()
            layer_counts = engine.visual_counts()
            if self._call is not None and self._call.decisions is None:
                self._call.decisions = list(engine.decisions)  # the call's first prefill
        else:
            out = original(**kwargs)
        self._last_raw = (pending, packed.index, real_out, layer_counts)
        # An in-LLM plan returns only the tokens that reached the last layer: their LM-input columns.
        self._out_cols = engine.layer_index[-1] if engine is not None and engine.layer_index else None
        self._last = None
        cache = getattr(out, "cache", None)
        self._prefix = None
        if cache is not None:
            self._prefix = Prefix(
                weakref.ref(self),
                orig_len=pending.keep.shape[1],
                kept_len=packed.inputs_embeds.shape[1],
                mask=packed.attention_mask,
                shift=packed.shift,
                layer_masks=list(engine.prompt_masks) if engine is not None else None,
                aside=pending.aside,
            )
            self._prefix.attach(cache)  # the cache now reports its length in original coordinates
        return out

    # ----------------------------------------------------------------------------------- labels, loss
    def _model_forward(self, original, *args, **kwargs):
        """The model's own forward. Its ``logits`` cover the columns the language model returned (see
        :class:`~vtprune.runtime.selection.SampleSelection`, ``output_columns``); ``labels`` are given in
        original coordinates, so after a pruned prefill the loss is computed here, over those columns, each
        predicting the label of the next token the language model saw (as the unwrapped model computes it
        on the kept sequence)."""
        if not args and kwargs.get("labels") is None:
            return original(**kwargs)
        kwargs = _bind(original, args, kwargs)
        labels = kwargs.get("labels")
        if labels is None:
            return original(**kwargs)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.model.config, "return_dict", True)
        before = self._last_raw
        out = original(**(kwargs | {"labels": None}), return_dict=True)
        named = {
            name
            for name, p in inspect.signature(original).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        loss_kwargs = {k: v for k, v in kwargs.items() if k not in named}  # what the model hands its loss
        logits = out.logits
        if self._last_raw is not before:  # this forward pruned its prompt
            if loss_kwargs.get("shift_labels") is not None:
                raise UsageError(
                    "pass labels (original coordinates) to a wrapped model, not shift_labels: vtprune shifts "
                    "them to the tokens the language model kept"
                )
            input_ids = kwargs.get("input_ids")
            if input_ids is not None and tuple(labels.shape) != tuple(input_ids.shape):
                raise UsageError(
                    f"labels have shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}: pass one "
                    "label per prompt token (original coordinates, -100 where no loss is wanted)"
                )
            shifted = self._next_token_labels(labels.to(logits.device))[:, -logits.shape[1] :]
            loss_kwargs["shift_labels"] = shifted
            labels = shifted
        loss = self.model.loss_function(
            logits=logits, labels=labels, vocab_size=logits.shape[-1], **loss_kwargs
        )
        out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        return out if return_dict else out.to_tuple()

    def _output_index(self, index: torch.Tensor) -> torch.Tensor:
        """``(batch, K_out)`` original column of each column the latest prefill returned, -1 at padding."""
        if self._out_cols is None:
            return index
        return take_columns(index, self._out_cols.to(index.device), -1)

    def _next_token_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``(batch, K_out)``: for each column the latest prefill returned, the label (original coordinates
        ``labels``) of the next token the language model saw; -100 after the last token and at padding."""
        _, index, _, _ = self._last_raw
        index = index.to(labels.device)
        seen = take_columns(labels, index, -100)  # the label of every LM-input column
        nxt = torch.nn.functional.pad(seen[:, 1:], (0, 1), value=-100)
        nxt = nxt.masked_fill(index < 0, -100)  # nothing is predicted from padding
        if self._out_cols is not None:
            nxt = take_columns(nxt, self._out_cols.to(labels.device), -100)
        return nxt

    @property
    def last(self) -> list[SampleSelection] | None:
        """Per-sample :class:`~vtprune.runtime.selection.SampleSelection` of the latest pruned prefill (built on first
        access, so that the forward pass itself never waits for the GPU)."""
        if self._last is None and self._last_raw is not None:
            pending, index, real_out, layer_counts = self._last_raw
            output = self._output_index(index)
            kept_visual = kept_visual_indices(pending.keep, pending.image_mask)
            n_layers = len(self.family.decoder_layers)
            per_layer = layer_counts.tolist() if layer_counts is not None else None
            self._last = [
                SampleSelection(
                    kept_visual=kept_visual[b],
                    kept_columns=index[b][index[b] >= 0].cpu(),
                    output_columns=output[b][output[b] >= 0].cpu(),
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


def _restack(kwargs: dict, mm: dict) -> None:
    """Give the model back the one stacked tensor its encoder returned, where the vision hook handed out its
    rows as a list (a copy of the encoder output: the caller's keeps its rows for later steps and beams)."""
    image = mm.get("image")
    if getattr(image, "_vtprune_stacked", False) and not isinstance(image.pooler_output, torch.Tensor):
        mm["image"] = dataclasses.replace(image, pooler_output=torch.stack(list(image.pooler_output)))
        kwargs["mm_encoder_outputs"] = mm


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


def _rewrap(model: nn.Module, config) -> nn.Module:
    """Unpickling (and ``copy.copy``) of a wrapped model: wrap the restored unpatched model again."""
    Pruner(model, config).attach()
    return model


def get_pruner_of(model: nn.Module) -> Pruner:
    """Unpickling of a Pruner: the one its (re-wrapped) model carries."""
    return model.__dict__["_vtprune"]
