"""The representation algebra: packing, the quantization grid, terms, and exact byte counts."""

import pytest
import torch

from lmcompose.algebra import Dense, LowRank, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.packing import (
    decode_nm,
    encode_nm,
    pack_bits,
    packed_nbytes,
    unpack_bits,
)
from lmcompose.algebra.quant import QTensor
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.prune.common import nm_mask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_pack_roundtrip(bits, count):
    values = torch.randint(0, 2**bits, (count,), generator=gen(bits))
    packed = pack_bits(values, bits)
    assert packed.numel() == packed_nbytes(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.uint8))


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8])
def test_pack_in_chunks_equals_one_pass(bits, monkeypatch):
    """Chunks of 16 codes (2·bits bytes each) give the very bytes of a single pass over the stream."""
    from lmcompose.algebra import packing

    values = torch.randint(0, 2**bits, (1001,), generator=gen(bits))
    whole = pack_bits(values, bits)
    monkeypatch.setattr(packing, "CHUNK_CODES", 16)
    assert torch.equal(pack_bits(values, bits), whole)
    assert torch.equal(unpack_bits(whole, bits, 1001), values.to(torch.uint8))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_encode_roundtrip(n, m):
    mask = nm_mask(torch.rand(6, 4 * m, generator=gen()), n, m)
    assert torch.equal(decode_nm(encode_nm(mask, n, m), n, m, 6, 4 * m), mask)
    assert (mask.reshape(6, -1, m).sum(-1) == n).all()


def test_encode_nm_rejects_a_wrong_mask():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    with pytest.raises(ValueError, match="2:4"):
        encode_nm(mask, 2, 4)


def test_rtn_error_falls_as_bits_rise():
    w = torch.randn(64, 200, generator=gen())
    errors = [(quantize_rtn(w, QuantSpec(b, 64)).dequantize() - w).pow(2).sum().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_is_nearest_code_and_within_half_step(symmetric):
    w = torch.randn(16, 96, generator=gen(3))
    q = quantize_rtn(w, QuantSpec(4, 32, symmetric, scale_dtype="fp32"))
    step = q.scale.float()[:, q.group_index()]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all() or symmetric
    # nearest: no other code on the same grid is closer
    zero = torch.full_like(step, 8.0) if symmetric else q.zero.float()[:, q.group_index()]
    for delta in (-1, 1):
        other = (q.codes.float() + delta).clamp(0, 15)
        assert ((step * (other - zero) - w).abs() >= (q.dequantize() - w).abs() - 1e-6).all()


def test_group_size_that_does_not_divide_the_width():
    w = torch.randn(8, 576, generator=gen())
    spec = QuantSpec(4, 128)
    q = quantize_rtn(w, spec)
    assert q.scale.shape == (8, 5)  # 4 full groups of 128 and one of 64
    assert q.nbytes() == 8 * 576 // 2 + 8 * 5 * 2 + (8 * 5 * 4 + 7) // 8
    last = w[:, 512:]
    ref = quantize_rtn(last, spec)  # the short group quantized on its own gives the same codes
    assert torch.equal(q.codes[:, 512:], ref.codes)


def _layers():
    g = gen(5)
    w = torch.randn(24, 64, generator=g)
    mask50 = torch.rand(24, 64, generator=g) > 0.5
    mask95 = torch.rand(24, 64, generator=g) > 0.97
    q4 = quantize_rtn(w, QuantSpec(4, 16))
    q3s = quantize_rtn(w, QuantSpec(3, None, True))
    perm = torch.randperm(64, generator=g)
    u, v = torch.randn(24, 5, generator=g), torch.randn(5, 64, generator=g)
    return {
        "dense fp16": [Dense(w.half())],
        "dense int4 g16": [Dense(q4)],
        "dense int3 sym per-row": [Dense(q3s)],
        "dense act-order perm": [Dense(quantize_rtn(w, QuantSpec(4, 16), perm=perm))],
        "sparse bitmask": [Sparse(w.half(), mask50)],
        "sparse csr": [Sparse(w.half(), mask95)],
        "sparse 2:4": [Sparse(w.half(), nm_mask(w.abs(), 2, 4), 2, 4)],
        "sparse int4": [Sparse(q4, mask50)],
        "lowrank fp16 + d": [LowRank(u.half(), v.half(), torch.rand(5, generator=g).half())],
        "lowrank int4": [LowRank(quantize_rtn(u, QuantSpec(4)), quantize_rtn(v, QuantSpec(4, 16)))],
        "sparse + lowrank": [Sparse(w.half(), mask50), LowRank(u.half(), v.half())],
    }


@pytest.mark.parametrize("case", list(_layers()))
@pytest.mark.parametrize("bias", [False, True])
def test_nbytes_equals_stored_bytes_and_state_roundtrips(case, bias):
    terms = _layers()[case]
    layer = CompressedLinear(64, 24, terms, torch.randn(24).half() if bias else None)
    state = layer.state("layer")
    assert sum(t.numel() * t.element_size() for t in state.values()) == layer.nbytes()
    again = CompressedLinear.from_state("layer", layer.meta(), state)
    assert torch.equal(again.to_dense(), layer.to_dense())
    assert again.spec() == layer.spec()


def test_sparse_index_format_is_the_smaller_one():
    terms = _layers()
    assert terms["sparse bitmask"][0].spec().index_format() == "bitmask"
    assert terms["sparse csr"][0].spec().index_format() == "csr"
    assert terms["sparse 2:4"][0].spec().index_nbytes() == (24 * 16 * 3 + 7) // 8  # ceil(log2 C(4,2)) = 3 bits


def test_mask_survives_quantization_bit_exactly():
    w = torch.randn(32, 64, generator=gen(2))
    mask = nm_mask(w.abs(), 2, 4)
    sparse = Sparse(quantize_rtn(w * mask, QuantSpec(3, 32)), mask, 2, 4)
    dense = sparse.weight()
    assert (dense[~mask] == 0).all()
    layer = CompressedLinear(64, 32, [sparse])
    again = CompressedLinear.from_state("x", layer.meta(), layer.state("x"))
    assert torch.equal(again.terms[0].mask, mask)


def test_forward_matches_dense_weight():
    terms = _layers()["sparse + lowrank"]
    bias = torch.randn(24).half()
    layer = CompressedLinear(64, 24, terms, bias)
    x = torch.randn(3, 5, 64, generator=gen(9))
    expected = x @ layer.to_dense().T + bias.float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)


def test_cast_changes_compute_dtype_not_storage():
    w = torch.randn(8, 16, generator=gen())
    layer = CompressedLinear(16, 8, [Dense(w.half())])
    layer = layer.to(torch.bfloat16)
    assert layer.terms[0].a.dtype == torch.float16
    assert layer(torch.randn(2, 16).bfloat16()).dtype == torch.bfloat16
    assert torch.equal(layer.float().to_dense(), w.half().float())


def test_qtensor_perm_dequantizes_to_the_same_weights_as_without_perm_grouping():
    w = torch.randn(4, 12, generator=gen())
    perm = torch.arange(12).flip(0)
    q = quantize_rtn(w, QuantSpec(8, 4, scale_dtype="fp32"), perm=perm)
    assert isinstance(q, QTensor)
    torch.testing.assert_close(q.dequantize(), w, atol=0.02, rtol=0)
