"""Qwen3-VL: deepstack features stay with their visual tokens (pre-LLM and in-LLM pruning), the CLS-free
received score of its ViT, M-RoPE positions, and the family facts.

The contract matrix (tests/contract/test_matrix.py) runs every method on ``qwen3_vl`` and ``qwen3_vl_moe``
against a no-cache reference that adds the deepstack rows itself (tests/helpers.py); here the rows each
``_deepstack_process`` call receives are checked directly against the unwrapped model's own encoding.
"""

from __future__ import annotations

import pytest
import torch
from helpers import deepstack_features_per_sample, full_positions, greedy_with_logits

import vtprune
from vtprune.runtime.visual_inputs import take_visual_rows
from vtprune.testing import TINY_FAMILIES, qwen_vl_inputs
from vtprune.testing.qwen3_vl import tiny_qwen3_vl


def _record_deepstack(model, monkeypatch):
    """Record what the language model's own ``_deepstack_process`` receives at every call: (hidden width,
    mask, rows). Installed on the class before wrapping, so the wrap's patch (if any) calls it."""
    cls = type(model.model.language_model)
    inner = cls._deepstack_process
    calls = []

    def recording(self, hidden_states, visual_pos_masks, visual_embeds):
        calls.append((hidden_states.shape[1], visual_pos_masks.clone(), visual_embeds.clone()))
        return inner(self, hidden_states, visual_pos_masks, visual_embeds)

    monkeypatch.setattr(cls, "_deepstack_process", recording)
    return calls


def _expected_rows(reference, selection, visual_cols, level):
    """Independent: per sample, the unwrapped encoding's deepstack rows of the visual tokens at original
    prompt columns ``visual_cols[b]`` (ascending), concatenated in batch order."""
    rows = []
    for b, sel in enumerate(selection):
        visual_rank = {int(c): i for i, c in enumerate(sel.visual_columns)}
        rows.append(reference[level][b][[visual_rank[int(c)] for c in visual_cols[b]]])
    return torch.cat(rows)


def _visual_columns(inputs, image_token):
    return [(row == image_token).nonzero().squeeze(-1) for row in inputs["input_ids"]]


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_pre_llm_pruning_slices_deepstack_rows_with_the_kept_tokens(method, monkeypatch):
    model = tiny_qwen3_vl(text_layers=4)
    inputs = qwen_vl_inputs(model)
    reference = deepstack_features_per_sample(model, inputs)
    calls = _record_deepstack(model, monkeypatch)
    vtprune.wrap(model, method, keep_ratio=0.3)
    with torch.no_grad():
        model(**inputs)
    selection = vtprune.get_pruner(model).last
    vtprune.unwrap(model)
    assert len(calls) == 3  # one per deepstack layer, the ViT's deepstack_visual_indexes
    all_visual = _visual_columns(inputs, model.config.image_token_id)
    for sel, cols in zip(selection, all_visual):
        sel.visual_columns = cols
    kept_cols = [sel.visual_columns[sel.kept_visual] for sel in selection]
    for level, (width, mask, rows) in enumerate(calls):
        assert int(mask.sum()) == sum(sel.visual_out for sel in selection) == rows.shape[0]
        torch.testing.assert_close(
            rows, _expected_rows(reference, selection, kept_cols, level), rtol=0, atol=0
        )
        # the mask marks exactly the kept visual tokens' columns of the compact input
        for b, sel in enumerate(selection):
            kept_lm_cols = sel.kept_columns
            assert mask.shape[1] == width
            visual_here = torch.isin(kept_lm_cols, sel.visual_columns)
            assert torch.equal(mask[b, width - len(kept_lm_cols) :], visual_here)


@pytest.mark.parametrize(
    "config",
    [
        {"method": "fastv", "layer": 1, "keep_ratio": 0.3},  # drops between deepstack layers 1 and 2
        {"method": "static_exit", "layer": 1},  # no visual token left for deepstack layers 0..2
        {"method": "schedule", "keep": [1.0, 0.5, 0.25, 0.25]},
        [{"method": "fastervlm", "keep_ratio": 0.5}, {"method": "fastv", "layer": 1, "keep_ratio": 0.5}],
    ],
    ids=["fastv", "static_exit", "schedule", "fastervlm+fastv"],
)
def test_in_llm_dropping_keeps_deepstack_rows_on_the_remaining_visual_tokens(config, monkeypatch):
    model = tiny_qwen3_vl(text_layers=4)
    inputs = qwen_vl_inputs(model)
    reference = deepstack_features_per_sample(model, inputs)
    calls = _record_deepstack(model, monkeypatch)
    vtprune.wrap(model, config)
    pruner = vtprune.get_pruner(model)
    with torch.no_grad():
        model(**inputs)
    selection, layer_index = (
        pruner.last,
        [i.clone() if i is not None else None for i in pruner.engine.layer_index],
    )
    vtprune.unwrap(model)
    all_visual = _visual_columns(inputs, model.config.image_token_id)
    for sel, cols in zip(selection, all_visual):
        sel.visual_columns = cols
    assert len(calls) == 3
    for level, (_, mask, rows) in enumerate(calls):
        # deepstack layer ``level`` runs after decoder layer ``level``: on the tokens layer level + 1 gets
        index = layer_index[level + 1]
        present = []
        for b, sel in enumerate(selection):
            # the engine's index is into the left-padded LM input (width: the longest kept prompt)
            offset = max(len(s.kept_columns) for s in selection) - len(sel.kept_columns)
            cols = sel.kept_columns if index is None else sel.kept_columns[index[b][index[b] >= 0] - offset]
            present.append(cols[torch.isin(cols, sel.visual_columns)])
        assert int(mask.sum()) == rows.shape[0] == sum(len(p) for p in present)
        assert [sel_counts[level + 1] for sel_counts in (s.layer_visual for s in selection)] == [
            len(p) for p in present
        ]
        torch.testing.assert_close(rows, _expected_rows(reference, selection, present, level), rtol=0, atol=0)
    if config == {"method": "static_exit", "layer": 1}:
        assert all(int(m.sum()) == 0 for _, m, _ in calls[1:])


def test_take_visual_rows_against_a_loop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 9, generator=g) > 0.5
    rows = torch.randn(int(mask.sum()), 4, generator=g)
    index = torch.tensor([[-1, 0, 2, 5, 8], [1, 2, 3, 4, 7], [-1, -1, 0, 6, 8]])
    kept, (got,) = take_visual_rows(mask, [rows], index)
    flat = [(b, s) for b in range(3) for s in range(9) if mask[b, s]]
    expected_mask = torch.zeros(3, 5, dtype=torch.bool)
    expected = []
    for b in range(3):
        for j, s in enumerate(index[b].tolist()):
            if s >= 0 and mask[b, s]:
                expected_mask[b, j] = True
                expected.append(rows[flat.index((b, s))])
    assert torch.equal(kept, expected_mask)
    assert torch.equal(got, torch.stack(expected))


def test_received_attention_matches_manual_reference():
    """Qwen3's ViT has no [CLS] and no window attention: FasterVLM ranks by the attention each merged token
    receives at the last block, per image (``cu_seqlens`` segments), mean over heads, queries and its 4
    patches."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    model = tiny_qwen3_vl()
    inputs = qwen_vl_inputs(model)
    captured = {}
    block = model.model.visual.blocks[-1].attn

    def grab(module, args, kwargs):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], **kwargs)

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    vtprune.wrap(model, "fastervlm", keep_ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    selection = vtprune.get_pruner(model).last
    h = captured["hidden"]
    q, k, _ = block.qkv(h).reshape(h.shape[0], 3, block.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["position_embeddings"])
    cu = captured["cu_seqlens"].tolist()
    for b, sel in enumerate(selection):
        qi, ki = q[cu[b] : cu[b + 1]].transpose(0, 1), k[cu[b] : cu[b + 1]].transpose(0, 1)
        attn = (qi @ ki.transpose(-1, -2) * block.scaling).softmax(-1)
        received = attn.mean(0).mean(0).view(-1, 4).mean(-1)
        expected = torch.sort(torch.topk(received, sel.visual_out).indices).values
        assert torch.equal(sel.kept_visual, expected)


def test_kept_tokens_keep_their_original_mrope_positions():
    model = tiny_qwen3_vl()
    inputs = qwen_vl_inputs(model)
    full = full_positions(model, inputs)  # (3, B, L)
    seen = {}
    lm = model.model.language_model
    vtprune.wrap(model, "fastervlm", keep_ratio=0.3)
    handle = lm.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.update(pe=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    selection = vtprune.get_pruner(model).last
    vtprune.unwrap(model)
    # the unwrapped rotary embedding of the original positions of the kept columns, per sample
    for b, sel in enumerate(selection):
        pos = full[:, b : b + 1, sel.kept_columns]
        cos, _ = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        n = len(sel.kept_columns)
        torch.testing.assert_close(seen["pe"][0][b, -n:], cos[0], rtol=0, atol=0)


def test_family_facts():
    from vtprune.registry import get_family

    dense, moe = TINY_FAMILIES["qwen3_vl"].build(), TINY_FAMILIES["qwen3_vl_moe"].build()
    for model in (dense, moe):
        family = get_family(model)
        assert family.resolve_positions("auto") == "original"
        assert family.vision_tower().default_layer() == len(model.model.visual.blocks) - 1
        assert family.visual_side_inputs().mask == "visual_pos_masks"
    assert get_family(dense).text_dims().intermediate == dense.config.text_config.intermediate_size
    text = moe.config.text_config
    assert get_family(moe).text_dims().intermediate == text.num_experts_per_tok * text.moe_intermediate_size
    with pytest.raises(vtprune.UsageError, match="positions"):
        vtprune.wrap(dense, "fastervlm", positions="contiguous")


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_pruning_changes_the_answer_path_only_through_kept_tokens(family):
    """keep_ratio=1 equals the unwrapped model bit for bit (deepstack rows untouched by a no-op slice)."""
    model = TINY_FAMILIES[family].build(text_layers=4)
    inputs = qwen_vl_inputs(model)
    ref = greedy_with_logits(model, inputs, 3)
    vtprune.wrap(model, "fastervlm", keep_ratio=1.0)
    out = greedy_with_logits(model, inputs, 3)
    vtprune.unwrap(model)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
