"""Text sources, calibration windows and evaluation tokens, on small files written in tmp_path."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmcompose.data import calibration_windows, eval_tokens, load_documents, load_text
from lmcompose.data import text as text_sources

RAW = b" \r\n = Title = \r\n \r\n First paragraph .\r\n Second paragraph .\r\n \r\n = = Part = = \r\n"


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(RAW * 20)
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text(" a validation line of text .\n" * 50)
    (tmp_path / "c4").mkdir()
    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(40)]
    pq.write_table(pa.table({"text": docs, "url": [f"u{i}" for i in range(40)]}),
                   tmp_path / "c4" / "c4_validation_2k.parquet")
    return tmp_path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LMCOMPOSE_DATA_DIR", raising=False)


def test_wikitext_rows_are_the_hub_rows_joined_by_blank_lines(data_dir):
    # hub rows: one per line with its "\n", CRLF read as LF, a whitespace-only line is "".
    rows = ["", " = Title = \n", "", " First paragraph .\n", " Second paragraph .\n", "", " = = Part = = \n"]
    assert load_documents("wikitext2", "test", data_dir) == rows * 20
    text = load_text("wikitext2", "test", data_dir)
    assert "\r" not in text
    assert text == "\n\n".join(rows * 20)
    assert text.startswith("\n\n = Title = \n\n\n\n\n First paragraph .\n\n\n Second")


def test_data_dir_comes_from_the_environment(data_dir, monkeypatch):
    monkeypatch.setenv("LMCOMPOSE_DATA_DIR", str(data_dir))
    assert load_text("wikitext2", "test") == load_text("wikitext2", "test", data_dir)
    assert len(load_documents("c4", "validation")) == 40


def test_missing_file_names_the_expected_path(tmp_path, monkeypatch):
    expected = str(tmp_path / "c4" / "c4_validation_2k.parquet")
    with pytest.raises(FileNotFoundError) as err:
        load_text("c4", "validation", tmp_path)
    assert expected in str(err.value) and "LMCOMPOSE_DATA_DIR" in str(err.value) and "--data-dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"wikitext-2/wiki\.valid\.tokens.*no data directory.*not shipped"):
        load_text("wikitext2", "validation")  # not shipped with lmcompose (test_packaged_data.py: what is)
    monkeypatch.setattr(text_sources, "PACKAGED", {})  # as if the shipped data were missing
    with pytest.raises(FileNotFoundError, match=r"wikitext-2/wiki\.test\.raw.*no data directory"):
        load_text("wikitext2", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "nothing.txt"), "test")


def test_unknown_sources_list_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"source='ptb'.*allowed.*c4:validation"):
        load_text("ptb", "test", tmp_path)
    with pytest.raises(ValueError, match="split='train'"):
        load_text("c4", "train", tmp_path)


def test_local_files_are_sources(tmp_path, tiny_tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)) + "\n")
    assert load_documents(str(tmp_path / "a.jsonl"), "any") == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "long.jsonl").write_text((json.dumps({"text": "hello world, a document"}) + "\n") * 30)
    w = calibration_windows(tiny_tokenizer, str(tmp_path / "long.jsonl"), n=3, seqlen=8, seed=0)
    assert w.shape == (3, 8) and w.dtype == torch.long
    (tmp_path / "b.txt").write_text("one\n\ntwo\n")
    assert load_text(str(tmp_path / "b.txt"), "any") == "one\n" + "\n\n" + "" + "\n\n" + "two\n"
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="line 1 has no string field 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"), "any")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no column 'text'"):
        load_documents(str(tmp_path / "bad.parquet"), "any")


def _contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_calibration_is_deterministic_per_seed_and_windows_are_document_slices(data_dir, tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, "c4", n=8, seqlen=64, seed=3, data_dir=data_dir)
    b = calibration_windows(tiny_tokenizer, "c4", n=8, seqlen=64, seed=3, data_dir=data_dir)
    c = calibration_windows(tiny_tokenizer, "c4", n=8, seqlen=64, seed=4, data_dir=data_dir)
    assert a.dtype == torch.long and a.shape == (8, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    docs = [tiny_tokenizer(d, add_special_tokens=False)["input_ids"] for d in load_documents("c4", "validation", data_dir)]
    for w in a.tolist():  # each window lies inside one document longer than seqlen
        assert any(len(d) > 64 and _contains(d, w) for d in docs)


def test_more_windows_start_with_the_fewer_ones(data_dir, tiny_tokenizer):
    """`recover.windows` draws more windows than calibration.n and calibrates on the first n: they must be the
    windows a run with n alone calibrates on (documents and the concatenation fallback alike)."""
    for seqlen in (64, 8):  # c4: long documents; then short windows
        few, many = (calibration_windows(tiny_tokenizer, "c4", n=n, seqlen=seqlen, seed=2, data_dir=data_dir)
                     for n in (5, 13))
        assert torch.equal(many[:5], few)
    few = calibration_windows(tiny_tokenizer, "wikitext2", split="validation", n=3, seqlen=64, data_dir=data_dir)
    many = calibration_windows(tiny_tokenizer, "wikitext2", split="validation", n=9, seqlen=64, data_dir=data_dir)
    assert torch.equal(many[:3], few)


def test_short_documents_fall_back_to_the_concatenation(data_dir, tiny_tokenizer):
    # validation rows are ~29 characters: none reaches 65 tokens, so windows span rows joined by EOS
    w = calibration_windows(tiny_tokenizer, "wikitext2", split="validation", n=4, seqlen=64, seed=0,
                            data_dir=data_dir)
    assert w.shape == (4, 64) and (w == tiny_tokenizer.eos_token_id).any(dim=1).all()
    with pytest.raises(ValueError, match="seqlen=100000"):
        calibration_windows(tiny_tokenizer, "wikitext2", split="validation", n=1, seqlen=100000, data_dir=data_dir)


def test_calibrating_on_the_evaluation_file_is_refused_unless_forced(data_dir, tiny_tokenizer):
    with pytest.raises(ValueError, match="evaluation data"):
        calibration_windows(tiny_tokenizer, "wikitext2", split="test", n=2, seqlen=16, data_dir=data_dir)
    eval_path = str(data_dir / "wikitext-2" / "wiki.test.raw")
    with pytest.raises(ValueError, match="evaluation data"):  # the same file named by its path
        calibration_windows(tiny_tokenizer, eval_path, n=2, seqlen=16, data_dir=data_dir)
    with pytest.raises(ValueError, match="evaluation data"):  # ... even when no data dir locates the eval file
        calibration_windows(tiny_tokenizer, eval_path, n=2, seqlen=16)
    forced = calibration_windows(tiny_tokenizer, "wikitext2", split="test", n=2, seqlen=16, data_dir=data_dir,
                                 force=True)
    assert forced.shape == (2, 16)
    with pytest.raises(ValueError, match="n=0"):
        calibration_windows(tiny_tokenizer, "c4", n=0, data_dir=data_dir)


def test_eval_tokens_tokenize_the_whole_text_once_without_specials(data_dir, tiny_tokenizer):
    t = eval_tokens(tiny_tokenizer, data_dir=data_dir)
    expected = tiny_tokenizer(load_text("wikitext2", "test", data_dir), add_special_tokens=False)["input_ids"]
    assert t.shape == (1, len(expected)) and t[0].tolist() == expected
    t[0, 0] = -1  # callers get a copy: the cache is not corrupted
    assert eval_tokens(tiny_tokenizer, data_dir=data_dir)[0, 0] == expected[0]
