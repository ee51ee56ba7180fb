"""Shared fixtures: tiny models and a tiny tokenizer built in code (no downloads).

The model builders live in ``helpers.py`` (plain functions, for tests that need several models or
seeds); the fixtures here give one fresh fp32 model in eval mode per test.
"""

from __future__ import annotations

import string

import pytest
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
