"""The main job as a newcomer meets it (issue 20): `lmcompose compress` with no data directory prints a plan,
a line per block when its output is not a terminal and a short summary with the dense perplexity beside the
run's; the run directory carries a model card; `lmcompose generate` answers beside the dense model; `lmcompose
report` on one run opens with the dense reference."""

import json

import pytest
from helpers import only_shipped_data, tiny_llama

from lmcompose.cli import main

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}the{% endif %}")


def _word_tokenizer():
    """Word-level over common English words (ids < 128): the shipped WikiText-2 test split tokenizes in ~1.5 s."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", ",", ".", "of", "and", "to", "in", "a", "=", "was", '"', "@-@", "The", "(", ")", "on", "as",
             "that", "for", "'s", "with", "by", "is", "his", "at", "from", "it", "an", "were", "he", "which", "had"]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words), "</s>": len(words) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    """No data directory and no hub: the data shipped with lmcompose answers."""
    only_shipped_data(monkeypatch)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny dense model (with a chat template) and one run of `lmcompose compress` on it, evaluated:
    ``(root, model_dir, run_dir, stdout, stderr)``."""
    mp = pytest.MonkeyPatch()
    mp.delenv("LMCOMPOSE_DATA_DIR", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("newcomer")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir, safe_serialization=True)
    _word_tokenizer().save_pretrained(model_dir)
    recipe = root / "recipe.yaml"
    recipe.write_text("calibration: {n: 4, seqlen: 64}\nsteps:\n  - rtn: {bits: 4, group_size: 32}\n")
    run = root / "run"
    import contextlib  # capsys is function-scoped: the module's one run is captured by redirecting
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(run),
                     "--eval", "quick", "--max-tokens", "2048", "--compute-dtype", "fp32"])
    mp.undo()
    assert code == 0, err.getvalue()
    return root, model_dir, run, out.getvalue(), err.getvalue()


def test_compress_prints_plan_block_lines_and_summary_with_the_dense_perplexity(made):
    root, model_dir, run, out, err = made
    report = json.loads((run / "report.json").read_text())
    assert out.startswith(f"plan: compress {model_dir} with rtn w4 g32")
    assert "calibration: c4 (validation), 4 windows of 64 tokens" in out and "estimated size: 4.625 bits/weight" in out
    # not a terminal: one line per block (2 blocks), each with its time
    assert [line.split(" done")[0] for line in err.splitlines() if "block " in line] == [
        "compress: block 1/2", "compress: block 2/2"]
    # the summary: bits, bytes, perplexity before and after, where it went; no per-Linear table by default
    dense = report["dense"]["perplexity"]
    assert report["dense"]["model"] == str(model_dir)
    assert dense["protocol"] == report["evaluation"]["protocol"] and dense["ppl"] != report["evaluation"]["ppl"]
    flat = " ".join(out.split())
    assert f"{dense['ppl']:.3f} dense -> {report['evaluation']['ppl']:.3f} compressed" in flat
    assert f"{report['total_bytes']:,}" in flat and "4.625 in the 14 compressed Linears" in flat
    assert str(run) in flat and "per-Linear results" not in out and "q_proj" not in out and "4.625 │" not in out
    # the dense number is the dense model's own perplexity under the same protocol
    assert main(["eval", "--model", str(model_dir), "--protocol", "quick", "--max-tokens", "2048", "--dtype", "fp32",
                 "--json", str(root / "dense.json")]) == 0
    assert json.loads((root / "dense.json").read_text())["ppl"] == pytest.approx(dense["ppl"], rel=1e-9)


def test_the_run_carries_a_model_card_and_still_verifies(made):
    from lmcompose.models.checkpoint import load_compressed
    from lmcompose.models.load import load_any

    root, model_dir, run, *_ = made
    card = (run / "README.md").read_text()
    report = json.loads((run / "report.json").read_text())
    for part in ("library_name: lmcompose", f"`{model_dir}` compressed", f"{report['total_bytes']:,}", "4.625",
                 "```yaml", "group_size: 32", f"lmcompose compress --model {model_dir}", "lmcompose 0.",
                 f"{report['evaluation']['ppl']:.3f}", f"{report['dense']['perplexity']['ppl']:.3f}",
                 "wikitext2/test", "model.layers.1.mlp.down_proj"):
        assert part in card, part
    load_compressed(run)  # the card is no file the checksums cover: loading with verification still works
    (run / "README.md").write_text(card + "\nedited by hand\n")
    load_any(str(run))


def test_verbose_prints_the_per_linear_table_and_the_report_says_how_to_measure_the_dense(made, capsys):
    root, model_dir, _, _, _ = made
    recipe = root / "recipe.yaml"
    run = root / "verbose"
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(run), "--verbose",
                 "--eval", "quick", "--max-tokens", "1024", "--compute-dtype", "fp32", "--no-dense-eval"]) == 0
    out = capsys.readouterr().out
    assert "per-Linear results (recipe" in out and "rel. error" in out
    assert sum("4.625 │" in line for line in out.splitlines()) == 14 + 7  # 14 Linears, 7 roles in the plan
    assert "dense not measured" in " ".join(out.split())
    assert main(["report", str(run), "--out", str(root / "rep1")]) == 0
    md = (root / "rep1" / "report.md").read_text()
    assert f"not measured — run `lmcompose eval --model {model_dir} --dense-for {run}`" in md
    # the command it names records the dense reference; the report and the card then show it
    assert main(["eval", "--model", str(root / "rtn"), "--dense-for", str(run)]) == 2  # no such model
    assert main(["eval", "--model", str(run), "--dense-for", str(run)]) == 2  # not the run's base model
    assert "allowed: --model" in " ".join(capsys.readouterr().err.split())
    assert main(["eval", "--model", str(model_dir), "--protocol", "quick", "--max-tokens", "1024", "--dtype", "fp32",
                 "--dense-for", str(run), "--json", str(root / "d.json")]) == 0
    dense = json.loads((root / "d.json").read_text())["ppl"]
    assert main(["report", str(run), "--out", str(root / "rep2")]) == 0
    md = (root / "rep2" / "report.md").read_text()
    assert f"| {dense:.3f} |" in md and "not measured — run `lmcompose eval" not in md
    assert f"{dense:.3f}" in (run / "README.md").read_text()


def test_report_of_one_run_opens_with_the_dense_reference(made):
    root, model_dir, run, *_ = made
    report = json.loads((run / "report.json").read_text())
    assert main(["report", str(run), "--out", str(root / "rep")]) == 0
    for name in ("report.md", "report.html"):
        text = (root / "rep" / name).read_text()
        first = text.index("beside the dense model")
        assert first < text.index("Runs") and f"{report['dense']['perplexity']['ppl']:.3f}" in text[first:]
    md = (root / "rep" / "report.md").read_text()
    ppl, dense = report["evaluation"]["ppl"], report["dense"]["perplexity"]["ppl"]
    assert f"| {ppl:.3f} | {dense:.3f} | {100 * (ppl / dense - 1):+.1f}% |" in md
    assert f"`lmcompose zeroshot --model {model_dir} --dense-for {run}`" in md


def test_generate_answers_beside_the_dense_model(made, capsys):
    root, model_dir, run, *_ = made
    assert main(["generate", str(run), "--prompt", "the first of", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert f"answer of {run} (5 tokens" in out and f"dense answer of {model_dir} (5 tokens" in out
    assert out.count("greedy, chat template") == 2
    assert main(["generate", str(run), "--prompt", "of the", "--max-new-tokens", "3", "--no-dense",
                 "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "dense answer" not in out and "chat template" not in out and f"answer of {run} (3 tokens" in out


def test_generate_is_greedy_decoding_through_the_chat_template():
    from lmcompose.eval.generate import generate_text

    model, tok = tiny_llama(), _word_tokenizer()
    got = generate_text(model, tok, "the first of", max_new_tokens=6)
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "the first of"}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    assert got.chat_template and ids.input_ids[0, -1] == tok.convert_tokens_to_ids("the")
    plain = generate_text(model, tok, "the first of", max_new_tokens=6, chat_template=False)
    assert not plain.chat_template
    for answer, prompt in ((got, ids), (plain, tok("the first of", return_tensors="pt"))):
        want = model.generate(prompt.input_ids, attention_mask=prompt.attention_mask, max_new_tokens=6,
                              do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        assert answer.token_ids == want[0, prompt.input_ids.shape[1]:].tolist()
        assert answer.text == tok.decode(answer.token_ids, skip_special_tokens=True).strip()
    assert got.token_ids != plain.token_ids  # the template changed the prompt the model saw


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "x", "--dense", "a/b", "--no-dense"], "not both"),
    (["--prompt", "x", "--dense", "no-such-model"], "--dense 'no-such-model'"),
])
def test_generate_refuses_bad_arguments_before_loading_a_model(made, monkeypatch, capsys, args, message):
    import lmcompose.models.load as load

    monkeypatch.setattr(load, "load_any", lambda *a, **k: pytest.fail("loaded a model"))
    run = made[2]
    assert main(["generate", str(run), *args]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err and "Traceback" not in err


def test_generate_names_a_missing_base_model_with_a_hint(made, monkeypatch, capsys, tmp_path):
    import shutil

    import lmcompose.models.load as load

    run = tmp_path / "moved"
    shutil.copytree(made[2], run)
    meta = json.loads((run / "lmcompose.json").read_text())
    meta["base_model"] = str(tmp_path / "gone")
    (run / "lmcompose.json").write_text(json.dumps(meta))
    monkeypatch.setattr(load, "load_any", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "base_model" in err and "--no-dense" in err
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
