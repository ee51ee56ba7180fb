"""Every bad input gets one clear error (issue 19): recipe files, strict values, the CLI's one error path,
arguments checked before anything loads, and a resumed search that must be the same search."""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml

import lmcompose.models.load as load_module
from lmcompose.cli import main
from lmcompose.core.errors import IllegalStep, RecipeError
from lmcompose.core.yamlsafe import MAX_BYTES, load_file, parse_json, parse_yaml
from lmcompose.recipe import Recipe

RTN = {"steps": [{"rtn": {"bits": 4, "group_size": 32}}]}
SHAPES = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.up_proj": (128, 64)}


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# -- recipe files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("steps:\n\t- rtn: {bits: 4}\n", "spaces, not tabs"),
    ("steps: [{rtn: {bits: 4}\n", "line 2"),
    ("steps: [{rtn: {bits: 4}}]\n---\nsteps: []\n", "a second YAML document"),
    ("steps: [{rtn: {bits: 4}}]\x00\n", "NUL byte"),
    ("steps: !!python/object/apply:os.system ['true']\n", "tag '!!python/object/apply:os.system' is not allowed"),
    ("steps: [{rtn: {bits: !!binary aGVsbG8=}}]\n", "tag '!!binary' is not allowed"),
    ("seed: 2001-12-14\n", "tag '!!timestamp' is not allowed"),
    ("steps: " + "[" * 500 + "]" * 500 + "\n", "nested more than"),
    ("steps: [{rtn: {bits: 4}}]\nsteps: []\n", "key 'steps' appears twice (first on line 1)"),
    ("steps: [{rtn: {bits: 4, bits: 8}}]\n", "key 'bits' appears twice"),
    ("a: &x [1, *x]\n", "refers to a node that contains it"),
    ("? [a, b]\n: 1\n", "a mapping key must be a plain"),
    (_bomb(), "expands to more than"),
])
def test_malformed_yaml_is_one_clean_recipe_error(text, message):
    with pytest.raises(RecipeError) as err:
        parse_yaml(text, "recipe 'r.yaml'")
    assert message in str(err.value) and str(err.value).startswith("recipe 'r.yaml'")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_alias_bomb_is_refused_in_milliseconds_and_reasonable_aliases_still_work():
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        Recipe.from_yaml(_bomb(12))
    assert time.perf_counter() - t0 < 0.5
    text = "base: &g {bits: 4, group_size: 32}\nsteps:\n  - rtn: *g\n"
    with pytest.raises(ValueError, match="base: got .* unknown key"):  # the alias resolves; the extra key is refused
        Recipe.from_yaml(text)
    merged = parse_yaml("g: &g {bits: 4, group_size: 32}\nr: {<<: *g, bits: 3}\n")
    assert merged["r"] == {"bits": 3, "group_size": 32}  # a merge key may override (not a duplicate)


@pytest.mark.parametrize("text, message", [
    ('{"steps": [], "steps": [{"rtn": {}}]}', "key 'steps' appears twice"),
    ('{"steps": [{"gptq": {"percdamp": NaN}}]}', "NaN is not allowed"),
    ('{"steps": [{"gptq": {"percdamp": Infinity}}]}', "Infinity is not allowed"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"steps": [', "not valid JSON"),
])
def test_malformed_json_is_one_clean_recipe_error(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_json(text, "recipe 'r.json'")


def test_recipe_files_have_a_size_limit_and_must_be_utf8_text(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("steps: [{rtn: {bits: 4}}]\n" + "#" * MAX_BYTES)
    with pytest.raises(RecipeError, match="allowed: at most 1,048,576"):
        Recipe.load(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("steps: [{rtn: {include: ['é']}}]".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        Recipe.load(latin)
    with pytest.raises(RecipeError, match="not a regular file"):
        Recipe.load(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps(RTN))
    assert load_file(tmp_path / "r.json") == RTN


# -- strict values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("step, where, shows", [
    ({"rtn": {"bits": 4, "group_size": True}}, "steps[0].rtn.group_size: got True: a boolean is not a number",
     "allowed: an integer >= 1"),
    ({"rtn": {"bits": " 4 "}}, "steps[0].rtn.bits: got ' 4 ': a string is not a number", "allowed: an integer >= 2"),
    ({"rtn": {"bits": 4, "symmetric": 1}}, "steps[0].rtn.symmetric: got 1", "allowed: true or false"),
    ({"gptq": {"bits": 4, "percdamp": math.inf}}, "steps[0].gptq.percdamp: got inf: not a finite number",
     "allowed: a finite number >= 0"),
    ({"dam": {"lr": math.inf}}, "steps[0].dam.lr: got inf", "finite"),
    ({"dam": {"steps": 1e12}}, "steps[0].dam.steps: got 1000000000000.0: more than 10,000,000", "integer >= 0"),
    ({"svdllm": {"ratio": 0.5, "allocation": "sensitivity", "allocation_ratios": []}},
     "steps[0].svdllm.allocation_ratios: got []: an empty list", "non-empty list"),
    ({"svdllm": {"ratio": 0.5, "allocation": "sensitivity", "allocation_ratios": [1.0, math.nan]}},
     "item 1: not a finite number", "finite numbers"),
    ({"reconstruct": {"lr": {"scales": math.nan}}}, "steps[0].reconstruct.lr: got {'scales': nan}", "finite"),
    ({"asvd": {"rank": 4, "seed": 2**40}}, "a seed lies in [0, 4294967296)", "< 4294967296"),
])
def test_no_coercion_to_numbers_and_only_finite_bounded_values(step, where, shows):
    with pytest.raises(ValueError) as err:
        Recipe.from_dict({"steps": [step]})
    assert where in str(err.value) and shows in str(err.value)


def test_recipe_level_blocks_are_strict_too():
    for data, expected in [
        ({**RTN, "recover": {"steps": 10, "lr": math.inf}}, "recover.lr: got inf"),
        ({**RTN, "recover": {"steps": 10**9}}, "recover.steps: got 1000000000"),
        ({**RTN, "calibration": {"seed": 2**32}}, "calibration.seed: got 4294967296"),
        ({**RTN, "calibration": {"seed": -1}}, "calibration.seed: got -1"),
        ({**RTN, "calibration": {"n": 0}}, "calibration.n: got 0"),
        ({**RTN, "calibration": {"n": True}}, "calibration.n: got True: a boolean is not a number"),
        ({**RTN, "calibration": {"seqlen": "512"}}, "calibration.seqlen: got '512'"),
        ({**RTN, "calibration": {"source": "bogus"}}, "source='bogus' split='validation' is not known"),
        ({**RTN, "calibration": {"source": "wikitext2", "split": "train"}}, "split='train' is not known"),
        ({**RTN, "allow_growth": "yes"}, "allow_growth: got 'yes'"),
        ({**RTN, 3: 1}, "3: unknown key"),
        ({**RTN, None: 1}, "None: unknown key"),
        ({**RTN, "recover": {"heldout": 1}}, "heldout=1 needs steps > 0"),  # inert: it would be lost on saving
        ({"steps": [{"rtn": {7: 1}}]}, "steps[0].rtn.7: unknown key"),
    ]:
        with pytest.raises(ValueError) as err:
            Recipe.from_dict(data)
        assert expected in str(err.value), (data, str(err.value))
    assert Recipe.from_dict({**RTN, "calibration": {"source": "my.jsonl"}}).calibration.source == "my.jsonl"


def test_error_messages_never_quote_more_than_80_characters_of_a_value():
    with pytest.raises(ValueError) as err:
        Recipe.from_dict({"steps": [{"rtn": {"bits": "4" * 100_000}}]})
    assert len(str(err.value)) < 300 and "..." in str(err.value)
    with pytest.raises(ValueError) as err:
        Recipe.from_dict({"steps": [[list(range(100_000))]]})
    assert len(str(err.value)) < 600


@pytest.mark.parametrize("data", [{}, None, {"steps": []}, {"steps": None}, {"schedule": "layer-major"}])
def test_empty_recipes_are_refused(data):
    with pytest.raises(ValueError, match="empty|at least one step"):
        Recipe.from_dict(data)
    with pytest.raises(ValueError, match="empty|at least one step"):
        Recipe.from_yaml(yaml.safe_dump(data))


def test_a_recipe_that_grows_the_model_is_refused_unless_allowed():
    grows = {"steps": [{"rtn": {"bits": 8, "group_size": 1}}]}
    with pytest.raises(IllegalStep) as err:
        Recipe.from_dict(grows).check(SHAPES)
    dense = sum(o * i * 2 for o, i in SHAPES.values())
    assert f"the {dense:,} bytes they take uncompressed (dense in fp16" in str(err.value)
    assert "allow_growth: true" in str(err.value)
    assert f"stores {2 * dense:,} bytes" in str(err.value)  # 8-bit code, fp16 scale, 8-bit zero: 32 bits a weight
    allowed = Recipe.from_dict({**grows, "allow_growth": True})
    assert allowed.check(SHAPES).linear_bytes == 2 * dense
    assert Recipe.from_yaml(allowed.to_yaml()) == allowed
    # recipes that do not say it keep their hash (the key is written only when true)
    assert "allow_growth" not in Recipe.from_dict(RTN).to_dict()
    # a recipe that stores its float tensors in fp32 is measured against the dense fp32 Linears
    assert Recipe.from_dict({**grows, "float_dtype": "fp32"}).check(SHAPES).linear_bytes == 2 * dense
    with pytest.raises(IllegalStep, match=f"the {2 * dense:,} bytes they take uncompressed \\(dense in fp32"):
        Recipe.from_dict({"float_dtype": "fp32", "steps": [{"rtn": {"bits": 8, "group_size": 1,
                                                                     "scale_dtype": "fp32"}}]}).check(SHAPES)


def test_explain_refuses_growth_as_check_does(setup, tmp_path, capsys):
    """`recipe explain` used to explain a recipe that `recipe check` and compress refuse for storing more bytes
    than the dense Linears: both now end in the same `Recipe.refuse_growth`, with the same one-line error."""
    from lmcompose.rules import explain

    grows = {"steps": [{"rtn": {"bits": 8, "group_size": 1}}]}
    with pytest.raises(IllegalStep) as checked:
        Recipe.from_dict(grows).check(SHAPES)
    with pytest.raises(IllegalStep) as explained:
        explain(Recipe.from_dict(grows), SHAPES)
    assert str(explained.value) == str(checked.value) and "allow_growth: true" in str(explained.value)
    allowed = explain(Recipe.from_dict({**grows, "allow_growth": True}), SHAPES)
    assert allowed[-1].linear_bytes == Recipe.from_dict({**grows, "allow_growth": True}).check(SHAPES).linear_bytes

    _, model_dir, data, _ = setup
    path = tmp_path / "grows.yaml"
    path.write_text("steps:\n  - rtn: {bits: 8, group_size: 1}\n")
    lines = []
    for command in ("check", "explain"):
        code, out, err = _run(capsys, "recipe", command, path, "--model", model_dir, "--data-dir", data)
        assert code == 2 and not out
        lines.append(_one_error(err))
    assert lines[0] == lines[1] and "more than the" in lines[0] and "allow_growth: true" in lines[0]
    path.write_text("allow_growth: true\nsteps:\n  - rtn: {bits: 8, group_size: 1}\n")
    for command in ("check", "explain"):
        code, out, _ = _run(capsys, "recipe", command, path, "--model", model_dir, "--data-dir", data)
        assert code == 0 and "32.0" in out  # 32 bits per weight, as the recipe asked


# -- the CLI's one error path -----------------------------------------------------------------------------
def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(line.startswith(("error:", "internal error:", "hint:")) for line in lines), err
    return errors[0]


def test_user_text_is_never_read_as_markup(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('steps:\n  - rtn: {bits: 4, "[/x]": 1}\n')
    code, _, err = _run(capsys, "recipe", "check", recipe)
    assert code == 2 and "steps[0].rtn.[/x]: unknown key" in _one_error(err)
    code, _, err = _run(capsys, "recipe", "check", tmp_path / "[bold]x[/].yaml")
    assert code == 2 and "[bold]x[/].yaml" in _one_error(err)


def test_argparse_errors_take_the_same_path(capsys):
    code, out, err = _run(capsys, "compress", "--eval", "bogus")
    line = _one_error(err)
    assert code == 2 and "--eval" in line and "'quick'" in line and "'none'" in line and "usage:" not in err
    assert "hint: lmcompose compress --help" in err
    code, _, err = _run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in _one_error(err)


def test_unexpected_exceptions_print_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    import lmcompose.cli.recipe as cli_recipe

    def boom(args):
        raise TypeError("boom [/x]")

    monkeypatch.setattr(cli_recipe, "cmd_techniques", boom)
    code, _, err = _run(capsys, "techniques")
    assert code == 1 and _one_error(err) == "internal error: TypeError: boom [/x]"
    assert "hint: run with --debug for the traceback" in err
    for argv in (["--debug", "techniques"], ["techniques", "--debug"]):
        code, _, err = _run(capsys, *argv)
        assert code == 1 and "Traceback" in err and "boom [/x]" in err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_recipe, "cmd_techniques", interrupted)
    assert _run(capsys, "techniques")[0] == 130

    def missing(args):
        raise ModuleNotFoundError("No module named 'optuna'", name="optuna")

    monkeypatch.setattr(cli_recipe, "cmd_techniques", missing)
    code, _, err = _run(capsys, "techniques")
    assert code == 2 and "optuna" in _one_error(err) and "pip install 'lmcompose[search]'" in err


def test_deep_nesting_and_yaml_errors_end_in_one_line(tmp_path, capsys):
    for i, text in enumerate(["steps: " + "[" * 5000 + "]" * 5000, "a: b: c", "x: &a [*a]", _bomb(12)]):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(text)
        code, _, err = _run(capsys, "recipe", "explain", path)
        assert code == 2 and _one_error(err).startswith("error: recipe file")


# -- arguments are checked before anything loads ------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Any load of weights or of a model's shapes fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_any", "load_model", "model_linear_shapes", "meta_model"):
        monkeypatch.setattr(load_module, name, refuse)


def test_compress_checks_every_argument_before_loading(setup, tmp_path, capsys, no_loading):
    root, model_dir, data, recipe = setup
    (tmp_path / "file").write_text("x")
    (tmp_path / "no-c4").mkdir()
    (tmp_path / "no-wiki" / "c4").mkdir(parents=True)
    (tmp_path / "no-wiki" / "c4" / "c4_validation_2k.parquet").write_bytes((data / "c4" / "c4_validation_2k.parquet")
                                                                          .read_bytes())
    base = ["compress", "--model", model_dir, "--recipe", recipe, "--data-dir", data]
    for argv, expected in [
        (["--out", tmp_path / "file" / "run"], "'" + str(tmp_path / "file") + "' is a file, not a directory"),
        (["--out", tmp_path / "r", "--export-dense", tmp_path / "file" / "d"], "--export-dense"),
        (["--out", tmp_path / "r", "--data-dir", tmp_path / "no-c4"], "has no c4/c4_validation_2k.parquet"),
        (["--out", tmp_path / "r", "--data-dir", tmp_path / "no-wiki"], "has no wikitext-2/wiki.test.raw"),
        (["--out", tmp_path / "r", "--data-dir", tmp_path / "nowhere"], "does not exist"),
        (["--out", tmp_path / "r", "--calib-source", tmp_path / "missing.txt"], "missing.txt"),
        (["--out", tmp_path / "r", "--calib-source", "bogus"], "source='bogus'"),
        (["--out", tmp_path / "r", "--seed", str(2**32)], "--seed"),
        (["--out", tmp_path / "r", "--calib-n", "0"], "--calib-n"),
        (["--out", tmp_path / "r", "--max-tokens", "1"], "--max-tokens"),
        (["--out", tmp_path / "r", "--eval", "bogus"], "--eval"),
        (["--out", tmp_path / "r", "--preset", "gptq-w4g128"], "not both"),
    ]:
        code, _, err = _run(capsys, *base, *argv)
        assert code == 2 and expected in _one_error(err), (argv, err)
    assert not (tmp_path / "r").exists()


def test_eval_search_and_analyze_check_arguments_before_loading(setup, tmp_path, capsys, no_loading):
    root, model_dir, data, _ = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    space = tmp_path / "space.yaml"
    space.write_text(_bomb(12))
    for argv, expected in [
        (["eval", "--model", model_dir, "--data-dir", tmp_path / "empty"], "has no wikitext-2/wiki.test.raw"),
        (["eval", "--model", "no-such-model", "--data-dir", data], "--model 'no-such-model'"),
        (["eval", "--model", model_dir, "--data-dir", data, "--protocol", "bogus"], "--protocol"),
        (["eval", "--model", model_dir, "--data-dir", data, "--seqlen", "1"], "--seqlen"),
        (["eval", "--model", model_dir, "--data-dir", data, "--json", tmp_path / "file" / "e.json"], "is a file"),
        (["fidelity", "--compressed", tmp_path / "nope"], "--compressed"),
        (["zeroshot", "--model", model_dir, "--tasks", "bogus", "--data-dir", data], "task='bogus'"),
        (["zeroshot", "--model", model_dir, "--limit", "-1"], "--limit"),
        (["bench-speed", "--model", tmp_path / "nope"], "--model"),
        (["bench-speed", "--model", model_dir, "--repeats", "0"], "--repeats"),
        (["search", "--model", model_dir, "--budget", "1.5", "--out", tmp_path / "s"], "--budget"),
        (["search", "--model", model_dir, "--bits-per-weight", "nan", "--out", tmp_path / "s"], "--bits-per-weight"),
        (["search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / "file"], "not a directory"),
        (["search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / "s", "--space", space],
         "expands to more than"),
        (["search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / "s", "--finalists", "1",
          "--full-finalists", "2"], "--full-finalists=2"),
        (["search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / "s", "--data-dir",
          tmp_path / "empty"], "has no c4/c4_validation_2k.parquet"),
        (["analyze", "--model", model_dir, "--out", tmp_path / "a", "--a", "rtn: {bits: true}", "--b", "svd: {}"],
         "--a: steps[0].rtn.bits: got True"),
        (["search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / "s", "--storage", "notaurl"],
         "storage 'notaurl' cannot be opened"),
        (["zeroshot", "--model", "", "--tasks", "boolq"], "--model ''"),
        (["report", tmp_path / "nope", "--out", tmp_path / "rep"], "run directory"),
        (["export", tmp_path / "nope", "--format", "dense", "--out", tmp_path / "x"], "run directory"),
    ]:
        code, _, err = _run(capsys, *argv)
        assert code == 2 and expected in _one_error(err), (argv, err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "a").exists()


def test_recipe_check_validates_the_calibration_block(setup, tmp_path, capsys):
    _, model_dir, data, _ = setup
    missing = tmp_path / "r.yaml"
    missing.write_text(f"calibration: {{source: {tmp_path / 'nope.jsonl'}}}\nsteps: [{{rtn: {{bits: 4}}}}]\n")
    code, _, err = _run(capsys, "recipe", "check", missing, "--model", model_dir)
    assert code == 2 and "nope.jsonl" in _one_error(err) and "does not exist" in err
    seed = tmp_path / "seed.yaml"
    seed.write_text("calibration: {seed: 99999999999}\nsteps: [{rtn: {bits: 4}}]\n")
    code, _, err = _run(capsys, "recipe", "check", seed, "--model", model_dir)
    assert code == 2 and "calibration.seed: got 99999999999" in _one_error(err)
    good = tmp_path / "good.yaml"
    good.write_text("steps: [{rtn: {bits: 4, group_size: 32}}]\n")
    code, _, err = _run(capsys, "recipe", "check", good, "--model", model_dir, "--data-dir", tmp_path)
    assert code == 2 and "has no c4/c4_validation_2k.parquet" in _one_error(err)
    assert _run(capsys, "recipe", "check", good, "--model", model_dir, "--data-dir", data)[0] == 0


# -- search: a resumed study is the same search; integer ranges sample integers ----------------------------------
def test_a_resumed_study_must_be_the_same_search(setup, tmp_path, capsys, no_loading):
    import optuna

    from lmcompose.search.study import StudySettings, check_resume, claim_study

    _, model_dir, _, _ = setup
    out = tmp_path / "search"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    made = StudySettings(storage=storage, identity={"budget": "ratio ≤ 0.5", "level": "independent"})
    claim_study(optuna.create_study(storage=storage, study_name="lmcompose"), made)
    assert check_resume(made)
    other = StudySettings(storage=storage, identity={"budget": "ratio ≤ 0.3", "level": "independent"})
    with pytest.raises(ValueError, match="budget: 'ratio ≤ 0.5' in the study, 'ratio ≤ 0.3' now"):
        check_resume(other)
    with pytest.raises(ValueError, match="budget"):
        claim_study(optuna.load_study(study_name="lmcompose", storage=storage), other)
    capsys.readouterr()  # Optuna's own log lines
    code, _, err = _run(capsys, "search", "--model", model_dir, "--budget", "0.3", "--out", out, "--level", "proxy")
    line = _one_error(err)
    assert code == 2 and "budget: 'ratio ≤ 0.5' in the study, 'ratio ≤ 0.3' now" in line and "level" in line
    assert not StudySettings(storage=f"sqlite:///{tmp_path / 'none.db'}").identity
    assert not check_resume(StudySettings(storage=f"sqlite:///{tmp_path / 'none.db'}"))
    assert not (tmp_path / "none.db").exists()  # checking does not create a database


def test_integer_ranges_sample_integers():
    import optuna

    from lmcompose.search.space import Budget, Range, SearchSpace

    assert Range(low=32, high=256).is_int and not Range(low=0.2, high=0.6).is_int
    assert not Range(low=32, high=256, step=0.5).is_int
    for bad, message in [({"low": True, "high": 3}, "boolean"), ({"low": 0, "high": math.inf}, "finite"),
                         ({"low": 0, "high": 4, "log": True}, "low > 0"), ({"low": "1", "high": 4}, "string")]:
        with pytest.raises(ValueError, match=message):
            Range(**bad)
    space = SearchSpace.from_yaml("fit: none\nmax_steps: 1\ntechniques:\n  svd: {rank: {low: 2, high: 16}}\n")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ranks = []
    for _ in range(8):
        trial = study.ask()
        cand = space.suggest(trial, SHAPES, Budget(ratio=1.0))
        ranks.append(cand.recipe.steps[0].rank)
        study.tell(trial, 0.0)
    assert all(isinstance(r, int) and 2 <= r <= 16 for r in ranks) and len(set(ranks)) > 1
    assert all(isinstance(v, int) for t in study.trials for k, v in t.params.items() if k.endswith(".rank"))


def test_search_spaces_are_read_safely(tmp_path):
    from lmcompose.search.space import SearchSpace

    for text, message in [("techniques: {svd: {rank: [4]}}\ntechniques: {}\n", "appears twice"),
                          ("[1, 2]", "must be a mapping"), (_bomb(12), "expands to more than"),
                          ("techniques: {svd: {rank: {low: .nan, high: 4}}}", "finite")]:
        with pytest.raises(ValueError, match=message):
            SearchSpace.from_yaml(text)


# -- every command that loads honours --no-verify; data found before any load; leftovers of --out go first ------
def test_export_passes_no_verify_to_the_loader(tmp_path, capsys, monkeypatch):
    """`export` loads a run directory: --no-verify reaches load_compressed (it used to be refused by argparse)."""
    from helpers import tiny_llama

    from lmcompose.core.errors import CheckpointError
    from lmcompose.models import checkpoint

    run = checkpoint.save_compressed(tiny_llama(), tmp_path / "run")
    seen = []

    def fake_load_compressed(path, *a, verify=True, **k):
        seen.append(verify)
        raise CheckpointError("stop here")

    monkeypatch.setattr(checkpoint, "load_compressed", fake_load_compressed)
    for flags in ([], ["--no-verify"]):
        code, _, err = _run(capsys, "export", run, "--format", "dense", "--out", tmp_path / "x", *flags)
        assert code == 2 and "stop here" in _one_error(err)
    assert seen == [True, False]


def test_analyze_passes_its_loader_flags_and_refuses_a_run_directory(setup, tmp_path, capsys, monkeypatch):
    """`analyze` passes --no-verify and --trust-remote-code on (they used to be accepted and ignored), the library
    function hands them to load_model, and a run directory is refused before anything loads."""
    from helpers import tiny_llama

    from lmcompose.analysis import orthogonality as ortho
    from lmcompose.models import checkpoint

    _, model_dir, data, _ = setup
    run = checkpoint.save_compressed(tiny_llama(), tmp_path / "run")
    calls = []

    def fake_analyze(*a, **k):
        calls.append(k)
        raise ValueError("stop here")

    monkeypatch.setattr(ortho, "analyze", fake_analyze)
    steps = ["--a", "rtn: {bits: 4, group_size: 32}", "--b", "magnitude: {sparsity: 0.5}"]
    for flags in ([], ["--no-verify", "--trust-remote-code"]):
        code, _, err = _run(capsys, "analyze", "--model", model_dir, "--data-dir", data, "--out", tmp_path / "a",
                            *steps, *flags)
        assert code == 2 and "error: stop here" in err  # (after the progress bar the command had started)
    assert [(c["verify"], c["trust_remote_code"]) for c in calls] == [(True, False), (False, True)]
    code, _, err = _run(capsys, "analyze", "--model", run, "--data-dir", data, "--out", tmp_path / "a", *steps)
    assert code == 2 and "is an lmcompose run directory" in _one_error(err) and len(calls) == 2
    monkeypatch.undo()

    loads = []

    def fake_load_model(name, **k):
        loads.append(k)
        raise ValueError("stop here")

    monkeypatch.setattr(load_module, "load_model", fake_load_model)
    with pytest.raises(ValueError, match="stop here"):
        ortho.analyze(str(model_dir), {"rtn": {"bits": 4, "group_size": 32}}, {"magnitude": {"sparsity": 0.5}},
                      data_dir=str(data), verify=False)
    assert loads and loads[0]["verify"] is False and loads[0]["trust_remote_code"] is False


def test_search_and_bench_speed_pass_no_verify_to_the_loader(setup, tmp_path, capsys, monkeypatch):
    """`search` and `bench-speed` load models too: they take --no-verify (declared once, by
    `cli.common.verify_option`) and hand it to every loader they call."""
    from helpers import tiny_llama

    from lmcompose.models import checkpoint
    from lmcompose.search.study import load_dense

    _, model_dir, data, _ = setup
    loads = []

    def fake_load_model(name, **k):
        loads.append(k["verify"])
        raise ValueError("stop here")

    monkeypatch.setattr(load_module, "load_model", fake_load_model)
    for i, flags in enumerate(([], ["--no-verify"])):
        code, _, err = _run(capsys, "search", "--model", model_dir, "--budget", "0.5", "--out", tmp_path / f"s{i}",
                            "--data-dir", data, "--level", "proxy", "--finalists", "0", "--heldout-n", "0", *flags)
        assert code == 2 and "error: stop here" in err  # (after the line on the grid the command had started)
    assert loads == [True, False]
    for verify in (True, False):  # the factory of the search's workers
        with pytest.raises(ValueError, match="stop here"):
            load_dense(str(model_dir), "fp32", "cpu", False, verify)
    assert loads[2:] == [True, False]

    run = checkpoint.save_compressed(tiny_llama(), tmp_path / "run")
    seen = []

    def fake_load_any(name, *a, verify=True, **k):
        seen.append(verify)
        raise ValueError("stop here")

    monkeypatch.setattr(load_module, "load_any", fake_load_any)
    for flags in ([], ["--no-verify"]):
        code, _, err = _run(capsys, "bench-speed", "--model", run, "--no-isolate", "--policy", "auto", *flags)
        assert code == 2 and "stop here" in _one_error(err)
    assert seen == [True, False]


@pytest.mark.parametrize("command, needed", [
    (["eval"], "wikitext2:test needs the file"),
    (["fidelity", "--compressed", "MODEL", "--dense", "MODEL"], "wikitext2:test needs the file"),
    (["compress", "--recipe", "RECIPE", "--calib-source", "CALIB", "--out", "OUT"], "wikitext2:test needs the file"),
    (["analyze", "--a", "rtn: {bits: 4}", "--b", "magnitude: {sparsity: 0.5}", "--out", "OUT"],
     "c4:validation needs the file"),
])
def test_evaluation_data_is_found_before_any_model_loads(command, needed, setup, tmp_path, capsys, monkeypatch,
                                                          no_loading):
    """Without --data-dir, the data comes from $LMCOMPOSE_DATA_DIR or the hub: when neither has it, the command
    fails in one line naming the file, before the model loads (it used to load the model first)."""
    from lmcompose.core import hub
    from lmcompose.data import text

    _, model_dir, _, recipe = setup
    # an installation without the copies shipped with lmcompose (where lmcompose ships them at all)
    monkeypatch.setattr(text, "packaged_file", lambda *a, **k: None, raising=False)
    (tmp_path / "empty").mkdir()
    calib = tmp_path / "calib.txt"
    calib.write_text("w1 w2 w3\n" * 50)
    monkeypatch.setenv("LMCOMPOSE_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    subs = {"MODEL": model_dir, "RECIPE": recipe, "CALIB": calib, "OUT": tmp_path / "out"}
    argv = [subs.get(a, a) for a in command]
    if "--compressed" not in argv:
        argv += ["--model", model_dir]
    code, _, err = _run(capsys, *argv)
    line = _one_error(err)
    assert code == 2 and needed in line and str(tmp_path / "empty") in line and "HF_HUB_OFFLINE is set" in line, err
    assert not (tmp_path / "out").exists()


def test_compress_removes_what_a_killed_save_of_its_out_left_before_any_work(setup, tmp_path, capsys, no_loading):
    """A killed save leaves `.<out>.tmp-<pid>@<host>-*` beside --out; the next compress to that --out removes it
    at its start, even when it never reaches its own save (here: the model load fails). A live writer's stays."""
    import os
    import subprocess
    import sys

    from lmcompose.core import io

    _, model_dir, data, recipe = setup
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stale = tmp_path / f".run.tmp-{gone}@{io._host()}-abc"
    stale_export = tmp_path / f".dense.tmp-{gone}@{io._host()}-abc"
    live = tmp_path / f".run.tmp-{os.getppid()}@{io._host()}-abc"
    for d in (stale, stale_export, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 4096)
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--recipe", recipe, "--data-dir", data,
                        "--out", tmp_path / "run", "--export-dense", tmp_path / "dense")
    assert code != 0 and "a model was loaded" in err  # it stopped at the first load, long before saving
    assert not stale.exists() and not stale_export.exists() and live.exists()
    assert not (tmp_path / "run").exists()
