"""Perplexity and fidelity one block at a time (eval/streamed.py): the numbers equal the in-memory path's exactly,
for a base checkpoint and a compressed run directory (sharded or not), in chunks of windows, and a damaged shard is
refused when its block is read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import tiny_gemma3, tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.cli import main
from lmcompose.core.errors import CheckpointError
from lmcompose.eval.perplexity import get_protocol, perplexity
from lmcompose.eval.fidelity import fidelity
from lmcompose.eval.streamed import streamed_fidelity, streamed_perplexity
from lmcompose.models.checkpoint import SHARD_INDEX, load_compressed, save_compressed, save_streamed
from lmcompose.models.stream import open_for_streaming, open_streamed
from lmcompose.pipeline.resume import work_dir_for

PROTOCOL = get_protocol("quick", seqlen=24, max_windows=6, batch_size=2)
RECIPE = Recipe.from_dict({"calibration": {"batch_size": 2},
                           "steps": [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}]})


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    rows = [" = Title = ", " ", " The first paragraph has some words in it .", " Another one , 2 + 2 = 4 ."]
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(("\r\n".join(rows) + "\r\n").encode() * 12)
    return tmp_path


def _saved(model, tmp_path, tokenizer, shard="60KB"):
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size=shard)
    tokenizer.save_pretrained(base)
    return base


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("chunk", [None, 2])
def test_a_base_checkpoint_streamed_gives_the_in_memory_perplexity(tmp_path, data_dir, tiny_tokenizer, build, chunk):
    base = _saved(build(), tmp_path, tiny_tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    expected = perplexity(dense, tiny_tokenizer, PROTOCOL, data_dir)
    model, tok, blocks = open_for_streaming(str(base))
    calls = []
    got = streamed_perplexity(model, tok, PROTOCOL, blocks, data_dir, chunk_windows=chunk,
                              progress=lambda d, t: calls.append((d, t)))
    assert got.nll_sum == expected.nll_sum and got.ppl == expected.ppl and got.n_tokens == expected.n_tokens
    chunks = 1 if chunk is None else 3
    assert calls[-1] == (chunks * len(dense.model.layers),) * 2
    # the blocks are on the meta device again: nothing of them stays in memory
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())


@pytest.mark.parametrize("sharded", [False, True])
def test_a_compressed_run_directory_streamed_gives_the_loaded_checkpoints_perplexity(
        tmp_path, data_dir, tiny_tokenizer, sharded):
    base = _saved(tiny_llama(layers=3), tmp_path, tiny_tokenizer)
    out = tmp_path / "run"
    if sharded:  # as `compress --stream` writes it: one shard per block
        model, tok, blocks = open_streamed(str(base))
        report = compress(model, RECIPE, windows(), work_dir=work_dir_for(out), block_io=blocks)
        save_streamed(model, out, tok, work_dir=work_dir_for(out), float_dtype=RECIPE.float_dtype,
                      report=report.to_dict())
        assert (out / SHARD_INDEX).is_file()
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
        compress(model, RECIPE, windows())
        save_compressed(model, out, tiny_tokenizer, float_dtype=RECIPE.float_dtype)
    loaded, tok, _ = load_compressed(out)
    expected = perplexity(loaded, tok, PROTOCOL, data_dir)
    model, tok, blocks = open_for_streaming(str(out))
    got = streamed_perplexity(model, tok, PROTOCOL, blocks, data_dir, chunk_windows=4)
    assert got.nll_sum == expected.nll_sum and got.ppl == expected.ppl


def test_a_damaged_block_is_refused_when_its_block_is_read(tmp_path, data_dir, tiny_tokenizer):
    base = _saved(tiny_llama(), tmp_path, tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    compress(model, RECIPE, windows())
    out = tmp_path / "run"
    save_compressed(model, out, tiny_tokenizer, float_dtype=RECIPE.float_dtype)
    state = load_file(str(out / "model.safetensors"))
    key = next(k for k in sorted(state) if k.startswith("model.layers.1.") and state[k].is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1  # same shape, other bytes: only the checksum can tell
    meta = json.loads((out / "lmcompose.json").read_text())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((out / "lmcompose.json").read_text()) == meta
    model, tok, blocks = open_for_streaming(str(out))  # only the table of names is checked up front
    with pytest.raises(CheckpointError, match="damaged"):
        streamed_perplexity(model, tok, PROTOCOL, blocks, data_dir)


def test_cli_eval_stream_prints_the_same_number(setup, tmp_path):
    _, model_dir, data, _ = setup
    results = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"e{len(extra)}.json"
        assert main(["eval", "--model", str(model_dir), "--data-dir", str(data), "--protocol", "quick",
                     "--dtype", "fp32", "--json", str(out), *extra]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["ppl"] == results[1]["ppl"] and results[0]["n_tokens"] == results[1]["n_tokens"]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("chunk", [None, 2])
def test_fidelity_streamed_equals_fidelity_in_memory(tmp_path, data_dir, tiny_tokenizer, build, chunk):
    base = _saved(build(), tmp_path, tiny_tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    compress(dense, RECIPE, windows())
    out = tmp_path / "run"
    save_compressed(dense, out, tiny_tokenizer, float_dtype=RECIPE.float_dtype)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    loaded, tok, _ = load_compressed(out)
    expected = fidelity(dense, loaded, tok, PROTOCOL, data_dir, max_windows=None)
    assert expected.kl_mean > 0 and expected.n_windows == 6
    d, tok, d_blocks = open_for_streaming(str(base))
    c, _, c_blocks = open_for_streaming(str(out))
    calls = []
    got = streamed_fidelity(d, d_blocks, c, c_blocks, tok, PROTOCOL, data_dir, max_windows=None,
                            chunk_windows=chunk, progress=lambda done, total: calls.append((done, total)))
    assert (got.kl_mean, got.top1_agreement, got.n_tokens) == (expected.kl_mean, expected.top1_agreement,
                                                                 expected.n_tokens)
    assert got.protocol == expected.protocol
    chunks = 1 if chunk is None else 3
    assert calls[-1] == (chunks * 2 * len(d.model.layers),) * 2
    assert all(p.device.type == "meta" for m in (d, c) for p in m.model.layers.parameters())


def test_cli_fidelity_stream_prints_the_same_numbers(setup, tmp_path):
    _, model_dir, data, recipe = setup
    run = tmp_path / "run"
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--data-dir", str(data),
                 "--out", str(run)]) == 0
    results = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"f{len(extra)}.json"
        assert main(["fidelity", "--dense", str(model_dir), "--compressed", str(run), "--data-dir", str(data),
                     "--dtype", "fp32", "--max-windows", "4", "--json", str(out), *extra]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["kl_mean"] > 0
    for key in ("kl_mean", "top1_agreement", "n_tokens"):
        assert results[0][key] == results[1][key]


def test_a_tied_head_stored_under_its_head_name_streams(tmp_path, data_dir, tiny_tokenizer):
    # a tied embedding stored only as lm_head.weight (as lmcompose's dequantized copy of a GGUF stores it)
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    base = _saved(model, tmp_path, tiny_tokenizer, shard="10MB")
    state = load_file(str(base / "model.safetensors"))
    embed = state.pop("model.embed_tokens.weight", None)
    state["lm_head.weight"] = embed if embed is not None else state["lm_head.weight"]
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    expected = perplexity(model, tiny_tokenizer, PROTOCOL, data_dir)
    streamed, tok, blocks = open_for_streaming(str(base))
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
    got = streamed_perplexity(streamed, tok, PROTOCOL, blocks, data_dir)
    assert got.nll_sum == expected.nll_sum


def _zeroshot_tasks(tmp_path):
    """A multiple-choice task and a LAMBADA-style one (log-likelihood and greedy check), local files."""
    words = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "stone"]
    g = torch.Generator().manual_seed(0)
    pick = lambda k: " ".join(words[int(i)] for i in torch.randint(len(words), (k,), generator=g))  # noqa: E731
    rows = [{"q": pick(3 + i % 4), "a": pick(1), "b": pick(2), "c": pick(1), "label": i % 3} for i in range(9)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "lam.jsonl").write_text("".join(json.dumps({"text": pick(4 + i % 5)}) + "\n" for i in range(7)))
    mc = {"task": "tiny_mc", "file": "mc.jsonl", "split": "test", "doc_to_text": "Q: {{q}}\nA:",
          "doc_to_choice": "{{[a, b, c]}}", "doc_to_target": "label"}
    lam = {"task": "tiny_lambada", "file": "lam.jsonl", "split": "test", "output_type": "loglikelihood"}
    return [mc, lam]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_zeroshot_streamed_equals_zeroshot_in_memory(tmp_path, data_dir, tiny_tokenizer, build, monkeypatch):
    pytest.importorskip("lm_eval")
    from lmcompose.eval import streamed
    from lmcompose.eval.zeroshot import zeroshot

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _zeroshot_tasks(tmp_path)
    base = _saved(build(), tmp_path, tiny_tokenizer)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    expected = zeroshot(dense, tiny_tokenizer, tasks=tasks, data_dir=tmp_path, batch_size=3)
    monkeypatch.setattr(streamed, "HIDDEN_BUDGET", 3 * 16 * dense.config.hidden_size * 4)  # several groups
    model, tok, blocks = open_for_streaming(str(base))
    passes = []
    got = zeroshot(model, tok, tasks=tasks, data_dir=tmp_path, batch_size=3, blocks=blocks,
                   progress=lambda done, total: passes.append(done))
    assert got["tasks"] == expected["tasks"] and got["task_hashes"] == expected["task_hashes"]
    assert 0 < got["tasks"]["tiny_lambada"]["acc"] or 0 < got["tasks"]["tiny_mc"]["acc"]  # not vacuous
    layers = len(dense.model.layers)
    assert passes[-1] > layers and passes[-1] % layers == 0  # several groups, each reading every block once
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())


def test_cli_zeroshot_stream_prints_the_same_numbers(tmp_path, data_dir, tiny_tokenizer, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = _saved(tiny_llama(layers=3), tmp_path, tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    compress(model, RECIPE, windows())
    run = tmp_path / "run"
    save_compressed(model, run, tiny_tokenizer, float_dtype=RECIPE.float_dtype)
    spec = tmp_path / "mc.json"
    spec.write_text(json.dumps(_zeroshot_tasks(tmp_path)[0]))
    results = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"z{len(extra)}.json"
        assert main(["zeroshot", "--model", str(run), "--tasks", str(spec), "--data-dir", str(tmp_path),
                     "--batch-size", "2", "--dtype", "fp32", "--json", str(out), *extra]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tasks"] == results[1]["tasks"] and results[0]["tasks"]["tiny_mc"]["n"] == 9


def test_a_run_with_online_output_rotations_streams_to_the_same_perplexity(tmp_path, data_dir, tiny_tokenizer):
    """The output rotations are hooks on Linears that the block loader replaces on every load: they must move
    with them (and R1's conjugated final norm stay on), or the streamed number would differ."""
    base = _saved(tiny_gemma3(), tmp_path, tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2},
                               "steps": [{"rotate": {"per_head": True, "output": True}},
                                         {"gptq": {"bits": 4, "group_size": 32}}]})
    compress(model, recipe, windows())
    out = tmp_path / "run"
    save_compressed(model, out, tiny_tokenizer, float_dtype=recipe.float_dtype)
    loaded, tok, _ = load_compressed(out)
    expected = perplexity(loaded, tok, PROTOCOL, data_dir)
    model, tok, blocks = open_for_streaming(str(out))
    got = streamed_perplexity(model, tok, PROTOCOL, blocks, data_dir, chunk_windows=2)
    assert got.nll_sum == expected.nll_sum
