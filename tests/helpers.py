"""Independent references for the equivalence tests: models fed only the kept tokens, no cache."""

from __future__ import annotations

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


def kept_reference_inputs(model, inputs, selection, contiguous: bool) -> dict:
    """Inputs holding only the kept tokens, left-padded, with the kept image features pre-encoded.

    ``model`` must be unwrapped. Positions: renumbered (contiguous) or the original ones.
    """
    encode_kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    with torch.no_grad():
        feats = list(model.model.get_image_features(**encode_kwargs, return_dict=True).pooler_output)
    positions = full_positions(model, inputs)
    batch = inputs["input_ids"].shape[0]
    width = max(len(s.kept_columns) for s in selection)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    pos = torch.zeros(*positions.shape[:-2], batch, width, dtype=torch.long)
    kept_feats = []
    for b, (sel, feat) in enumerate(zip(selection, feats)):  # one image per sample in these tests
        cols = sel.kept_columns
        n = len(cols)
        ids[b, width - n :] = inputs["input_ids"][b, cols]
        mask[b, width - n :] = 1
        pos[..., b, width - n :] = torch.arange(n) if contiguous else positions[..., b, cols]
        kept_feats.append(feat[sel.kept_visual])
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=kept_feats)},
    }
    if "mm_token_type_ids" in inputs:
        image_token = model.config.image_token_id
        out["mm_token_type_ids"] = (ids == image_token).int()
        out["image_grid_thw"] = inputs["image_grid_thw"]
    return out


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


def selection_of(model):
    return vtprune.get_pruner(model).last
