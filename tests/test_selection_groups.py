"""Budget groups: the keep rule applies per group (tiles, crops), group -1 is always kept."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vtprune.runtime.selection import keep_count, select_visual_tokens


def _reference(scores, groups, ratio):
    """Per group, the indices of the keep_count highest scores (ties to the lower index), pinned kept."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for g in set(groups.tolist()):
        members = [i for i in range(len(scores)) if groups[i] == g]
        if g < 0:
            keep[members] = True
            continue
        ranked = sorted(members, key=lambda i: (-float(scores[i]), i))
        keep[ranked[: keep_count(len(members), ratio)]] = True
    return keep


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-1, 3), min_size=1, max_size=30),
    st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    st.integers(0, 2**16),
)
def test_grouped_selection_equals_per_group_reference(groups, ratio, seed):
    groups = torch.tensor(groups)
    n = len(groups)
    scores = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    image_mask = torch.ones(1, n + 2, dtype=torch.bool)
    image_mask[0, 0] = image_mask[0, -1] = False  # text around the image
    keep, kept = select_visual_tokens(image_mask, [scores], lambda m: keep_count(m, ratio), [groups])
    expected = _reference(scores, groups, ratio)
    assert torch.equal(keep[0, 1:-1], expected)
    assert keep[0, 0] and keep[0, -1]
    assert kept == [int(expected.sum())]


def test_ungrouped_and_grouped_images_mix_in_one_batch():
    image_mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    scores = [torch.tensor([4.0, 3, 2, 1]), torch.tensor([1.0, 2, 3, 4, 5, 6])]
    groups = [None, torch.tensor([0, 0, -1, 1, 1, 1])]
    keep, kept = select_visual_tokens(image_mask, scores, lambda n: keep_count(n, 0.5), groups)
    assert keep[0].int().tolist() == [1, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1]
    assert kept == [2, 1 + 1 + 2]
