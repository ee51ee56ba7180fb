"""Shared fixtures: tiny models and a tiny tokenizer built in code (no downloads).

The model builders live in ``helpers.py`` (plain functions, for tests that need several models or
seeds); the fixtures here give one fresh fp32 model in eval mode per test.
"""

from __future__ import annotations

import string

import pytest
import torch
from helpers import tiny_gemma3 as _tiny_gemma3
from helpers import tiny_llama as _tiny_llama

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tiny_tokenizer():
    """A character-level fast tokenizer: 4 special tokens, then printable ASCII and newline (100 ids).

    Every id is below 128, so it fits the tiny models' vocabulary. Unknown characters map to ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c.isprintable()] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", name_or_path="tiny-chars")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                            reason="CUDA is not available"))]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: the CPU always, CUDA too where ``torch.cuda.is_available()`` (the CUDA
    case is skipped elsewhere, so each test using this fixture is collected once per device)."""
    return torch.device(request.param)


@pytest.fixture
def tiny_llama():
    """A 2-layer LlamaForCausalLM (vocab 128, hidden 64, 4 heads, 2 KV heads), fp32, eval mode."""
    return _tiny_llama()


@pytest.fixture
def tiny_gemma3():
    """A 3-layer Gemma3ForCausalLM (vocab 128, sliding window 8, sliding/sliding/full layers), fp32, eval."""
    return _tiny_gemma3()


@pytest.fixture
def tiny_tokenizer():
    """See `build_tiny_tokenizer`."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny Llama with a word-level tokenizer, a data dir (wikitext-2 test file, c4 validation
    file) and a wanda → gptq recipe file: ``(root, model_dir, data_dir, recipe_path)``. For the CLI tests
    (test_cli, test_inference, test_reporting); one per module."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    words = [f"w{i}" for i in range(120)]
    vocab = {w: i for i, w in enumerate(words)} | {"[UNK]": 120, "</s>": 121}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")
    model_dir = root / "model"
    _tiny_llama().save_pretrained(model_dir, safe_serialization=True)
    fast.save_pretrained(model_dir)
    data = root / "data"
    (data / "wikitext-2").mkdir(parents=True)
    (data / "c4").mkdir()
    text = " ".join(words[i % 120] for i in range(4000))
    (data / "wikitext-2" / "wiki.test.raw").write_text((text + "\n") * 3)
    pq.write_table(pa.table({"text": [text] * 20}), data / "c4" / "c4_validation_2k.parquet")
    recipe = root / "recipe.yaml"
    recipe.write_text("calibration: {n: 4, seqlen: 32, batch_size: 2}\nsteps:\n  - wanda: {pattern: '2:4'}\n"
                      "  - gptq: {bits: 4, group_size: 32, target: sparse}\n")
    return root, model_dir, data, recipe
