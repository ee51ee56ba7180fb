"""Damaged and edited run directories: each one fails to load with a CheckpointError naming the file, and the
layer and field where there is one. Zero silent wrong loads.

The runs are tiny Llamas saved by `save_compressed` (RTN 4-bit g32 asymmetric; magnitude 50% + RTN for the
sparse cases); every case copies one and damages the copy as a careless or hostile user would.
"""

import json
import logging
import shutil
import struct

import pytest
import torch
from conftest import build_tiny_tokenizer
from helpers import logits, tiny_llama, windows
from safetensors.torch import load_file, save_file

from lmcompose import Recipe, compress
from lmcompose.core.errors import CheckpointError, CheckpointFileMissing
from lmcompose.models.checkpoint import load_compressed, save_compressed
from lmcompose.models.load import load_any, load_model

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"
RECIPES = {"dense": [{"rtn": {"bits": 4, "group_size": 32}}],
           "sparse": [{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}}]}


def build_runs(root) -> dict:
    """The intact runs: {name: (path, logits of the compressed model)} (also benchmarks/damaged_rundirs.py)."""
    out = {}
    for name, steps in RECIPES.items():
        model = tiny_llama()
        compress(model, Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": steps}), windows())
        out[name] = (save_compressed(model, root / name, build_tiny_tokenizer()), logits(model, windows()))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return build_runs(tmp_path_factory.mktemp("runs"))


# -- ways to damage a run directory ---------------------------------------------------------------------
def edit_meta(fn):
    def damage(d):
        meta = json.loads((d / "lmcompose.json").read_text())
        meta = fn(meta)
        (d / "lmcompose.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return damage


def edit_layer(layer, fn):
    def edit(meta):
        fn(meta["layers"][layer])
        return meta
    return edit_meta(edit)


def edit_tensors(fn):
    def damage(d):
        state = load_file(str(d / "model.safetensors"))
        fn(state)
        save_file(state, str(d / "model.safetensors"))
    return damage


def flip_byte(tensor, at=1):
    """Flip every bit of one byte of `tensor` inside model.safetensors, in place (header untouched)."""
    def damage(d):
        path = d / "model.safetensors"
        raw = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
        assert end - start > at
        raw[8 + n + start + at] ^= 0xFF
        path.write_bytes(bytes(raw))
    return damage


def truncate(fraction):
    def damage(d):
        path = d / "model.safetensors"
        raw = path.read_bytes()
        path.write_bytes(raw[:int(len(raw) * fraction)])
    return damage


def remove(name):
    return lambda d: (d / name).unlink()


def edit_config(**fields):
    def damage(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
    return damage


def set_path(layer, path, value):
    def fn(m):
        *head, last = path
        for k in head:
            m = m[k]
        m[last] = value
    return edit_layer(layer, fn)


QUANT = ("terms", 0, "a", "quant")

# (id, run, damage, error type, substrings of the message, checksums needed to catch it)
CASES = [
    ("truncated safetensors", "dense", truncate(0.5), CheckpointError,
     ["model.safetensors", "truncated or damaged"], False),
    ("truncated inside the header", "dense", truncate(0.0005), CheckpointError,
     ["model.safetensors", "truncated or damaged"], False),
    ("flipped byte in a scale", "dense", flip_byte(f"{Q}.terms.0.a.scale"), CheckpointError,
     ["model.safetensors", f"layer {Q}", f"{Q}.terms.0.a.scale", "sha256"], True),
    ("flipped code byte", "dense", flip_byte(f"{Q}.terms.0.a.codes", at=7), CheckpointError,
     ["model.safetensors", f"layer {Q}", f"{Q}.terms.0.a.codes", "sha256"], True),
    ("flipped zero-point byte", "dense", flip_byte(f"{UP}.terms.0.a.zero"), CheckpointError,
     ["model.safetensors", f"layer {UP}", "zero", "sha256"], True),
    ("flipped byte in the embedding", "dense", flip_byte("model.embed_tokens.weight", at=100), CheckpointError,
     ["model.safetensors", "model.embed_tokens.weight", "sha256"], True),
    ("symmetric edited false -> true", "dense", set_path(Q, (*QUANT, "symmetric"), True), CheckpointError,
     ["model.safetensors", f"layer {Q}", "field 'terms[0].a.quant.symmetric'", "zero"], False),
    ("bits edited 4 -> 3", "dense", set_path(Q, (*QUANT, "bits"), 3), CheckpointError,
     ["model.safetensors", f"layer {Q}", "quant.bits", "codes"], False),
    ("bits edited 4 -> 9 (out of range)", "dense", set_path(Q, (*QUANT, "bits"), 9), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].a.quant'", "bits=9"], False),
    ("group_size edited 32 -> 16", "dense", set_path(Q, (*QUANT, "group_size"), 16), CheckpointError,
     ["model.safetensors", f"layer {Q}", "quant.group_size", "scale"], False),
    ("group_size edited 32 -> 33 (same group count)", "dense", set_path(Q, (*QUANT, "group_size"), 33),
     CheckpointError, ["lmcompose.json", f"layer {Q}", "edited"], True),
    ("scale_dtype edited fp16 -> bf16", "dense", set_path(Q, (*QUANT, "scale_dtype"), "bf16"), CheckpointError,
     ["model.safetensors", f"layer {Q}", "scale_dtype", "float16"], False),
    ("shape edited", "dense", set_path(Q, ("terms", 0, "a", "shape"), [64, 32]), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].a.shape'"], False),
    ("shape edited to a string", "dense", set_path(Q, ("terms", 0, "a", "shape"), "64x64"), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].a.shape'"], False),
    ("in_features and shape edited together", "dense",
     edit_layer(Q, lambda m: (m.update(in_features=32), m["terms"][0]["a"].update(shape=[64, 32]))),
     CheckpointError, ["model.safetensors", f"layer {Q}", "codes"], False),
    ("kind edited dense -> lowrank", "dense", set_path(Q, ("terms", 0, "kind"), "lowrank"), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].u'", "missing"], False),
    ("kind edited to an unknown kind", "dense", set_path(Q, ("terms", 0, "kind"), "bogus"), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].kind'", "allowed"], False),
    ("bias edited false -> true", "dense", set_path(Q, ("bias",), True), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'bias'", f"{Q}.bias"], False),
    ("terms key deleted", "dense", edit_layer(Q, lambda m: m.pop("terms")), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms'", "missing"], False),
    ("a layer removed from 'layers'", "dense", edit_meta(lambda m: (m["layers"].pop(Q), m)[1]), CheckpointError,
     ["model.safetensors", f"layer {Q}", "field 'layers'", "does not list"], False),
    ("a layer's entry is a list", "dense", set_path(Q, ("terms",), [[1, 2]]), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "terms[0]", "not an object"], False),
    ("sparse index edited bitmask -> csr", "sparse", set_path(Q, ("terms", 0, "index"), "csr"), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].index'", f"{Q}.terms.0.col"], False),
    ("sparse nnz edited", "sparse", edit_layer(Q, lambda m: m["terms"][0].update(nnz=m["terms"][0]["nnz"] - 8)),
     CheckpointError, ["model.safetensors", f"layer {Q}", "codes"], False),
    ("flipped byte in a sparse index", "sparse", flip_byte(f"{Q}.terms.0.index", at=3), CheckpointError,
     ["model.safetensors", f"layer {Q}", f"{Q}.terms.0.index"], True),
    ("lmcompose.json is []", "dense", edit_meta(lambda m: []), CheckpointError,
     ["lmcompose.json", "JSON list, not an object"], False),
    ("lmcompose.json is not JSON", "dense", edit_meta(lambda m: "{\"format_version\": 1,"), CheckpointError,
     ["lmcompose.json", "not valid JSON"], False),
    ("lmcompose.json lacks 'layers'", "dense", edit_meta(lambda m: (m.pop("layers"), m)[1]), CheckpointError,
     ["lmcompose.json", "field 'layers'", "missing"], False),
    ("lmcompose.json lacks 'format_version'", "dense", edit_meta(lambda m: (m.pop("format_version"), m)[1]),
     CheckpointError, ["lmcompose.json", "field 'format_version'", "missing"], False),
    ("unknown format_version", "dense", edit_meta(lambda m: {**m, "format_version": 99}), CheckpointError,
     ["lmcompose.json", "field 'format_version'", "99", "reads 1"], False),
    ("model_ops is not a list", "dense", edit_meta(lambda m: {**m, "model_ops": {"kind": "x"}}), CheckpointError,
     ["lmcompose.json", "field 'model_ops'"], False),
    ("model_ops entry without fields", "dense", edit_meta(lambda m: {**m, "model_ops": [{"kind": "conjugate"}]}),
     CheckpointError, ["lmcompose.json", "field 'model_ops'"], False),
    ("a checksum edited", "dense",
     edit_meta(lambda m: (m["checksums"]["tensors"].update({f"{Q}.terms.0.a.codes": "0" * 64}), m)[1]),
     CheckpointError, ["model.safetensors", f"layer {Q}", "codes", "sha256"], True),
    ("lmcompose.json deleted", "dense", remove("lmcompose.json"), CheckpointFileMissing,
     ["lmcompose.json", "is missing"], False),
    ("model.safetensors deleted", "dense", remove("model.safetensors"), CheckpointFileMissing,
     ["model.safetensors", "is missing"], False),
    ("config.json deleted", "dense", remove("config.json"), CheckpointFileMissing,
     ["config.json", "is missing"], False),
    ("config with fewer layers", "dense", edit_config(num_hidden_layers=1), CheckpointError,
     ["config.json", "layer model.layers.1."], False),
    ("config with another width", "dense", edit_config(hidden_size=32, head_dim=8), CheckpointError,
     ["config.json", f"layer {Q}", "out_features/in_features"], False),
    ("config.json rope_theta edited", "dense", edit_config(rope_theta=5.0), CheckpointError,
     ["config.json", "does not match the sha256", "edited"], True),
    ("tokenizer.json edited", "dense",
     lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace('"a"', '"b"', 1)),
     CheckpointError, ["tokenizer.json", "does not match the sha256"], True),
    ("tokenizer_config.json deleted", "dense", remove("tokenizer_config.json"), CheckpointError,
     ["tokenizer_config.json", "missing"], True),
    ("config with an unknown model type", "dense", edit_config(model_type="no-such-model"), CheckpointError,
     ["config.json", "cannot build a model", "no-such-model"], False),
    ("a zero-point tensor removed", "dense", edit_tensors(lambda s: s.pop(f"{Q}.terms.0.a.zero")), CheckpointError,
     ["lmcompose.json", f"layer {Q}", "field 'terms[0].a.quant.symmetric'", "lacks it"], False),
    ("a scale re-saved in fp32", "dense",
     edit_tensors(lambda s: s.update({f"{Q}.terms.0.a.scale": s[f"{Q}.terms.0.a.scale"].float()})),
     CheckpointError, ["model.safetensors", f"layer {Q}", "field 'terms[0].a.quant.scale_dtype'"], False),
    ("an extra tensor in a layer", "dense",
     edit_tensors(lambda s: s.update({f"{Q}.terms.1.a.codes": torch.zeros(8, dtype=torch.uint8)})),
     CheckpointError, ["model.safetensors", f"layer {Q}", f"{Q}.terms.1.a.codes", "does not describe"], False),
    ("an extra tensor outside the layers", "dense",
     edit_tensors(lambda s: s.update({"model.layers.7.extra": torch.zeros(3)})),
     CheckpointError, ["model.safetensors", "model.layers.7.extra", "no place"], False),
    ("the embedding removed", "dense", edit_tensors(lambda s: s.pop("model.embed_tokens.weight")), CheckpointError,
     ["model.safetensors", "model.embed_tokens.weight"], False),
    ("the embedding re-saved with another shape", "dense",
     edit_tensors(lambda s: s.update({"model.embed_tokens.weight": s["model.embed_tokens.weight"][:100]})),
     CheckpointError, ["model.safetensors", "model.embed_tokens.weight", "shape"], False),
]


def damaged(runs, tmp_path, run, damage):
    d = tmp_path / "run"
    shutil.copytree(runs[run][0], d)
    damage(d)
    return d


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_run_directory_fails_with_a_message_that_names_the_place(case, runs, tmp_path):
    _, run, damage, error, parts, _ = case
    d = damaged(runs, tmp_path, run, damage)
    with pytest.raises(error) as err:
        load_any(str(d))
    message = str(err.value)
    missing = [p for p in parts if p not in message]
    assert not missing, f"{message!r} lacks {missing}"
    assert err.value.file and str(d) in err.value.file  # the file is named by its full path


@pytest.mark.parametrize("case", [c for c in CASES if not c[5]], ids=[c[0] for c in CASES if not c[5]])
def test_without_verification_an_inconsistency_still_fails(case, runs, tmp_path):
    _, run, damage, error, parts, _ = case
    d = damaged(runs, tmp_path, run, damage)
    with pytest.raises(error) as err:
        load_any(str(d), verify=False)
    assert not [p for p in parts if p not in str(err.value)]


def test_without_verification_corrupted_bytes_load_and_differ(runs, tmp_path):
    """The escape hatch does what it says: unverified, a flipped code byte loads (and computes other logits)."""
    d = damaged(runs, tmp_path, "dense", flip_byte(f"{Q}.terms.0.a.codes", at=7))
    model, _, _ = load_compressed(d, verify=False)
    assert not torch.equal(logits(model, windows()), runs["dense"][1])


@pytest.mark.parametrize("run", list(RECIPES))
def test_an_intact_run_loads_verified_and_identical(runs, run):
    path, expected = runs[run]
    meta = json.loads((path / "lmcompose.json").read_text())
    assert set(meta["checksums"]["tensors"]) == set(load_file(str(path / "model.safetensors")))
    model, _, _ = load_compressed(path)
    assert torch.equal(logits(model, windows()), expected)


def test_a_run_saved_before_checksums_loads_with_a_warning(runs, tmp_path, caplog):
    d = damaged(runs, tmp_path, "dense", edit_meta(lambda m: (m.pop("checksums"), m)[1]))
    with caplog.at_level(logging.WARNING):
        model, _, _ = load_compressed(d)
    assert "no checksums" in caplog.text
    assert torch.equal(logits(model, windows()), runs["dense"][1])


def test_a_stripped_run_directory_is_never_loaded_as_a_plain_model(runs, tmp_path):
    """Without lmcompose.json, transformers would load the directory with random Linears (ppl ~1e14)."""
    d = damaged(runs, tmp_path, "dense", remove("lmcompose.json"))
    for load in (load_any, load_model):
        with pytest.raises(CheckpointFileMissing, match=r"lmcompose\.json: is missing, but model\.safetensors holds "
                                                         "lmcompose's compressed Linears"):
            load(str(d))
    # also when the safetensors header carries no lmcompose tag: the tensor names give it away
    state = load_file(str(d / "model.safetensors"))
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FileNotFoundError, match="compressed Linears"):
        load_model(str(d))


def test_load_model_refuses_a_run_directory(runs):
    with pytest.raises(ValueError, match="is an lmcompose run directory.*load_any"):
        load_model(str(runs["dense"][0]))


def test_the_cli_reports_a_damaged_run_in_one_line_and_no_verify_reaches_the_loader(runs, tmp_path, capsys,
                                                                                   monkeypatch):
    from lmcompose.cli import main
    from lmcompose.models import load as load_mod

    d = damaged(runs, tmp_path, "dense", flip_byte(f"{Q}.terms.0.a.codes", at=7))
    data = tmp_path / "data"
    (data / "wikitext-2").mkdir(parents=True)
    (data / "wikitext-2" / "wiki.test.raw").write_text("some text\n" * 100)
    assert main(["eval", "--model", str(d), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{Q}.terms.0.a.codes does not match the sha256" in " ".join(err.split())
    seen = []

    def fake_load_any(*a, verify=True, **k):
        seen.append(verify)
        raise CheckpointError("stop here")

    monkeypatch.setattr(load_mod, "load_any", fake_load_any)
    assert main(["eval", "--model", str(d), "--no-verify", "--data-dir", str(data)]) == 2
    assert seen == [False]
