"""Mask selection without sorting equals the stable-sort definition the references use, ties included."""

import pytest
import torch

from lmcompose.techniques.prune.common import matrix_topk_mask, row_topk_mask


def _by_sort_rows(score, keep):
    mask = torch.ones_like(score, dtype=torch.bool)
    prune = score.shape[1] - keep
    if prune > 0:
        mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :prune], False)
    return mask


def _by_sort_matrix(score, keep):
    mask = torch.ones(score.numel(), dtype=torch.bool)
    prune = score.numel() - keep
    if prune > 0:
        mask[torch.sort(score.flatten(), stable=True).indices[:prune]] = False
    return mask.reshape(score.shape)


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros_and_inf"])
@pytest.mark.parametrize("keep", [0, 1, 7, 16, 31, 32])
def test_selection_equals_the_stable_sort(kind, keep):
    g = torch.Generator().manual_seed(keep)
    score = torch.randn(9, 32, generator=g)
    if kind == "ties":  # few distinct values: most comparisons are ties
        score = torch.randint(0, 3, (9, 32), generator=g).float()
    elif kind == "zeros_and_inf":  # exact zeros (pruned weights) and protected entries (inf), as SSLC scores
        score = score.abs() * (torch.rand(9, 32, generator=g) > 0.4)
        score[torch.rand(9, 32, generator=g) > 0.8] = float("inf")
    assert torch.equal(row_topk_mask(score, keep), _by_sort_rows(score, keep))
    assert torch.equal(matrix_topk_mask(score, keep * 9), _by_sort_matrix(score, keep * 9))
    assert int(row_topk_mask(score, keep).sum()) == 9 * keep
