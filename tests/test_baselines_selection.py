"""VisionZip, DivPrune and CDPruner against independent, straightforward implementations of their rules.

Each rule is re-implemented here with plain loops on fixed inputs (brute force where the search space is
tiny) and compared with the method's module; then each method is run wrapped on a tiny LLaVA with a
left-padded batch of two prompts holding two images each, and its kept tokens (and VisionZip's merged rows)
are compared with the loop reference on the model's own features.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import image_features_per_sample

import vtprune
from vtprune.methods.cdpruner import dpp_greedy, dpp_kernel, relevance
from vtprune.methods.divprune import max_min_order
from vtprune.methods.visionzip import contextual_count, visionzip_group, visionzip_unit
from vtprune.runtime.parts import VisualUnit
from vtprune.runtime.selection import keep_count
from vtprune.testing import BOS, IMAGE_TOKEN, _left_pad, tiny_llava


# ------------------------------------------------------------------------------------ plain references
def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_max_min(features: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy max-min over cosine distance, one candidate at a time."""
    rows = features.double().tolist()
    n = len(rows)
    dist = [[1.0 - _cos(rows[i], rows[j]) for j in range(n)] for i in range(n)]
    isolation = [min(dist[i][j] for i in range(n) if i != j) if n > 1 else 0.0 for j in range(n)]
    picks = [max(range(n), key=lambda j: (isolation[j], -j))]
    while len(picks) < k:
        rest = [j for j in range(n) if j not in picks]
        picks.append(max(rest, key=lambda j: (min(dist[s][j] for s in picks), -j)))
    return picks


def ref_log_det(kernel: torch.Tensor, subset) -> float:
    idx = list(subset)
    if not idx:
        return 0.0
    sign, value = torch.linalg.slogdet(kernel[idx][:, idx].double())
    return float(value) if sign > 0 else -math.inf


def ref_dpp_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP by its definition: add the token that maximises ``log det L_S`` (no Cholesky updates)."""
    picks = []
    for _ in range(k):
        rest = [j for j in range(kernel.shape[0]) if j not in picks]
        picks.append(max(rest, key=lambda j: (ref_log_det(kernel, picks + [j]), -j)))
    return picks


def ref_relevance(features: torch.Tensor, text: torch.Tensor) -> list[float]:
    raw = [
        sum(_cos(x, t) for t in text.double().tolist()) / text.shape[0] for x in features.double().tolist()
    ]
    low, high = min(raw), max(raw)
    return [(r - low + 1e-6) / max(high - low, 1e-6) for r in raw]


def ref_visionzip(features: torch.Tensor, score: torch.Tensor, kept: int, contextual: int):
    """Dominant: top ``kept - contextual`` scores (ties: lower index). Contextual: of the rest (ascending),
    targets every ``max(1, R // c)``-th, the first ``c``; each other token joins its most similar target
    (cosine, first maximum); a contextual row is ``target + mean(joined)``."""
    n = features.shape[0]
    order = sorted(range(n), key=lambda i: (-float(score[i]), i))
    dominant = sorted(order[: kept - contextual])
    rest = [i for i in range(n) if i not in dominant]
    rows = {i: features[i].double() for i in dominant}
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = [rest[t] for t in range(0, len(rest), step)][:contextual]
        members = {t: [] for t in targets}
        vecs = features.double().tolist()
        for i in rest:
            if i in members:
                continue
            sims = [_cos(vecs[i], vecs[t]) for t in targets]
            members[targets[sims.index(max(sims))]].append(i)
        for t, joined in members.items():
            extra = sum(
                (features[i].double() for i in joined), torch.zeros(features.shape[1], dtype=torch.float64)
            )
            rows[t] = features[t].double() + (extra / len(joined) if joined else 0)
    positions = sorted(rows)
    return positions, torch.stack([rows[p] for p in positions])


# ----------------------------------------------------------------------------------- rule-level tests
@pytest.mark.parametrize("seed", range(4))
def test_divprune_greedy_equals_plain_loops(seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(12, 5, generator=g)
    features[7] = features[3] * 2.0  # a duplicate direction: distance 0
    for k in (1, 2, 5, 12):
        assert max_min_order(features, k).tolist() == ref_max_min(features, k)


def test_divprune_first_picks_by_brute_force():
    """On a tiny n, brute force over all tokens: the first pick has the largest nearest-neighbour distance,
    the second the largest distance to the first."""
    g = torch.Generator().manual_seed(11)
    features = torch.randn(6, 3, generator=g)
    unit = torch.nn.functional.normalize(features, dim=-1)
    dist = 1 - unit @ unit.t()
    best_first = max(range(6), key=lambda j: min(float(dist[i, j]) for i in range(6) if i != j))
    best_second = max((j for j in range(6) if j != best_first), key=lambda j: float(dist[best_first, j]))
    assert max_min_order(features, 2).tolist() == [best_first, best_second]


@pytest.mark.parametrize("seed", range(4))
def test_dpp_fast_greedy_equals_log_det_greedy(seed):
    """Chen et al.'s Cholesky updates pick what adding the largest log det picks."""
    g = torch.Generator().manual_seed(seed)
    features, text = torch.randn(10, 16, generator=g), torch.randn(4, 16, generator=g)
    rel = relevance(features, text)
    kernel = dpp_kernel(features, rel)
    for k in (1, 3, 6):
        assert dpp_greedy(kernel, k, rel).tolist() == ref_dpp_greedy(kernel, k)


@pytest.mark.parametrize("seed", range(6))
def test_dpp_greedy_against_exhaustive_search(seed):
    """k = 1: greedy is exact (largest L_jj). k = 2, 3 on n = 7: exhaustive search over every subset; the
    greedy's determinant is within the known bound det_opt / (k!)^2 (Civril & Magdon-Ismail 2009, greedy
    volume maximisation of a Gram matrix; L = diag(r) S diag(r) is the Gram matrix of r_i x_i / |x_i|)."""
    g = torch.Generator().manual_seed(seed)
    features, text = torch.randn(7, 3, generator=g), torch.randn(3, 3, generator=g)
    rel = relevance(features, text)
    kernel = dpp_kernel(features, rel)
    assert dpp_greedy(kernel, 1, rel).tolist() == [int(torch.diagonal(kernel).argmax())]
    for k in (2, 3):
        greedy = ref_log_det(kernel, dpp_greedy(kernel, k, rel).tolist())
        best = max(ref_log_det(kernel, s) for s in itertools.combinations(range(7), k))
        assert greedy <= best + 1e-9
        assert greedy >= best - 2 * math.log(math.factorial(k)) - 1e-9


def test_dpp_exhausted_kernel_fills_by_relevance():
    """Rank 2 features, 4 picks: after two picks nothing raises det; the rest go by relevance."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.1], [0.3, 1.0]])
    rel = torch.tensor([0.9, 0.8, 0.5, 0.7, 0.1], dtype=torch.float64)
    picks = dpp_greedy(dpp_kernel(features, rel), 4, rel).tolist()
    assert picks[:2] == ref_dpp_greedy(dpp_kernel(features, rel), 2)
    rest = sorted((j for j in range(5) if j not in picks[:2]), key=lambda j: -float(rel[j]))
    assert picks[2:] == rest[:2]


def test_relevance_equals_plain_loops():
    g = torch.Generator().manual_seed(3)
    features, text = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    torch.testing.assert_close(
        relevance(features, text), torch.tensor(ref_relevance(features, text), dtype=torch.float64)
    )
    flat = relevance(torch.ones(4, 6), text)  # a constant relevance is 1 everywhere, not a division by 0
    torch.testing.assert_close(flat, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(("n", "kept", "contextual"), [(20, 8, 3), (20, 8, 0), (9, 9, 2), (16, 5, 5)])
def test_visionzip_group_equals_plain_loops(n, kept, contextual):
    g = torch.Generator().manual_seed(n + kept)
    features, score = torch.randn(n, 6, generator=g), torch.rand(n, generator=g)
    score[4] = score[2]  # a tie: the lower index wins
    positions, rows = visionzip_group(features, score, kept, contextual)
    want_pos, want_rows = ref_visionzip(features, score, kept, contextual)
    assert positions.tolist() == want_pos
    torch.testing.assert_close(rows.double(), want_rows, rtol=1e-6, atol=1e-6)


def test_visionzip_paper_split_and_groups():
    assert [contextual_count(k, 10 / 64) for k in (64, 128, 192)] == [10, 20, 30]
    g = torch.Generator().manual_seed(5)
    features, score = torch.randn(14, 4, generator=g), torch.rand(14, generator=g)
    groups = torch.tensor([0] * 6 + [-1] + [1] * 7)  # two crops and a row separator
    positions, rows = visionzip_unit(VisualUnit(features, score, groups), 0.5, 0.34)
    expect_pos, expect_rows = [6], [features[6].double()]  # the separator, unchanged
    for idx in ([0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13]):
        kept = keep_count(len(idx), 0.5)
        pos, new = ref_visionzip(features[idx], score[idx], kept, contextual_count(kept, 0.34))
        expect_pos += [idx[p] for p in pos]
        expect_rows += list(new)
    order = sorted(range(len(expect_pos)), key=lambda i: expect_pos[i])
    assert positions.tolist() == [expect_pos[i] for i in order]
    torch.testing.assert_close(
        rows.double(), torch.stack([expect_rows[i] for i in order]), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------------------------------- wrapped: batch, 2 images a prompt
def _two_image_batch(model, seed=0):
    """Left-padded: sample 0 ``[bos, t, <img>*16, t, <img>*16, t]`` (short), sample 1 longer text."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in ((2, 1, 2), (4, 3, 5)):
        parts = [torch.tensor([BOS])]
        for i, n in enumerate(lengths):
            parts.append(torch.randint(4, model.config.text_config.vocab_size, (n,), generator=g))
            if i < 2:
                parts.append(torch.full((patches,), IMAGE_TOKEN))
        rows.append(torch.cat(parts))
    pixels = torch.randn(4, 3, vision.image_size, vision.image_size, generator=g)
    return _left_pad(rows) | {"pixel_values": pixels}


def _per_image(model, inputs) -> list[list[torch.Tensor]]:
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    return [list(f.split(patches)) for f in image_features_per_sample(model, inputs)]


def _text_embeddings(model, inputs, b) -> torch.Tensor:
    ids = inputs["input_ids"][b]
    real = inputs["attention_mask"][b].bool() & (ids != IMAGE_TOKEN)
    with torch.no_grad():
        return model.get_input_embeddings()(ids[real])


def _kept_after_forward(model, config, inputs):
    vtprune.wrap(model, config)
    try:
        with torch.no_grad():
            model(**inputs)
        return [sel.kept_visual.tolist() for sel in vtprune.get_pruner(model).last]
    finally:
        vtprune.unwrap(model)


def test_divprune_wrapped_keeps_the_greedy_picks_per_image():
    model = tiny_llava(text_hidden=64)
    inputs = _two_image_batch(model)
    kept = _kept_after_forward(model, {"method": "divprune", "keep_ratio": 0.25}, inputs)
    for b, images in enumerate(_per_image(model, inputs)):
        want = []
        for i, feats in enumerate(images):
            want += [16 * i + j for j in ref_max_min(feats, keep_count(16, 0.25))]
        assert kept[b] == sorted(want)


def test_cdpruner_wrapped_per_sample_with_its_own_text():
    model = tiny_llava(text_hidden=64)
    inputs = _two_image_batch(model)
    kept = _kept_after_forward(model, {"method": "cdpruner", "keep_ratio": 0.25}, inputs)
    for b, images in enumerate(_per_image(model, inputs)):
        text = _text_embeddings(model, inputs, b)
        want = []
        for i, feats in enumerate(images):
            rel = torch.tensor(ref_relevance(feats, text), dtype=torch.float64)
            want += [16 * i + j for j in ref_dpp_greedy(dpp_kernel(feats, rel), keep_count(16, 0.25))]
        assert kept[b] == sorted(want)
    # per sample: sample 1 alone (no padding, no other sample's text) keeps what it kept in the batch
    alone = {
        "input_ids": inputs["input_ids"][1:],
        "attention_mask": inputs["attention_mask"][1:],
        "pixel_values": inputs["pixel_values"][2:],
    }
    assert _kept_after_forward(model, {"method": "cdpruner", "keep_ratio": 0.25}, alone)[0] == kept[1]
    # and the instruction matters: another text changes the selection of the same images
    other = dict(alone, input_ids=alone["input_ids"].clone())
    text_cols = (other["input_ids"][0] != IMAGE_TOKEN).nonzero().squeeze(-1)[1:]
    other["input_ids"][0, text_cols] = torch.arange(len(text_cols)) + 40
    assert _kept_after_forward(model, {"method": "cdpruner", "keep_ratio": 0.25}, other)[0] != kept[1]


def test_visionzip_wrapped_dominant_by_cls_attention_and_merged_rows():
    model = tiny_llava(text_hidden=64, attn_implementation="eager")
    inputs = _two_image_batch(model)
    config = {"method": "visionzip", "keep_ratio": 0.5, "contextual_ratio": 0.25}
    vtprune.wrap(model, config)
    pruner = vtprune.get_pruner(model)
    written = []
    inner = pruner.parts.transform
    pruner.parts.transform = lambda units: written.append(inner(units)) or written[-1]
    with torch.no_grad():
        model(**inputs)
    kept = [sel.kept_visual.tolist() for sel in pruner.last]
    vtprune.unwrap(model)
    rows = torch.cat([new for _, new in written[-1]])
    # the [CLS] attention of the feature layer (-2), mean over heads, from eager attention maps
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    cls = tower.attentions[-2][:, :, 0, 1:].mean(1)
    feats = [f for images in _per_image(model, inputs) for f in images]
    want_rows, image = [], 0
    for b in range(2):
        want = []
        for i in range(2):
            k = keep_count(16, 0.5)
            pos, new = ref_visionzip(feats[image], cls[image], k, contextual_count(k, 0.25))
            want += [16 * i + p for p in pos]
            want_rows.append(new)
            image += 1
        assert kept[b] == want
    torch.testing.assert_close(rows.double(), torch.cat(want_rows), rtol=1e-5, atol=1e-5)
