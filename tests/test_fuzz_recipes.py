"""Property-based tests (Hypothesis) of the input contract (issue 19).

* Recipes: generated dicts, YAML texts and JSON texts, valid and broken (random techniques, fields, types,
  nesting, junk, YAML tricks). Each is either refused with a `ValueError` (`RecipeError`, `IllegalStep`)
  whose message is short and names what is wrong, or it is a valid plan: ``check`` and ``explain`` on a tiny
  model's shapes succeed, it stores no more than the Linears take uncompressed (unless ``allow_growth``), and
  it round-trips through YAML with the same hash. Any other exception fails the test (a "traceback").
* Command lines: generated argument sets for the commands that must fail before loading a model (recipe
  check/explain on generated files, compress, search, eval, zeroshot, fidelity, bench-speed with at least one
  bad argument) run through `lmcompose.cli.main` in-process: a nonzero exit code, exactly one ``error:`` line,
  no traceback, and no model loaded (recipe check/explain may also succeed, exit 0).

The example counts (>= 1,000 recipes, >= 200 argument sets) are asserted, and with
``LMCOMPOSE_FUZZ_REPORT=path.json`` they are written there with the outcomes and the slowest example. Runs are
derandomized (the same examples every run) unless ``LMCOMPOSE_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest
import yaml
from helpers import tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmcompose.models.load as load_module
from lmcompose.cli import main
from lmcompose.core.yamlsafe import parse_json
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.recipe import Recipe
from lmcompose.rules import explain
from lmcompose.techniques.registry import registry

SHAPES = linear_shapes(tiny_llama())
TECHNIQUES = registry()
RANDOM = os.environ.get("LMCOMPOSE_FUZZ_RANDOM") == "1"
REPORT: dict = {}


def _settings(n: int, seconds: float):
    return settings(max_examples=n, deadline=timedelta(seconds=seconds), database=None, derandomize=not RANDOM,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _record(name: str, outcomes: Counter, slowest: float) -> None:
    REPORT[name] = {"cases": sum(outcomes.values()), "outcomes": dict(outcomes), "tracebacks": 0,
                    "slowest_seconds": round(slowest, 3)}
    if os.environ.get("LMCOMPOSE_FUZZ_REPORT"):
        Path(os.environ["LMCOMPOSE_FUZZ_REPORT"]).write_text(json.dumps(REPORT, indent=2))


# -- generated values -----------------------------------------------------------------------------------------
JUNK_WORDS = ["", " 4 ", "[/x]", "[bold]x[/]", "nan", "inf", "-inf", "-1", "1e12", "true", "null", "é∂☃", "\t",
              "{", "*", "2:4", "4:8", "0:0", "x" * 300, "c4", "*q_proj", "lowrank+scales", "%s%n", "../../etc"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.sampled_from(JUNK_WORDS),
                    st.text(max_size=12))
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-2, 2), st.booleans()), inner, max_size=4)),
    max_leaves=10)
GLOBS = ["*", "*q_proj", "*k_proj", "*mlp*", "*down_proj", "model.layers.0.*", "nothing", "[/x]"]
WORDS = {"pattern": ["unstructured", "2:4", "4:8", "1:2", "5:4", "x"],
         "train": ["lowrank", "sparse", "scales", "lowrank+scales", "scales+rounding", "rounding", "zeros", "bogus"]}


def chance(odds: int):
    """True about 1 in `odds` draws."""
    return st.integers(0, odds - 1).map(lambda i: i == 0)


def mostly(good, bad, odds: int = 8):
    """`good` about (odds-1)/odds of the draws, else `bad`."""
    return chance(odds).flatmap(lambda rare: bad if rare else good)


def _options(annotation) -> tuple:
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        return tuple(o for a in get_args(annotation) for o in _options(a))
    return (annotation,)


def plausible(name: str, info):
    """Values of the field's type, mostly in range (and some out of it)."""
    out = []
    for o in _options(info.annotation):
        origin, args = get_origin(o), get_args(o)
        if o is type(None):
            out.append(st.none())
        elif o is bool:
            out.append(st.booleans())
        elif o is int:
            out.append(st.integers(1, 9) if name == "bits" else st.integers(0, 96))
        elif o is float:
            out.append(st.floats(0, 1.2, allow_nan=False))
        elif origin is Literal:
            out.append(st.sampled_from(args))
        elif origin in (tuple, list) and args and args[0] is str:
            out.append(st.lists(st.sampled_from(GLOBS), max_size=3))
        elif origin in (tuple, list):
            out.append(st.lists(st.floats(0.1, 2.0), max_size=4))
        elif origin is dict:
            out.append(st.dictionaries(st.sampled_from(["scales", "zeros", "rounding", "lowrank", "x"]),
                                       st.floats(1e-6, 1e-2), max_size=2))
        elif o is str:
            out.append(st.sampled_from(WORDS.get(name, ["unstructured", "2:4", "lowrank", "x"])))
    return st.one_of(*out) if out else JUNK


def _valid_base(cls) -> dict:
    """The first of a few small settings that `cls` accepts (so that most generated steps are near-valid)."""
    for params in ({}, {"bits": 4}, {"bits": 4, "group_size": 32}, {"ratio": 0.5}, {"sparsity": 0.5},
                   {"rank": 4}, {"bits": 4, "rank": 4}, {"sparsity": 0.5, "rank": 4}):
        try:
            cls(**params)
            return params
        except ValueError:
            continue
    return {}


BASES = {name: _valid_base(cls) for name, cls in TECHNIQUES.items()}


@st.composite
def steps(draw, junk: bool):
    """One step: a registered technique from settings it accepts, with up to three fields redrawn from their
    type's plausible values; with `junk`, also other values, unknown keys and things that are not steps."""
    maybe = (lambda good, bad, odds: mostly(good, bad, odds)) if junk else (lambda good, bad, odds: good)
    if junk and draw(chance(40)):
        return draw(JUNK)  # not a step
    name = draw(maybe(st.sampled_from(sorted(TECHNIQUES)), st.sampled_from(["", "prune", "[/x]"]), 30))
    cls = TECHNIQUES.get(name)
    params = dict(BASES.get(name, {}))
    if cls is not None:
        for field in draw(st.lists(st.sampled_from(sorted(cls.model_fields)), max_size=3, unique=True)):
            params[field] = draw(maybe(plausible(field, cls.model_fields[field]), JUNK, 12))
    if junk and draw(chance(15)):
        params[draw(st.sampled_from(["bitz", "", "[/x]", 3]))] = draw(JUNK)
    return {name: draw(maybe(st.just(params), JUNK, 30))}


CALIBRATION = {"source": st.sampled_from(["c4", "wikitext2", "bogus", "data.jsonl", "x.parquet", ""]),
               "split": st.sampled_from(["validation", "test", "train"]),
               "n": mostly(st.integers(1, 512), st.integers(-1, 10**8)),
               "seqlen": mostly(st.integers(8, 4096), st.integers(0, 2**21)),
               "seed": mostly(st.integers(0, 2**32 - 1), st.integers(-1, 2**33)), "batch_size": st.integers(-1, 64)}
RECOVER = {"steps": mostly(st.integers(0, 1000), st.integers(0, 10**8)),
           "lr": mostly(st.floats(1e-6, 1e-2), st.floats(allow_nan=True, allow_infinity=True)),
           "train": st.sampled_from(WORDS["train"]), "loss": st.sampled_from(["lm", "kl", "mse"]),
           "teacher": st.sampled_from(["cached", "online"]), "heldout": st.integers(0, 200),
           "top_k": st.integers(0, 100), "weight_decay": st.floats(-1, 1)}


@st.composite
def block(draw, fields: dict, junk: bool):
    out = {}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        out[key] = draw(mostly(fields[key], JUNK, 12) if junk else fields[key])
    return out


@st.composite
def recipe_dicts(draw, junk: bool):
    """A recipe mapping. Without `junk`, every value has the right type (ranges, combinations and chains may
    still be illegal); with it, anything may be anything (not a mapping, junk values, unknown keys)."""
    if junk and draw(chance(20)):
        return draw(JUNK)  # not a mapping
    data = {}
    if not junk or not draw(chance(15)):
        many = st.lists(steps(junk), min_size=1, max_size=3)
        data["steps"] = draw(mostly(many, st.one_of(st.just([]), JUNK), 15) if junk else many)
    for key, values in (("schedule", st.sampled_from(["layer-major", "step-major"])),
                        ("float_dtype", st.sampled_from(["fp16", "bf16", "fp32"])),
                        ("calibration", block(CALIBRATION, junk)), ("recover", block(RECOVER, junk)),
                        ("allow_growth", st.booleans())):
        if draw(chance(4)):
            data[key] = draw(mostly(values, JUNK, 6) if junk else values)
    if junk and draw(chance(10)):
        data[draw(st.sampled_from(["colour", "[/x]", "", "Steps", 1, None]))] = draw(JUNK)
    return data


def recipes():
    return st.one_of(recipe_dicts(junk=False), recipe_dicts(junk=True))


YAML_TRICKS = ["\t", "[", "]", "{", "}", ": ", "- ", "&a ", "*a ", "!!python/object:os.system ", "\n---\n", "\x00",
               "%YAML 1.1\n", "? ", "<<: *a\n", "|", "'", '"', "#", "\n  ", "!!binary ", "!!set ", "2001-12-14",
               "\x07", "\ufeff", "steps: []\n", "&a [*a]", "\r\n", "...\n", "[" * 300]


@st.composite
def yaml_texts(draw):
    text = yaml.safe_dump(draw(recipes()), sort_keys=False, allow_unicode=draw(st.booleans()))
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3), 3))):
        at = draw(st.integers(0, len(text)))
        trick = draw(st.one_of(st.sampled_from(YAML_TRICKS), st.text(max_size=4)))
        text = text[:at] + trick + text[at:]
    extra = draw(mostly(st.just(-1), st.integers(0, 1), 5))
    if extra == 0 and text.strip():  # a duplicated line: a duplicate key where it is a mapping line
        lines = text.splitlines(keepends=True)
        text += draw(st.sampled_from(lines))
    elif extra == 1:
        text += 'a0: &a0 ["x","x","x","x","x","x","x","x"]\n' + "".join(
            f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 8) + "]\n" for i in range(1, 10))
    return text


@st.composite
def json_texts(draw):
    text = json.dumps(draw(recipes()), allow_nan=True)
    for _ in range(draw(mostly(st.just(0), st.integers(1, 2), 3))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"steps": [],', "[", "}", ",", "NaN", "\x00", '"a": 1, "a": 2,'])) \
            + text[at:]
    return text


# -- the contract ---------------------------------------------------------------------------------------------
def _clean(err: Exception) -> None:
    message = str(err)
    assert message and len(message) < 3000, message[:300]
    assert "errors.pydantic.dev" not in message and "Traceback" not in message, message[:300]


def contract(load) -> str:
    """`load()` builds a Recipe: refused cleanly, or a valid plan (see the module docstring). Returns the outcome."""
    try:
        recipe = load()
    except ValueError as err:  # RecipeError, IllegalStep and pydantic's errors are ValueErrors
        _clean(err)
        return "refused"
    try:
        result = recipe.check(SHAPES)
    except ValueError as err:
        _clean(err)
        try:  # explain refuses what check refuses (hard rules, growth), with the same words
            explain(recipe, SHAPES)
        except ValueError as again:
            assert str(again) == str(err), (str(again)[:300], str(err)[:300])
        else:
            raise AssertionError(f"check refused and explain did not: {str(err)[:300]}")
        return "illegal plan"
    explain(recipe, SHAPES)
    uncompressed = result.linear_dense_bytes * (2 if recipe.float_dtype == "fp32" else 1)  # dense, fp16 or wider
    assert result.linear_bytes <= uncompressed or recipe.allow_growth
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.hash() == recipe.hash()
    return "valid plan"


def _run_property(strategy, n: int, seconds: float, load) -> tuple[Counter, float]:
    outcomes, slowest = Counter(), 0.0

    @_settings(n, seconds)
    @given(strategy)
    def run(value):
        nonlocal slowest
        t0 = time.perf_counter()
        outcomes[contract(lambda: load(value))] += 1
        slowest = max(slowest, time.perf_counter() - t0)

    run()
    return outcomes, slowest


def test_generated_recipes_are_refused_cleanly_or_are_valid_plans():
    total = Counter()
    for name, strategy, n, load in (
        ("recipe dicts", recipes(), 650, Recipe.from_dict),
        ("recipe YAML texts", yaml_texts(), 450, Recipe.from_yaml),
        ("recipe JSON texts", json_texts(), 150, lambda text: Recipe.from_dict(parse_json(text, "recipe"))),
    ):
        outcomes, slowest = _run_property(strategy, n, 5.0, load)
        _record(name, outcomes, slowest)
        assert slowest < 5.0
        total += outcomes
    assert sum(total.values()) >= 1000, total
    # the generators reach every outcome, so the contract is tested on both sides
    assert total["refused"] > 100 and total["valid plan"] > 50 and total["illegal plan"] > 5, total


# -- command lines --------------------------------------------------------------------------------------------
@pytest.fixture
def cli_world(setup, tmp_path, monkeypatch):
    """Files the generated command lines point at; loading weights fails the test."""
    root, model_dir, data, recipe = setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load_module, "load_any", refuse)
    monkeypatch.setattr(load_module, "load_model", refuse)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    (tmp_path / "broken.yaml").write_text("steps: [{rtn: {bits: 4}\n")
    (tmp_path / "bomb.yaml").write_text('a0: &a0 ["x","x","x","x","x","x","x","x"]\n' + "".join(
        f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 8) + "]\n" for i in range(1, 10)))
    (tmp_path / "space.yaml").write_text("techniques: {svd: {rank: {low: true, high: 4}}}\n")
    return {"model": str(model_dir), "data": str(data), "recipe": str(recipe), "tmp": tmp_path}


BAD_MODELS = ["nope-model", "[/x]", "/no/such/dir", "", "x" * 300]
JUNK_ARGS = ["bogus", "[/x]", "[bold]x[/]", "-1", "0", "nan", "inf", "1e999", "", " 4 ", "x" * 300, "é", "1.5"]


def _bad(tmp: Path) -> dict[str, list]:
    """Per command: flag -> values that must be refused before anything loads."""
    paths = {"under_file": str(tmp / "file" / "sub"), "empty": str(tmp / "empty"), "missing": str(tmp / "missing"),
             "exists": str(tmp / "exists")}
    junk = st.sampled_from(JUNK_ARGS)
    return {
        "compress": {
            "--eval": junk, "--calib-n": st.sampled_from(["0", "-3", "x", "1e12", "nan"]),
            "--calib-seqlen": st.sampled_from(["1", "7", "y"]), "--seed": st.sampled_from(["-1", str(2**32), "s"]),
            "--max-tokens": st.sampled_from(["0", "1", "m"]),
            "--out": st.sampled_from([paths["under_file"], paths["exists"], str(tmp / "file")]),
            "--data-dir": st.sampled_from([paths["empty"], paths["missing"], str(tmp / "file")]),
            "--recipe": st.sampled_from([paths["missing"], str(tmp / "broken.yaml"), str(tmp / "bomb.yaml"),
                                         str(tmp / "empty")]),
            "--preset": junk, "--calib-source": st.sampled_from(["bogus", "missing.txt", "[/x]", ""]),
            "--dtype": junk, "--device": junk, "--compute-dtype": junk, "--model": st.sampled_from(BAD_MODELS),
            "--export-dense": st.sampled_from([paths["under_file"], str(tmp / "file")]),
        },
        "search": {
            "--budget": st.sampled_from(["0", "-1", "1.5", "nan", "inf", "x"]),
            "--bits-per-weight": st.sampled_from(["0", "17", "nan"]), "--trials": st.sampled_from(["0", "-5", "t"]),
            "--workers": st.sampled_from(["0", "100000"]), "--sampler": junk, "--level": junk, "--backend": junk,
            "--finalists": st.sampled_from(["-1", "f"]), "--calib-n": st.sampled_from(["0", "x"]),
            "--calib-seqlen": st.sampled_from(["4", "z"]), "--seed": st.sampled_from(["-1", str(2**40)]),
            "--heldout-n": st.sampled_from(["0", "-2"]),
            "--storage": st.sampled_from(["notaurl", "postgresql+nodriver://x/y"]),
            "--space": st.sampled_from([paths["missing"], str(tmp / "broken.yaml"), str(tmp / "bomb.yaml"),
                                        str(tmp / "space.yaml")]),
            "--out": st.sampled_from([paths["under_file"], str(tmp / "file")]),
            "--data-dir": st.sampled_from([paths["empty"], paths["missing"]]), "--model": st.sampled_from(BAD_MODELS),
        },
        "eval": {"--protocol": junk, "--seqlen": st.sampled_from(["1", "0", "q"]),
                 "--batch-size": st.sampled_from(["0", "b"]), "--max-tokens": st.sampled_from(["1", "-4"]),
                 "--data-dir": st.sampled_from([paths["empty"], paths["missing"]]),
                 "--model": st.sampled_from(BAD_MODELS), "--json": st.sampled_from([paths["under_file"]]),
                 "--dtype": junk, "--device": junk},
        "zeroshot": {"--tasks": st.sampled_from(["bogus", ",", "missing.yaml", "[/x]"]),
                     "--limit": st.sampled_from(["0", "-1", "1.5", "x", "nan"]),
                     "--batch-size": st.sampled_from(["0"]), "--num-fewshot": st.sampled_from(["-1", "n"]),
                     "--model": st.sampled_from(BAD_MODELS)},
        "fidelity": {"--compressed": st.sampled_from([paths["missing"], "[/x]"]),
                     "--max-windows": st.sampled_from(["0", "w"]), "--protocol": junk},
        "bench-speed": {"--model": st.sampled_from([paths["missing"], "[/x]"]),
                        "--prompt-len": st.sampled_from(["0", "p"]), "--repeats": st.sampled_from(["0"]),
                        "--policy": junk},
    }


def _good(world: dict) -> dict[str, dict[str, str]]:
    tmp = world["tmp"]
    return {"compress": {"--model": world["model"], "--recipe": world["recipe"], "--data-dir": world["data"],
                         "--out": str(tmp / "out"), "--eval": "quick"},
            "search": {"--model": world["model"], "--budget": "0.5", "--out": str(tmp / "search"),
                       "--trials": "2", "--data-dir": world["data"]},
            "eval": {"--model": world["model"], "--data-dir": world["data"]},
            "zeroshot": {"--model": world["model"], "--tasks": "boolq"},
            "fidelity": {"--compressed": world["model"], "--dense": world["model"]},
            "bench-speed": {"--model": world["model"]}}


# Given unless a bad value is: without --tasks zeroshot reads all six default tasks (lm-eval, data hashes), without
# --model a command takes the default model's shapes (a GGUF parse): both slow
ALWAYS = ("--tasks", "--model")


@st.composite
def bad_command_lines(draw, world: dict):
    command = draw(st.sampled_from(["compress", "compress", "search", "search", "eval", "zeroshot", "fidelity",
                                    "bench-speed"]))
    bad = _bad(world["tmp"])[command]
    chosen = draw(st.lists(st.sampled_from(sorted(bad)), min_size=1, max_size=3, unique=True))
    args = [[flag, draw(bad[flag])] for flag in chosen]
    # good values only for flags no bad value is given for (argparse keeps the last of a repeated flag)
    good = _good(world)[command]
    args += [[flag, value] for flag, value in good.items()
             if flag not in chosen and (flag in ALWAYS or not draw(chance(5)))]
    if draw(chance(10)):
        args.append([draw(st.sampled_from(["--no-such-flag", "--debugg", "-x"]))])
    order = draw(st.permutations(range(len(args))))
    return [command] + [a for i in order for a in args[i]]


@st.composite
def recipe_command_lines(draw, world: dict):
    path = world["tmp"] / "generated.yaml"
    kind = draw(st.sampled_from(["plain", "yaml", "json"]))
    if kind == "plain":  # right types throughout (may still be illegal)
        text = yaml.safe_dump(draw(recipe_dicts(junk=False)), sort_keys=False)
    elif kind == "yaml":
        text = draw(yaml_texts())
    else:
        text = json.dumps(draw(recipes()), allow_nan=True)
    return (["recipe", draw(st.sampled_from(["check", "explain"])), str(path), "--model",
             draw(st.sampled_from([world["model"]] * 6 + BAD_MODELS[:3]))]
            + (["--data-dir", world["data"]] if draw(st.booleans()) else []), text)


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _assert_one_error(code: int, err: str, argv) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, (argv, code, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, (argv, err[-2000:])


def test_generated_command_lines_fail_with_one_error_line_before_loading(cli_world):
    outcomes, slowest = Counter(), 0.0

    @_settings(170, 20.0)
    @given(bad_command_lines(cli_world))
    def bad_arguments(argv):
        nonlocal slowest
        t0 = time.perf_counter()
        code, err = _run_cli(argv)
        slowest = max(slowest, time.perf_counter() - t0)
        _assert_one_error(code, err, argv)
        outcomes[f"{argv[0]}: refused"] += 1

    @_settings(110, 20.0)
    @given(recipe_command_lines(cli_world))
    def recipe_files(case):
        nonlocal slowest
        argv, text = case
        Path(argv[2]).write_text(text, encoding="utf-8", errors="surrogatepass")
        t0 = time.perf_counter()
        code, err = _run_cli(argv)
        slowest = max(slowest, time.perf_counter() - t0)
        if code == 0:
            assert not err.strip() or "error:" not in err, err
            outcomes["recipe: valid plan"] += 1
        else:
            _assert_one_error(code, err, argv)
            outcomes["recipe: refused"] += 1

    bad_arguments()
    recipe_files()
    _record("command lines", outcomes, slowest)
    assert sum(outcomes.values()) >= 200, outcomes
    assert outcomes["recipe: valid plan"] > 5 and outcomes["recipe: refused"] > 50, outcomes
    assert all(outcomes[f"{c}: refused"] > 5 for c in ("compress", "search", "eval", "zeroshot")), outcomes
    assert math.isfinite(slowest) and slowest < 20.0
