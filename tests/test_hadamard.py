"""core/hadamard.py: Paley and Sylvester Hadamard matrices, the randomized transform, its fast form."""

import pytest
import torch

from lmcompose.core.hadamard import (
    MAX_FACTOR,
    OrthogonalTransform,
    hadamard_split,
    odd_split,
    paley,
    power_split,
    sylvester,
)


@pytest.mark.parametrize("m", [2, 4, 12, 20, 36, 44, 60, 108])
def test_paley_orders_are_hadamard_matrices(m):
    h = paley(m)
    assert h is not None and h.shape == (m, m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m))


def test_orders_without_a_construction_are_none():
    assert paley(172) is None and paley(86) is None  # 172 = 4·43: neither Paley I nor II
    assert hadamard_split(11008) is None and odd_split(11008) == (43, 256)


@pytest.mark.parametrize("n,split", [(576, (36, 16)), (640, (20, 32)), (1536, (12, 128)), (4096, (1, 4096)),
                                     (2048, (1, 2048)), (960, (60, 16))])
def test_usual_widths_split_into_a_paley_and_a_power_of_two(n, split):
    assert hadamard_split(n) == split


def test_sylvester_factors_are_few_balanced_and_compose():
    assert power_split(1) == [] and power_split(128) == [128] and power_split(4096) == [64, 64]
    assert power_split(256) == [16, 16] and all(max(power_split(2 ** k)) <= MAX_FACTOR for k in range(1, 20))
    assert torch.equal(torch.kron(sylvester(8), sylvester(4)), sylvester(32))


@pytest.mark.parametrize("n,kind,recorded", [(576, "hadamard", "hadamard"), (1536, "hadamard", "hadamard"),
                                             (64, "hadamard", "hadamard"), (172, "hadamard", "hadamard+orthogonal"),
                                             (344, "hadamard", "hadamard+orthogonal"), (96, "orthogonal", "orthogonal"),
                                             (12, "hadamard", "hadamard"), (20, "hadamard", "hadamard"),
                                             (36, "hadamard", "hadamard")])
def test_transform_is_orthogonal_and_apply_matches_matrix(n, kind, recorded):
    t = OrthogonalTransform.create(n, kind, seed=3)
    assert t.kind == recorded
    q = t.matrix()
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(t.apply(x), x @ q.T, atol=1e-12)
    assert torch.allclose(t.apply_inverse(x), x @ q, atol=1e-12)
    assert torch.allclose(t.apply_inverse(t.apply(x)), x, atol=1e-12)
    if recorded == "hadamard":  # a randomized Hadamard: every entry ±1/√n
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5), atol=1e-12)


def test_the_seed_decides_the_transform_and_regenerates_it():
    a, b = OrthogonalTransform.create(576, seed=0), OrthogonalTransform.create(576, seed=1)
    assert not torch.allclose(a.matrix(), b.matrix())
    assert torch.equal(a.matrix(), OrthogonalTransform(576, "hadamard", 0).matrix())
    with pytest.raises(ValueError, match="allowed"):
        OrthogonalTransform.create(64, "walsh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_keeps_the_input_dtype_and_shape(dtype):
    t = OrthogonalTransform.create(1536)
    x = torch.randn(2, 7, 1536)
    y = t.apply(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    ref = x.double() @ t.matrix().T
    assert float((y.double() - ref).norm() / ref.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="size 1536"):
        t.apply(torch.randn(3, 576))


@pytest.mark.parametrize("n, block", [(576, 64), (1536, 64), (192, 64), (11008, 256), (48, 12)])
def test_a_block_diagonal_transform_rotates_each_block_on_its_own(n, block):
    t = OrthogonalTransform.create(n, "hadamard", seed=3, block=block)
    assert t.block == block
    q = t.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    off = q.clone()
    for i in range(0, n, block):
        off[i:i + block, i:i + block] = 0
    assert torch.count_nonzero(off) == 0 and torch.count_nonzero(q[:block, :block]) == block * block
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(t.apply(x), x @ q.T, atol=1e-10)
    assert torch.allclose(t.apply_inverse(t.apply(x)), x, atol=1e-10)
    assert OrthogonalTransform.from_meta(t.meta()) == t


def test_a_block_that_does_not_split_the_width_means_the_full_width():
    for n, block in [(576, 576), (576, 1024), (576, 100)]:
        t = OrthogonalTransform.create(n, "hadamard", block=block)
        assert t.block == 0 and "block" not in t.meta()
    with pytest.raises(ValueError, match="block=-1"):
        OrthogonalTransform.create(64, block=-1)
