"""The search: space cutting, cached dense statistics, the proxy, shared/resumed Optuna studies, Ray."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os

import pytest
import torch

optuna = pytest.importorskip("optuna")

from helpers import tiny_llama, windows  # noqa: E402

from lmcompose import api  # noqa: E402
from lmcompose.pipeline.blocks import linear_shapes  # noqa: E402
from lmcompose.algebra.spec import LinearSpec  # noqa: E402
from lmcompose.recipe import Recipe  # noqa: E402
from lmcompose.search import objective as objective_mod  # noqa: E402
from lmcompose.search.objective import DenseStats, Evaluator, rank_correlation, spearman  # noqa: E402
from lmcompose.search.space import Budget, SearchSpace  # noqa: E402
from lmcompose.search.results import (  # noqa: E402
    completed,
    evaluate_finalists,
    finalist_trials,
    summarize,
    write_results,
)
from lmcompose.search.study import EvaluatorSpec, Problem, StudySettings, run_local, start_workers  # noqa: E402

SMALL = {"max_steps": 2, "fit": "last", "calibration": {"n": 4, "seqlen": 32},
         "techniques": {"wanda": {"sparsity": [0.3, 0.5]}, "rtn": {"bits": [3, 4], "group_size": [32]},
                        "svd": {"rank": [8]}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    calib, heldout = windows(4, 32, seed=1), windows(2, 32, seed=7)
    cache = tmp_path_factory.mktemp("cache")
    # fp32 forwards everywhere: the proxy is compared with the pipeline to 1e-4 below
    stats = DenseStats.load_or_compute(model, calib, cache, compute_dtype="fp32")
    spec = EvaluatorSpec(functools.partial(tiny_llama, 0), calib, heldout, str(cache), name="tiny",
                         compute_dtype="fp32")
    return model, Evaluator(model, stats, calib, heldout, compute_dtype="fp32"), spec


def _problem(model, budget=Budget(ratio=0.5), **overrides):
    return Problem.make(SearchSpace(**{**SMALL, **overrides}), linear_shapes(model), budget)


def _settings(tmp_path, name="s", **kw):
    return StudySettings(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=name, **kw)


def test_illegal_and_over_budget_chains_are_cut_before_any_compress(setup, tmp_path, monkeypatch):
    model, ev, _ = setup
    calls = []
    real = api.compress
    monkeypatch.setattr(objective_mod, "compress", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    # fit none: every knob is searched, so 8-bit RTN and low sparsity overshoot 30% and are cut
    space = {"max_steps": 2, "fit": "none", "techniques": {"wanda": {"sparsity": [0.5, 0.9]},
                                                           "rtn": {"bits": [2, 8]}, "svd": {"rank": [4]}}}
    problem = Problem.make(SearchSpace(**space), linear_shapes(model), Budget(ratio=0.3))
    reasons = " | ".join(c.reason for c in problem.cut)
    assert "over budget" in reasons
    assert "quantized" in reasons  # R3: svd after rtn is refused by the low-rank step's plan
    study = run_local(problem, ev, _settings(tmp_path, level="quick"), None)
    done = completed(study)
    assert len(calls) == len(done) == len(problem.grid)  # one compress per admitted recipe, none for cut ones
    assert {Recipe.from_dict(t.user_attrs["recipe"]).hash() for t in done} == set(problem.grid)
    assert all(t.user_attrs["ratio"] <= 0.3 for t in done)


def test_budget_fit_gives_last_step_the_budget(setup):
    model, _, _ = setup
    for budget in (Budget(ratio=0.5), Budget(bits_per_weight=4.2)):
        problem = _problem(model, budget)
        for cand in problem.grid.values():
            assert budget.meets(cand.check)
            assert cand.recipe.steps[-1].ratio == pytest.approx(budget.step_ratio(linear_shapes(model)))
    assert Budget(bits_per_weight=4.2).step_ratio({"a": (8, 8)}) == pytest.approx(4.2 / 16)


def test_default_space_admits_the_best_hand_written_chain_at_3_2_bits(setup):
    """SparseGPT 50% then GPTQ at 4 bits, the best two-step baseline at 3.2 bits/weight in BENCHMARKS.md, is a
    recipe of the default space (its last step fitted to the budget), and every admitted recipe meets it."""
    from lmcompose.search.space import default_space

    model, _, _ = setup
    budget = Budget(bits_per_weight=3.2)
    problem = Problem.make(default_space(), linear_shapes(model), budget)
    chains = {tuple((s.name, getattr(s, "sparsity", None)) for s in c.recipe.steps) for c in problem.grid.values()}
    assert (("sparsegpt", 0.5), ("gptq", None)) in chains
    assert all(budget.meets(c.check) for c in problem.grid.values())


def test_cached_statistics_equal_fresh_ones(setup, tmp_path):
    model, ev, _ = setup
    fresh = DenseStats.compute(model, windows(4, 32, seed=1))
    first = DenseStats.load_or_compute(model, windows(4, 32, seed=1), tmp_path)   # computes and writes
    cached = DenseStats.load_or_compute(model, windows(4, 32, seed=1), tmp_path)  # reads
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.pt"))
    assert cached.alias == fresh.alias and cached.blocks == fresh.blocks and cached.key == first.key
    for name in fresh.alias:
        a, b = fresh[name], cached[name]
        assert a.n_tokens == b.n_tokens
        assert torch.equal(a.gram, b.gram) and torch.equal(a.abs_mean, b.abs_mean) and torch.equal(a.absmax, b.absmax)
    # other windows, or another compute dtype: another cache entry
    DenseStats.load_or_compute(model, windows(4, 32, seed=2), tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    other = "bf16" if first.key == DenseStats.compute(model, windows(4, 32, seed=1), compute_dtype="fp32").key else "fp32"
    DenseStats.load_or_compute(model, windows(4, 32, seed=1), tmp_path, compute_dtype=other)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_proxy_ranks_better_recipes_first_and_matches_pipeline_on_block0(setup):
    model, ev, _ = setup
    mild = Recipe.from_dict({"steps": [{"wanda": {"sparsity": 0.2}}]})
    harsh = Recipe.from_dict({"steps": [{"wanda": {"sparsity": 0.7}}]})
    assert ev.proxy(mild).value < ev.proxy(harsh).value
    q8 = Recipe.from_dict({"steps": [{"rtn": {"bits": 8}}]})
    q2 = Recipe.from_dict({"steps": [{"rtn": {"bits": 2}}]})
    assert ev.proxy(q8).value < ev.proxy(q2).value
    # block 0 sees dense inputs in the real pipeline too: the per-layer errors agree there
    got = ev.proxy(harsh).errors
    report = api.compress(tiny_llama(), harsh, ev.calib, compute_dtype="fp32")  # the proxy's stats are fp32
    for layer in report.layers:
        if ".layers.0." in layer.name:
            assert got[layer.name] == pytest.approx(layer.rel_error, rel=1e-4)


def test_independent_level_equals_the_pipeline_when_only_block0_is_compressed(setup, tmp_path):
    """Block 0 sees dense inputs in the real pipeline too: compressing only its Linears independently gives
    the pipeline's model, so the same held-out perplexity. A study at this level records the proxy's error
    and the measured sizes beside it."""
    model, ev, _ = setup
    only0 = Recipe.from_dict({"steps": [{"wanda": {"sparsity": 0.6, "include": ["*.layers.0.*"]}}]})
    ppl, result = ev.independent(only0)
    assert ppl == pytest.approx(ev.quick(only0), rel=1e-4)
    assert result.value == pytest.approx(ev.proxy(only0).value) and not result.layers
    study = run_local(_problem(model), ev, _settings(tmp_path, level="independent"), None)
    for t in completed(study):
        recipe = Recipe.from_dict(t.user_attrs["recipe"])
        assert t.value == pytest.approx(ev.independent(recipe)[0], rel=1e-6)
        assert t.user_attrs["proxy_error"] == pytest.approx(ev.proxy(recipe).value, rel=1e-6)
        assert "planned_ratio" in t.user_attrs
    assert "independent~quick" in evaluate_finalists(study, ev, 3, "independent")


def test_spearman_handles_ties_like_scipy():
    a, b = [1, 2, 2, 3, 5, 4], [10, 20, 30, 30, 60, 50]
    assert spearman(a, b) == pytest.approx(rank_correlation(a, b))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_best_recipe_yaml_round_trips_and_meets_budget(setup, tmp_path):
    model, ev, _ = setup
    problem = _problem(model)
    study = run_local(problem, ev, _settings(tmp_path), None)
    corr = evaluate_finalists(study, ev, 4)
    assert "proxy~quick" in corr and corr["proxy~quick"]["n"] == 4
    summary = write_results(study, problem.budget, tmp_path / "out", {"correlations": corr})
    for f in ("front.json", "front.md", "best.yaml", "front.png", "trials.json", "summary.json"):
        assert (tmp_path / "out" / f).is_file()
    best = Recipe.load(tmp_path / "out" / "best.yaml")
    assert best.hash() == Recipe.from_dict(summary["best"]["recipe"]).hash()
    assert problem.budget.meets(best.check(linear_shapes(model)))
    # judged by the dearest level measured: quick perplexity of the finalists, not the proxy
    assert summary["best_by"] == "quick"
    assert summary["best"]["quick_ppl"] == min(r["quick_ppl"] for r in summary["rows"] if "quick_ppl" in r)
    assert "## Finalists" in (tmp_path / "out" / "front.md").read_text()
    assert all(not (o["size"] < r["size"] and o["score"] < r["score"]) for r in summary["front"]
               for o in summary["rows"])


def _front(study, budget):
    return sorted((r["chain"], round(r["size"], 6), round(r["score"], 8)) for r in summarize(study, budget)["front"])


def _killed_worker(spec, problem, settings, after):
    """A worker that dies abruptly (os._exit, no cleanup) once `after` trials are complete."""
    def die(study, trial):
        if len(completed(study)) >= after:
            os._exit(3)
    run_local(problem, spec.build(), settings, None, callbacks=[die])


def test_two_processes_share_one_study_and_a_killed_study_resumes(setup, tmp_path):
    model, ev, spec = setup
    problem = _problem(model)
    n = len(problem.grid)
    # uninterrupted reference, this process
    ref = run_local(problem, ev, _settings(tmp_path, "ref"), None)
    # two worker processes on one SQLite study, released together
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    shared = _settings(tmp_path, "shared")
    procs = start_workers(2, spec, problem, shared, None, barrier)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    study = optuna.load_study(study_name="shared", storage=shared.storage)
    done = completed(study)
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both processes ran trials
    assert {t.params["recipe"] for t in done} == set(problem.grid)
    assert _front(study, problem.budget) == _front(ref, problem.budget)
    # killed after 3 trials, then resumed by running again
    killed = _settings(tmp_path, "killed")
    p = ctx.Process(target=_killed_worker, args=(spec, problem, killed, 3))
    p.start()
    p.join(120)
    assert p.exitcode == 3
    assert len(completed(optuna.load_study(study_name="killed", storage=killed.storage))) == 3
    resumed = run_local(problem, ev, killed, None)
    assert len(completed(resumed)) == len(completed(ref)) == n
    assert _front(resumed, problem.budget) == _front(ref, problem.budget)
    # resuming a finished search runs no trial again (it goes straight to the finalists)
    before = len(resumed.trials)
    assert len(run_local(problem, ev, killed, None).trials) == before


def _start_ray(ray, **kwargs) -> None:
    """ray.init, retried once when Ray's node misses its fixed 30 s startup window (ray/_private/node.py:
    "The current node timed out during startup"), which happens when other jobs saturate the cores."""
    for _ in range(2):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err):
                raise
            ray.shutdown()
    pytest.skip("Ray's node did not start within its 30 s window twice (an overloaded machine)")


def test_ray_backend_finds_the_local_best(setup, tmp_path):
    ray = pytest.importorskip("ray")
    from lmcompose.search.ray_runner import run_ray

    model, ev, spec = setup
    problem = _problem(model)
    local = summarize(run_local(problem, ev, _settings(tmp_path, "local"), None), problem.budget)["best"]
    _start_ray(ray, num_cpus=2, include_dashboard=False,
               runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
    try:
        remote = summarize(run_ray(problem, spec, _settings(tmp_path, "ray"), 100, workers=2), problem.budget)["best"]
    finally:
        ray.shutdown()
    assert remote["chain"] == local["chain"] and remote["recipe"] == local["recipe"]
    assert remote["score"] == pytest.approx(local["score"], rel=1e-5)


def test_trials_record_the_bytes_measured_not_the_uniform_plan(setup, tmp_path):
    """A sensitivity-allocated step spends bytes the uniform plan of Recipe.check cannot know: the proxy
    measures them as it compresses every Linear, they equal what the real pipeline stores, and the trial
    (and so the front) records them."""
    model, ev, _ = setup
    recipe = Recipe.from_dict({"calibration": {"n": 4, "seqlen": 32}, "steps": [
        {"rtn": {"ratio": 0.2, "group_size": 32, "allocation": "sensitivity"}}]})
    planned = recipe.check(linear_shapes(model))
    result = ev.proxy(recipe)
    compressed = ev.compressed(recipe)
    from lmcompose.runtime.linear import CompressedLinear
    stored = sum(m.nbytes() for m in compressed.modules() if isinstance(m, CompressedLinear))
    assert result.linear_bytes == stored
    assert result.bits_per_weight != pytest.approx(planned.bits_per_weight)  # the plan is not what is stored
    assert result.ratio <= 0.2 + 1e-9
    problem = _problem(model, Budget(ratio=0.2), techniques={"rtn": {"group_size": [32],
                                                                     "allocation": ["uniform", "sensitivity"]}},
                       max_steps=1)
    study = run_local(problem, ev, _settings(tmp_path), None)
    for t in completed(study):
        got = ev.proxy(Recipe.from_dict(t.user_attrs["recipe"]))
        assert t.user_attrs["bits_per_weight"] == pytest.approx(got.bits_per_weight)
        assert t.user_attrs["planned_bits_per_weight"] <= t.user_attrs["bits_per_weight"] + 1e-9


def test_full_protocol_goes_to_the_best_finalists_by_quick_perplexity(setup, tmp_path):
    model, ev, _ = setup
    study = run_local(_problem(model), ev, _settings(tmp_path), None)
    by_score = [Recipe.from_dict(t.user_attrs["recipe"]).hash() for t in finalist_trials(study, 4)]

    class Reversed:  # quick perplexity ranks the finalists in the opposite order of the proxy
        heldout = True

        def compressed(self, recipe):
            return recipe.hash()

        def quick(self, recipe, model=None):
            return 100.0 - by_score.index(model)

    measured = []
    evaluate_finalists(study, Reversed(), 4, full=lambda m: measured.append(m) or 1.0, n_full=2)
    assert measured == [by_score[3], by_score[2]]
    evaluate_finalists(study, Reversed(), 4, full=lambda m: measured.append(m) or 1.0, n_full=2)
    assert len(measured) == 2  # resumed: levels already stored are not measured again


def test_finalists_span_chains_before_repeating_one(setup, tmp_path):
    model, ev, _ = setup
    study = run_local(_problem(model), ev, _settings(tmp_path), None)
    ranked = sorted(completed(study), key=lambda t: (t.values[-1], t.number))
    chains = list(dict.fromkeys(t.user_attrs["chain"] for t in ranked))
    assert len(chains) >= 3
    picked = finalist_trials(study, len(chains) + 1)
    # one per chain, each chain's best, in the order of the chains' best scores; then the next of the best chain
    assert [t.user_attrs["chain"] for t in picked[:len(chains)]] == chains
    assert all(t is min((o for o in ranked if o.user_attrs["chain"] == t.user_attrs["chain"]),
                        key=lambda o: (o.values[-1], o.number)) for t in picked[:len(chains)])
    second = next(c for c in chains if sum(t.user_attrs["chain"] == c for t in ranked) > 1)
    assert picked[-1] is [t for t in ranked if t.user_attrs["chain"] == second][1]


def test_perplexity_levels_take_the_best_scores_as_finalists(setup, tmp_path):
    model, ev, _ = setup
    study = run_local(_problem(model), ev, _settings(tmp_path), None)
    ranked = sorted(completed(study), key=lambda t: (t.values[-1], t.number))
    for k in range(1, len(ranked) + 1):
        assert [t.number for t in finalist_trials(study, k, span_chains=False)] == [t.number for t in ranked[:k]]
        spanning = finalist_trials(study, k)
        if [t.number for t in spanning] != [t.number for t in ranked[:k]]:
            break  # from here on a chain's best that is not among the k best scores is in the spanning set
    else:
        pytest.fail("the space should have a chain whose best is not among the best scores")

    class Recorder:
        heldout = True

        def compressed(self, recipe):
            return recipe.hash()

        def quick(self, recipe, model=None):
            measured.append(model)
            return 1.0

    for level, expect in (("independent", ranked[:k]), ("proxy", spanning)):
        measured = []
        evaluate_finalists(study, Recorder(), k, level=level)
        assert measured == [Recipe.from_dict(t.user_attrs["recipe"]).hash() for t in expect]
        for t in expect:  # forget the stored levels so that the next level measures again
            study.set_user_attr(f"finalist/{t.number}", {})


EXTRAS = {"rotate": [None, {}], "awq": [None, {}], "reconstruct": [None, {"train": "scales", "steps": 2}],
          "recover": [None, {"steps": 2, "loss": "kl", "train": "scales"}]}


def test_extras_are_placed_by_their_unit_and_awq_takes_its_quantizers_grid(setup):
    """rotate (a model step) leads, awq (a group step) follows it on the dense weights and searches scales for
    the grid of the chain's quantizer (bits resolved from the fitted ratio), reconstruct (a block step) ends
    the chain, recover is the recipe's recovery; where a chain has no quantizer, awq is cut with the reason
    and reconstruct finds nothing to train."""
    model, _, _ = setup
    space = SearchSpace(max_steps=2, fit="last", techniques={"wanda": {"sparsity": [0.5]}, "gptq": {"group_size": [32]}},
                        extras=EXTRAS)
    assert space.grid_size() == 4 * 16  # chains wanda, gptq, wanda → gptq, gptq → wanda; 2⁴ extra choices
    budget = Budget(bits_per_weight=4.2)
    kept, cut = space.enumerate(linear_shapes(model), budget)
    seen = set()
    for cand in kept:
        names = [s.name for s in cand.recipe.steps]
        seen.add(cand.chain)
        assert "rotate" not in names or names[0] == "rotate"
        assert "reconstruct" not in names or names[-1] == "reconstruct"
        if "awq" in names:
            awq, quant = cand.recipe.steps[names.index("awq")], cand.recipe.steps[names.index("gptq")]
            assert names.index("awq") == names.index("rotate") + 1 if "rotate" in names else names[0] == "awq"
            assert awq.group_size == quant.group_size == 32
            assert awq.bits == quant.resolve_bits(LinearSpec.dense(*next(iter(linear_shapes(model).values()))))
        assert budget.meets(cand.check)
    assert "rotate → awq → wanda → gptq → reconstruct + recover" in seen
    reasons = " | ".join(c.reason for c in cut)
    assert "no quantize step" in reasons and "reconstruct" in reasons
    assert all(len(c.recipe.steps) <= 6 for c in kept)


def test_pipeline_steps_are_refused_at_the_proxy_and_scored_by_the_pipeline_when_independent(setup, tmp_path):
    from lmcompose.search.study import score

    model, ev, _ = setup
    recipe = Recipe.from_dict({"steps": [{"awq": {"bits": 3, "group_size": 32}}, {"rtn": {"bits": 3, "group_size": 32}}]})
    assert recipe.needs_pipeline and not Recipe.from_dict({"steps": [{"rtn": {"bits": 3}}]}).needs_pipeline
    with pytest.raises(ValueError, match="only the sequential pipeline runs"):
        ev.proxy(recipe)
    space = SearchSpace(techniques={"rtn": {"bits": [3], "group_size": [32]}}, extras={"rotate": [None, {}]},
                        calibration={"n": 4, "seqlen": 32})
    with pytest.raises(ValueError, match="level='proxy' cannot score"):
        _settings(tmp_path, level="proxy").check_space(space)
    value, sizes = score(ev, recipe, "independent")
    assert sizes is None and value == pytest.approx(ev.quick(recipe), rel=1e-6)
    study = run_local(Problem.make(space, linear_shapes(model), Budget(ratio=0.5)), ev,
                      _settings(tmp_path, level="independent"), None)
    chains = {t.user_attrs["chain"]: t.value for t in completed(study)}
    assert set(chains) == {"rtn", "rotate → rtn"} and all(torch.isfinite(torch.tensor(v)) for v in chains.values())


def test_default_space_places_the_quality_extras_only_where_bytes_are_scarce():
    from lmcompose.search.space import LOW_BITS_EXTRAS, default_space

    assert set(default_space(Budget(bits_per_weight=3.2)).extras) == set(LOW_BITS_EXTRAS)
    assert set(default_space(Budget(ratio=0.2)).extras) == set(LOW_BITS_EXTRAS)
    assert not default_space(Budget(bits_per_weight=4.2)).extras and not default_space().extras
    with pytest.raises(ValueError, match="extras.rtn: rtn is a linear step"):
        SearchSpace(techniques={"rtn": {}}, extras={"rtn": [None, {}]})
    with pytest.raises(ValueError, match="non-empty list"):
        SearchSpace(techniques={"rtn": {}}, extras={"rotate": []})
