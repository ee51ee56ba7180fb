"""Every step keeps what earlier steps made, and a step that breaks it fails loudly."""

from typing import ClassVar

import pytest
import torch
from helpers import tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.algebra import Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.invariants import check_step
from lmcompose.core.errors import IllegalStep, InvariantError
from lmcompose.core.stats import StatsAccumulator
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.prune.magnitude import Magnitude
from lmcompose.techniques.registry import get_technique


def layer(w):
    return CompressedLinear(w.shape[1], w.shape[0], [Dense(w.half())])


def test_prune_then_quantize_and_quantize_then_prune_pass_the_checks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    acc = StatsAccumulator(64)
    acc.update(torch.randn(256, 64, generator=g))
    stats = acc.result()
    pruned = layer(w)
    prune = get_technique("magnitude")(sparsity=0.5)
    pruned2, _ = prune.apply(pruned, None)
    check_step(pruned, pruned2, prune)
    quant = get_technique("rtn")(bits=4, group_size=32)
    quantized, _ = quant.apply(pruned2, stats)
    check_step(pruned2, quantized, quant)  # the mask survives
    assert torch.equal(quantized.terms[0].mask, pruned2.terms[0].mask)

    q_first, _ = quant.apply(layer(w), stats)
    then_pruned, _ = prune.apply(q_first, None)
    check_step(q_first, then_pruned, prune)  # the codes survive
    assert torch.equal(then_pruned.terms[0].values.codes, q_first.terms[0].a.codes)


class MaskMover(Magnitude):
    """A broken quantizer that re-prunes: it must be caught."""

    name: ClassVar[str] = "mask-mover"

    def plan(self, spec):
        return spec

    def apply(self, layer, stats):
        (term,) = layer.terms
        return layer.with_terms([Sparse(term.values, term.mask.roll(1, dims=1))]), {}


class CodeChanger(Magnitude):
    name: ClassVar[str] = "code-changer"

    def plan(self, spec):
        return spec

    def apply(self, layer, stats):
        (term,) = layer.terms
        q = term.a
        codes = q.codes.clone()
        codes[0, 0] = (int(codes[0, 0]) + 1) % 16
        return layer.with_terms([Dense(type(q)(codes, q.scale, q.zero, q.spec, q.perm))]), {}


def test_a_moved_mask_a_changed_code_and_unplanned_bytes_are_caught():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    sparse, _ = Magnitude(sparsity=0.5).apply(layer(w), None)
    with pytest.raises(InvariantError, match="mask"):
        check_step(sparse, MaskMover(sparsity=0.5).apply(sparse, None)[0], MaskMover(sparsity=0.5), "l0")
    q = layer(w).with_terms([Dense(quantize_rtn(w, QuantSpec(4, 32)))])
    with pytest.raises(InvariantError, match="codes"):
        check_step(q, CodeChanger(sparsity=0.5).apply(q, None)[0], CodeChanger(sparsity=0.5))
    prune = Magnitude(sparsity=0.5)
    with pytest.raises(InvariantError, match="planned"):  # 25% kept where 50% was planned
        check_step(layer(w), Magnitude(sparsity=0.75).apply(layer(w), None)[0], prune)


def test_legal_orders_run_in_the_pipeline_and_illegal_ones_are_refused_before_loading():
    shapes = linear_shapes(tiny_llama(layers=1))
    for steps in ([{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}],
                  [{"rtn": {"bits": 4, "group_size": 32}}, {"wanda": {"sparsity": 0.5}}],
                  [{"svdllm": {"ratio": 0.6}}, {"gptq": {"bits": 4, "target": "lowrank"}}],
                  [{"rtn": {"bits": 4}}, {"svdllm": {"ratio": 0.6, "allow_offgrid": True}}]):  # Q→L, analysis only
        recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": steps})
        planned = recipe.check(shapes)
        report = compress(tiny_llama(layers=1), recipe, windows(4, 16))
        assert report.linear_bytes == planned.linear_bytes
    for steps, reason in (([{"gptq": {"bits": 4}}, {"sparsegpt": {"sparsity": 0.5}}], "updates weights"),
                          ([{"rtn": {"bits": 4}}, {"svd": {"ratio": 0.5}}], "quantized"),
                          ([{"rtn": {"bits": 4}}, {"rtn": {"bits": 3}}], "already quantized")):
        with pytest.raises((IllegalStep, ValueError), match=reason):
            Recipe.from_dict({"steps": steps}).check(shapes)
