"""Calibration windows: N windows of L tokens, sampled GPTQ/Wanda-style with a seeded generator.

For each window a random document long enough is drawn and a random window taken from it; if no
document is long enough, documents are concatenated (separated by the tokenizer's EOS) and windows are
drawn from the concatenation. The sampler owns its `torch.Generator`: no global seeding.
Calibrating on the evaluation file is refused unless `force=True`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .text import load_documents, load_text, resolve_file

log = logging.getLogger(__name__)
EVAL = ("wikitext2", "test")
_TOKEN_CACHE: dict = {}


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def calibration_windows(tokenizer, source: str = "c4", n: int = 128, seqlen: int = 512, seed: int = 0,
                        data_dir: str | Path | None = None, split: str = "validation",
                        eval_source: tuple[str, str] = EVAL, force: bool = False) -> torch.LongTensor:
    """[n, seqlen] token ids for calibration."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"n={n} and seqlen={seqlen} must be >= 1 and >= 2")
    calib_file = resolve_file(source, split, data_dir)
    try:
        eval_file = resolve_file(*eval_source, data_dir)
    except (FileNotFoundError, ValueError):
        eval_file = None
    same = (source, split) == tuple(eval_source) or (
        calib_file is not None and eval_file is not None and calib_file.resolve() == eval_file.resolve())
    if same and not force:
        raise ValueError(f"calibration source {source}:{split} is the evaluation data {eval_source[0]}:"
                         f"{eval_source[1]}; calibrate on c4 or wikitext2:validation, or pass force=True "
                         "(CLI: --force-calibration)")
    gen = torch.Generator().manual_seed(seed)
    docs = load_documents(source, split, data_dir)
    windows = []
    long_docs = None
    # Tokenize lazily: drawing documents at random and caching their tokens avoids tokenizing all.
    cache: dict[int, list[int]] = {}
    tries = 0
    while len(windows) < n and tries < 50 * n:
        tries += 1
        i = int(torch.randint(len(docs), (1,), generator=gen))
        ids = cache.setdefault(i, _tokens(tokenizer, docs[i]))
        if len(ids) <= seqlen:
            continue
        start = int(torch.randint(len(ids) - seqlen, (1,), generator=gen))
        windows.append(ids[start:start + seqlen])
    if len(windows) < n:  # too few long documents: sample from the concatenation
        log.info("few documents of %d+ tokens in %s:%s; sampling from the concatenation", seqlen, source, split)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        long_docs = []
        for d in docs:
            long_docs += _tokens(tokenizer, d) + eos
        if len(long_docs) <= seqlen:
            raise ValueError(f"{source}:{split} has only {len(long_docs)} tokens, fewer than seqlen={seqlen}")
        while len(windows) < n:
            start = int(torch.randint(len(long_docs) - seqlen, (1,), generator=gen))
            windows.append(long_docs[start:start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def eval_tokens(tokenizer, source: str = "wikitext2", split: str = "test",
                data_dir: str | Path | None = None) -> torch.LongTensor:
    """The whole evaluation text tokenized once: [1, T]. Cached per tokenizer and file."""
    path = resolve_file(source, split, data_dir)
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), str(path or (source, split)))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = torch.tensor([_tokens(tokenizer, load_text(source, split, data_dir))], dtype=torch.long)
    return _TOKEN_CACHE[key]
