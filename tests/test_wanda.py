"""Wanda (and OWL's allocation rule): properties that fail when the math is wrong."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, run_technique, tiny_llama, windows
from pydantic import ValidationError

from lmcompose import Recipe, compress
from lmcompose.algebra import Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.spec import SparseSpec
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.prune.wanda import (
    Wanda,
    block_outlier_ratio,
    outlier_ratio,
    owl_sparsities,
    wanda_score,
)
from lmcompose.techniques.registry import get_technique


def problem(seed=0, m=24, n=64, tokens=512, device=None):
    """A weight (fp16 values) and the statistics of correlated inputs with a few outlier channels."""
    w, stats = layer_problem(seed, m, n, tokens, outliers=3, inputs_first=True, device=device)
    return w.half().float(), stats


def run(layer_terms, stats, **params):
    return run_technique("wanda", layer_terms, stats, **params)


def brute_force_row_mask(score, sparsity):
    """The reference: in each row prune the int(s·n) lowest scores, ties to the lower column (stable sort)."""
    rows, cols = score.shape
    prune = int(cols * sparsity)
    mask = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        order = sorted(range(cols), key=lambda j: (float(score[i, j]), j))
        mask[i, order[:prune]] = False
    return mask


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("seed", [0, 1])
def test_mask_equals_brute_force_per_row_sort_with_exact_row_sparsity(seed, sparsity):
    w, stats = problem(seed)
    w[:, 10:20:3] = 0  # zero weights: ties in a row, broken as the reference's stable sort does
    new, info = run([Dense(w.half())], stats, sparsity=sparsity)
    mask = new.terms[0].mask
    assert torch.equal(mask, brute_force_row_mask(wanda_score(w, stats.sq_mean), sparsity))
    assert (mask.sum(1) == 64 - int(64 * sparsity)).all()
    assert info["sparsity"] == pytest.approx(int(64 * sparsity) / 64)
    assert (new.to_dense()[~mask] == 0).all() and torch.equal(new.to_dense()[mask], w[mask])


def test_score_uses_the_root_of_the_second_moment():
    w, stats = problem()
    manual = w.abs() * (stats.gram.diagonal() ** 0.5)
    torch.testing.assert_close(wanda_score(w, stats.sq_mean), manual)
    # a loud input channel keeps its whole column, a silent one loses it
    stats.gram[7, 7], stats.gram[9, 9] = 1e6, 1e-9
    mask = run([Dense(w.half())], stats, sparsity=0.5)[0].terms[0].mask
    assert mask[:, 7].all() and not mask[:, 9].any()


def test_matrix_scope_keeps_the_global_top_scores():
    w, stats = problem()
    mask = run([Dense(w.half())], stats, sparsity=0.6, scope="matrix")[0].terms[0].mask
    score = wanda_score(w, stats.sq_mean).flatten()
    keep = score.numel() - int(score.numel() * 0.6)
    assert int(mask.sum()) == keep
    assert score[mask.flatten()].min() >= score[~mask.flatten()].max()


def test_uniform_activations_reduce_to_row_magnitude():
    w, stats = problem()
    stats.gram = 3.0 * torch.eye(64)
    wanda = run([Dense(w.half())], stats, sparsity=0.4)[0].terms[0].mask
    cfg = get_technique("magnitude")(sparsity=0.4, scope="row")
    mag, _ = cfg.apply(CompressedLinear(64, 24, [Dense(w.half())]), stats)
    assert torch.equal(wanda, brute_force_row_mask(w.abs(), 0.4))
    # magnitude may break ties of equal |w| differently; the kept magnitudes per row are the same
    kept = lambda mask: torch.sort(w.abs().masked_fill(~mask, -1), dim=1).values
    assert torch.equal(kept(wanda), kept(mag.terms[0].mask))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:4"])
def test_nm_keeps_exactly_n_best_per_group(pattern, device):
    n, m = map(int, pattern.split(":"))
    w, stats = problem(device=device)
    new, info = run([Dense(w.half())], stats, pattern=pattern)
    mask = new.terms[0].mask
    assert (mask.reshape(24, -1, m).sum(-1) == n).all()
    assert ((new.to_dense() != 0).reshape(24, -1, m).sum(-1) == n).all()
    groups = wanda_score(w, stats.sq_mean).reshape(24, -1, m)
    kept, dropped = groups.masked_fill(~mask.reshape(groups.shape), float("inf")), groups.masked_fill(
        mask.reshape(groups.shape), -float("inf"))
    assert (kept.amin(-1) >= dropped.amax(-1)).all()
    assert info["sparsity"] == pytest.approx(1 - n / m) and new.terms[0].n == n


def test_quantized_input_is_pruned_on_dequantized_values_and_codes_are_kept():
    w, stats = problem()
    q = quantize_rtn(w, QuantSpec(4, 32))
    new, _ = run([Dense(q)], stats, sparsity=0.5)
    (term,) = new.terms
    assert torch.equal(term.values.codes, q.codes) and torch.equal(term.values.scale, q.scale)
    assert torch.equal(term.mask, brute_force_row_mask(wanda_score(q.dequantize(), stats.sq_mean), 0.5))


@pytest.mark.parametrize("ratio", [0.3, 0.55, 0.8])
def test_ratio_budget_is_the_largest_that_fits(ratio, device):
    w, stats = problem(device=device)
    layer = CompressedLinear(64, 24, [Dense(w.half())])
    new, _ = run([Dense(w.half())], stats, ratio=ratio)
    budget = ratio * layer.spec().dense_fp16_nbytes()
    assert new.nbytes() <= budget
    keep = int(new.terms[0].mask.sum(1)[0])
    assert (new.terms[0].mask.sum(1) == keep).all()
    values = layer.spec().terms[0].a
    assert layer.spec().with_terms([SparseSpec(values, (keep + 1) * 24)]).nbytes() > budget


def test_pipeline_bytes_match_the_check_and_nm_holds_in_the_model():
    for step in ({"wanda": {"pattern": "2:4"}}, {"wanda": {"ratio": 0.6}}, {"wanda": {"sparsity": 0.5}}):
        model = tiny_llama(layers=1)
        report, _ = compress_as_checked(model, [step], windows(4, 16))  # every Linear costs what was planned
        for mod in model.modules():
            if isinstance(mod, CompressedLinear):
                (term,) = mod.terms
                assert isinstance(term, Sparse)
                if term.n:
                    assert (term.mask.reshape(mod.spec().out_features, -1, 4).sum(-1) == 2).all()
        assert all(0 < l.rel_error < 1 for l in report.layers)


# -- OWL ---------------------------------------------------------------------------------------


def test_owl_needs_an_unstructured_target_sparsity():
    for bad in (dict(ratio=0.5, owl=True), dict(pattern="2:4", owl=True)):
        with pytest.raises(ValidationError, match="owl=True allocates a target"):
            Wanda(**bad)


def test_owl_prepass_gives_outlier_blocks_lower_sparsity_and_keeps_the_mean():
    model = tiny_llama(layers=4)
    with torch.no_grad():  # block 2 gets strong outlier weights: OWL must spare it
        for name, p in model.model.layers[2].named_parameters():
            if p.dim() == 2:
                p[:, :3] *= 25
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2},
                               "steps": [{"wanda": {"sparsity": 0.5, "owl": True, "owl_lambda": 0.1}}]})
    planned = recipe.check(linear_shapes(model))
    report = compress(model, recipe, windows(4, 16))
    per_block = {}
    for layer in report.layers:
        per_block.setdefault(int(layer.name.split(".")[2]), []).append(layer.steps[0]["sparsity"])
    block = {i: sum(v) / len(v) for i, v in per_block.items()}
    assert min(block, key=block.get) == 2
    assert max(block.values()) - min(block.values()) > 0.1
    assert sum(block.values()) / len(block) == pytest.approx(0.5, abs=0.01)
    assert report.linear_bytes == pytest.approx(planned.linear_bytes, rel=0.01)


def test_owl_sparsities_follow_the_reference_formula():
    ratios = [0.01, 0.05, 0.02, 0.10, 0.04]
    s = owl_sparsities(ratios, target=0.6, lam=0.08)
    # the OWL code: density = (r − min)/(max − min)·2λ − mean(·) + (1 − target); sparsity = 1 − density
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 0.16 for r in ratios]
    expected = [1 - (x - sum(scaled) / 5 + 0.4) for x in scaled]
    assert s == pytest.approx(expected, abs=1e-12)
    assert sum(s) / 5 == pytest.approx(0.6, abs=1e-12) and max(s) - min(s) == pytest.approx(0.16)
    assert all(0.6 - 0.16 <= x <= 0.6 + 0.16 for x in s)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers -> lower sparsity
    assert owl_sparsities([0.2, 0.2, 0.2], 0.5, 0.08) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="outside"):
        owl_sparsities([0.0, 1.0], 0.95, 0.08)


def test_outlier_ratio_counts_scores_above_m_times_the_mean_pooled_per_block():
    w, stats = problem()
    score = wanda_score(w, stats.sq_mean)
    assert outlier_ratio(w, stats.sq_mean, 5.0) == pytest.approx(float((score > 5 * score.mean()).float().mean()))
    assert outlier_ratio(w, stats.sq_mean, 2.0) > outlier_ratio(w, stats.sq_mean, 5.0) > 0
    # a block pools its Linears' scores under one mean: not the average of per-Linear ratios
    w2 = 100 * w[:, :32]
    stats2 = problem(1, n=32)[1]
    pooled = torch.cat([score.flatten(), wanda_score(w2, stats2.sq_mean).flatten()])
    expected = float((pooled > 5 * pooled.mean()).double().mean())
    assert block_outlier_ratio([(w, stats.sq_mean), (w2, stats2.sq_mean)], 5.0) == pytest.approx(expected)
    assert expected != pytest.approx((outlier_ratio(w, stats.sq_mean) + outlier_ratio(w2, stats2.sq_mean)) / 2)
