"""Text sources, calibration windows and the perplexity protocol, on small files and a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from lmcompose.data import calibration_windows, load_text
from lmcompose.eval.perplexity import get_protocol, perplexity, windows_of


class CharTokenizer:
    """A tokenizer stand-in: one id per character (mod 128)."""

    eos_token_id = 0
    name_or_path = "chars"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}

    def __len__(self):
        return 128


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    rows = [" = Title = ", " ", " First paragraph of text that is long enough . ", " ", " Second one . "]
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(("\r\n".join(rows) + "\r\n").encode() * 40)
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text("valid text line number one .\n" * 200)
    return tmp_path


def test_wikitext_rows_follow_the_protocol(data_dir):
    text = load_text("wikitext2", "test", data_dir)
    assert "\r" not in text
    # rows keep their newline, the blank line is an empty row, rows are joined with "\n\n"
    assert text.startswith(" = Title = \n" + "\n\n" + "" + "\n\n" + " First paragraph")


def test_missing_file_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"c4/c4_validation_2k\.parquet.*LMCOMPOSE_DATA_DIR"):
        load_text("c4", "validation", tmp_path)
    with pytest.raises(ValueError, match="allowed"):
        load_text("ptb", "test", tmp_path)


def test_calibration_is_seeded_and_refuses_the_eval_split(data_dir):
    tok = CharTokenizer()
    a = calibration_windows(tok, "wikitext2", n=6, seqlen=16, seed=3, data_dir=data_dir)
    b = calibration_windows(tok, "wikitext2", n=6, seqlen=16, seed=3, data_dir=data_dir)
    c = calibration_windows(tok, "wikitext2", n=6, seqlen=16, seed=4, data_dir=data_dir)
    assert a.shape == (6, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="evaluation data"):
        calibration_windows(tok, "wikitext2", split="test", n=2, seqlen=16, data_dir=data_dir)
    forced = calibration_windows(tok, "wikitext2", split="test", n=2, seqlen=16, data_dir=data_dir, force=True)
    assert forced.shape == (2, 16)


def test_local_files_are_sources(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "hello world, a document"}\n' * 30)
    w = calibration_windows(CharTokenizer(), str(f), n=3, seqlen=8, seed=0)
    assert w.shape == (3, 8)


def test_perplexity_equals_the_direct_formula_and_ignores_batching(data_dir):
    model, tok = tiny_llama(), CharTokenizer()
    proto = get_protocol("quick", seqlen=32, max_windows=5)
    one = perplexity(model, tok, proto, data_dir)
    four = perplexity(model, tok, get_protocol("quick", seqlen=32, max_windows=5, batch_size=4), data_dir)
    assert abs(one.ppl - four.ppl) < 1e-5 * one.ppl
    from lmcompose.data import eval_tokens

    windows = windows_of(eval_tokens(tok, data_dir=data_dir), proto)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert abs(one.ppl - math.exp(ce.item())) < 1e-4 * one.ppl
    assert one.n_windows == 5 and one.n_tokens == 5 * 31 and one.protocol["seqlen"] == 32


def test_limits_cut_whole_windows(data_dir):
    tokens = torch.arange(1000).unsqueeze(0)
    assert windows_of(tokens, get_protocol("full", seqlen=100)).shape == (10, 100)
    assert windows_of(tokens, get_protocol("full", seqlen=100, max_tokens=350)).shape == (3, 100)
    assert windows_of(tokens, get_protocol("quick", seqlen=100)).shape == (10, 100)
    assert windows_of(tokens, get_protocol("quick", seqlen=100, max_windows=2)).shape == (2, 100)
    with pytest.raises(ValueError, match="not known"):
        get_protocol("fast")
