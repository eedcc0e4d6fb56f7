"""Independent references for the equivalence tests: models fed only the kept tokens, no cache."""

from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune


def full_positions(model, inputs) -> torch.Tensor:
    """Position ids the unwrapped model uses for ``inputs``: ``(B, L)`` or Qwen's ``(3, B, L)``."""
    mask = inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if hasattr(model.model, "get_rope_index"):
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask,
        )
        return pos
    return text


def image_features_per_sample(model, inputs) -> list[torch.Tensor]:
    """The unwrapped model's image features, one ``(visual tokens, hidden)`` tensor per sample: its images
    concatenated in placeholder order. Encoded with every input ``get_image_features`` takes
    (``image_grid_thw``, ``image_sizes``, ``batch_num_images``...)."""
    import inspect

    encode = model.model.get_image_features
    encode_kwargs = {k: inputs[k] for k in inspect.signature(encode).parameters if k in inputs}
    with torch.no_grad():
        images = list(encode(**encode_kwargs, return_dict=True).pooler_output)
    empty = images[0][:0]
    per_sample = []
    for n in (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist():
        taken = []
        while sum(int(f.shape[0]) for f in taken) < n:
            taken.append(images.pop(0))
        assert sum(int(f.shape[0]) for f in taken) == n, "an image's tokens span two samples"
        per_sample.append(torch.cat(taken) if taken else empty)
    return per_sample


def deepstack_features_per_sample(model, inputs) -> list[list[torch.Tensor]] | None:
    """Qwen3-VL: per deepstack layer, per sample, the ``(visual tokens, hidden)`` deepstack features of the
    unwrapped model's image encoding (images concatenated in placeholder order); None for models without
    deepstack."""
    import inspect

    encode = model.model.get_image_features
    encode_kwargs = {k: inputs[k] for k in inspect.signature(encode).parameters if k in inputs}
    with torch.no_grad():
        out = encode(**encode_kwargs, return_dict=True)
    levels = getattr(out, "deepstack_features", None)
    if levels is None:
        return None
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    return [list(torch.cat(level).split(counts)) for level in levels]


# Families whose multimodal forward takes pre-encoded image features as one stacked tensor (InternVL's tiles).
STACKED_FEATURES = {"internvl"}


def kept_reference_inputs(model, inputs, selection, contiguous: bool, kept_features=None) -> dict:
    """Inputs holding only the kept tokens, left-padded, with the kept image features pre-encoded.

    ``model`` must be unwrapped. Positions: renumbered (contiguous) or the original ones.
    ``kept_features``: per sample, the rows to place at the kept visual tokens (a transform's new rows,
    e.g. pooled features); default: the model's own features of those tokens.
    """
    feats = image_features_per_sample(model, inputs)
    deepstack = deepstack_features_per_sample(model, inputs)
    positions = full_positions(model, inputs)
    batch = inputs["input_ids"].shape[0]
    width = max(len(s.kept_columns) for s in selection)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    pos = torch.zeros(*positions.shape[:-2], batch, width, dtype=torch.long)
    kept_feats = []
    for b, (sel, feat) in enumerate(zip(selection, feats)):
        cols = sel.kept_columns
        n = len(cols)
        ids[b, width - n :] = inputs["input_ids"][b, cols]
        mask[b, width - n :] = 1
        pos[..., b, width - n :] = torch.arange(n) if contiguous else positions[..., b, cols]
        kept_feats.append(feat[sel.kept_visual] if kept_features is None else kept_features[b])
    if model.config.model_type in STACKED_FEATURES:  # the forward takes one (images, tokens, hidden) tensor
        kept_feats = torch.cat(kept_feats)[None]
    encoded = BaseModelOutputWithPooling(pooler_output=kept_feats)
    if deepstack is not None:  # Qwen3-VL: the deepstack rows of the kept tokens (a transform's anchors)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        encoded = BaseModelOutputWithDeepstackFeatures(
            pooler_output=kept_feats,
            deepstack_features=[
                [level[b][sel.kept_visual] for b, sel in enumerate(selection)] for level in deepstack
            ],
        )
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "mm_encoder_outputs": {"image": encoded},
    }
    if "mm_token_type_ids" in inputs:
        image_token = model.config.image_token_id
        out["mm_token_type_ids"] = (ids == image_token).int()
        out["image_grid_thw"] = inputs["image_grid_thw"]
    return out


def reference_grids(model, inputs) -> list[tuple[int, int]]:
    """Each sample's visual-token grid, from the tiny model's own geometry (one image per sample)."""
    vision = model.config.vision_config
    if "image_grid_thw" in inputs:
        merge = vision.spatial_merge_size
        return [(h // merge, w // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    if "image_sizes" in inputs:  # anyres: base view + unpadded crops with newline tokens, no one grid
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        return [(1, n) for n in counts]
    if model.config.model_type == "internvl":  # one tile is a grid; an image of several tiles is not
        side = vision.image_size[0] // vision.patch_size[0] // 2
        counts = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
        return [(side, side) if n == side * side else (1, n) for n in counts]
    side = vision.image_size // vision.patch_size
    return [(side, side)] * inputs["input_ids"].shape[0]


def reference_pool(features, grid, target: int, anchor: str = "center"):
    """Plain loops: average ``features`` ``(rows * cols, hidden)`` over an ``R x C`` grid of windows
    (``R = round(sqrt(target * rows / cols))`` clamped, ``C = target // R``, then ``R = target // C``), window
    ``i`` spanning ``[floor(i rows / R), ceil((i + 1) rows / R))``. Returns the anchor cell indices (window
    centre ``(lo + hi - 1) // 2`` or first cell) and the window means."""
    rows, cols = grid
    if target >= rows * cols:
        return torch.arange(rows * cols), features
    out_r = min(rows, max(1, round(math.sqrt(target * rows / cols))))
    out_c = min(cols, max(1, target // out_r))
    out_r = min(rows, max(1, target // out_c))

    def spans(size, out):
        return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]

    grid_feats = features.reshape(rows, cols, -1)
    anchors, means = [], []
    for r0, r1 in spans(rows, out_r):
        for c0, c1 in spans(cols, out_c):
            cells = [grid_feats[r, c].double() for r in range(r0, r1) for c in range(c0, c1)]
            means.append((sum(cells) / len(cells)).to(features.dtype))
            r, c = ((r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2) if anchor == "center" else (r0, c0)
            anchors.append(r * cols + c)
    return torch.tensor(anchors), torch.stack(means)


def greedy_no_cache(model, ref: dict, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding that recomputes the whole sequence at every step (no KV cache)."""
    ids, mask, pos = ref["input_ids"], ref["attention_mask"], ref["position_ids"]
    tokens, logits = [], []
    for _ in range(steps):
        with torch.no_grad():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                mm_encoder_outputs={"image": ref["mm_encoder_outputs"]["image"]},
                **(
                    {
                        "mm_token_type_ids": (ids == model.config.image_token_id).int(),
                        "image_grid_thw": ref["image_grid_thw"],
                    }
                    if "image_grid_thw" in ref
                    else {}
                ),
            )
        step_logits = out.logits[:, -1].float()
        nxt = step_logits.argmax(-1)
        logits.append(step_logits)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    return torch.stack(tokens, 1), logits


def greedy_with_logits(model, inputs, steps: int, cache: str = "dynamic"):
    """``generate`` greedily for ``steps`` tokens, returning sequences and per-step logits."""
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )


def selection_of(model):
    return vtprune.get_pruner(model).last


def capture_language_model_inputs(model, inputs) -> dict:
    """What the (unwrapped) language model receives for ``inputs``: embeddings, 2-D mask, positions."""
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs)

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    out = {k: seen[k] for k in ("inputs_embeds", "attention_mask", "position_ids")}
    if seen.get("deepstack_visual_embeds") is not None:  # Qwen3-VL
        out["deepstack"] = (seen["visual_pos_masks"], list(seen["deepstack_visual_embeds"]))
    return out


def masked_layers_forward(model, embeds, mask2d, position_ids, alive, deepstack=None) -> torch.Tensor:
    """Logits of the language model where layer ``l`` attends only to keys ``alive[l]`` (B, L) - the
    masking counterpart of dropping tokens between layers (no gathering, no cache). ``deepstack``:
    ``(visual_pos_masks (B, L), [rows per layer])`` added after the first layers at every visual position
    (Qwen3-VL); tokens dropped later got theirs too, but no later layer reads them."""
    lm = model.model.language_model
    batch, seq = mask2d.shape
    neg = torch.finfo(embeds.dtype).min
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    with torch.no_grad():
        pos_emb = lm.rotary_emb(embeds, position_ids)
        text_pos = position_ids if position_ids.ndim == 2 else position_ids[0]
        h = embeds
        for layer, keys in zip(lm.layers, alive):
            allowed = causal[None] & (mask2d.bool() & keys)[:, None, :]
            mask4d = torch.zeros(batch, 1, seq, seq, dtype=embeds.dtype).masked_fill(~allowed[:, None], neg)
            h = layer(
                h, attention_mask=mask4d, position_embeddings=pos_emb, position_ids=text_pos, cache=None
            )
            if deepstack is not None and deepstack[1]:
                h = h.clone()
                h[deepstack[0]] += deepstack[1].pop(0).to(h.dtype)
        return model.lm_head(lm.norm(h)).float()


def alive_per_layer(engine, batch: int, seq: int) -> list[torch.Tensor]:
    alive = []
    for index in engine.layer_index:
        keys = torch.ones(batch, seq, dtype=torch.bool)
        if index is not None:
            keys = torch.zeros(batch, seq, dtype=torch.bool)
            for b in range(batch):
                keys[b, index[b][index[b] >= 0]] = True
        alive.append(keys)
    return alive


def greedy_masked_no_cache(model, lm_inputs, alive, steps) -> tuple[torch.Tensor, list[torch.Tensor]]:
    embeds, mask, pos = lm_inputs["inputs_embeds"], lm_inputs["attention_mask"], lm_inputs["position_ids"]
    deepstack = lm_inputs.get("deepstack")
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    if pos is None:
        pos = torch.arange(embeds.shape[1]).expand(embeds.shape[0], -1)
    embed_tokens = model.get_input_embeddings()
    tokens, logits = [], []
    for _ in range(steps):
        step = None if deepstack is None else (deepstack[0], list(deepstack[1]))
        step_logits = masked_layers_forward(model, embeds, mask, pos, alive, step)[:, -1]
        nxt = step_logits.argmax(-1)
        tokens.append(nxt)
        logits.append(step_logits)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed_tokens(nxt)[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        alive = [torch.cat([a, torch.ones_like(a[:, :1])], -1) for a in alive]
        if deepstack is not None:  # the generated token is no visual position
            deepstack = (torch.cat([deepstack[0], torch.zeros_like(deepstack[0][:, :1])], -1), deepstack[1])
    return torch.stack(tokens, 1), logits


def forbid_generating(model, token_ids) -> None:
    """Bias the LM head by -1e4 at ``token_ids`` (e.g. the image placeholder): a tiny random model may emit
    one, and recomputing a sequence with a stray placeholder fails in transformers itself."""
    head = model.lm_head
    bias = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
    bias[list(token_ids)] = -1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
