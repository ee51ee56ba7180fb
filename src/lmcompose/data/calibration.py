"""Calibration windows and evaluation tokens.

Calibration follows GPTQ/Wanda (``get_c4`` in IST-DASLab/gptq ``datautils.py``): for each of the `n`
windows, a random document longer than `seqlen` tokens and a random window of it, drawn from a
`torch.Generator` seeded with `seed` (nothing global is seeded). A calibration source that resolves to the
evaluation file is refused unless ``force=True`` (DESIGN §6).

Method notes: docs/methods/data.md

Example::

    windows = calibration_windows(tokenizer, "c4", n=128, seqlen=512, seed=0, data_dir="../shared/data")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .text import NAMED, PACKAGED, load_documents, load_text, resolve_file

log = logging.getLogger(__name__)
EVAL = ("wikitext2", "test")
_EVAL_CACHE: dict = {}
_EVAL_CACHE_SIZE = 4


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_eval_data(source: str, split: str, calib_file: Path | None, eval_source: tuple[str, str],
                  data_dir) -> bool:
    if (source, split) == tuple(eval_source):
        return True
    try:
        eval_file = resolve_file(*eval_source, data_dir)
    except (FileNotFoundError, ValueError):
        eval_file = None
    if calib_file is None:
        return False
    if eval_file is not None and calib_file.resolve() == eval_file.resolve():
        return True
    # Also refuse a copy of it by name (wherever the evaluation file itself comes from: a data directory, the
    # data shipped with lmcompose or the hub).
    names = {Path(table[tuple(eval_source)]).name for table in (NAMED, PACKAGED) if tuple(eval_source) in table}
    return calib_file.name in names


def calibration_windows(tokenizer, source: str | os.PathLike = "c4", n: int = 128, seqlen: int = 512,
                        seed: int = 0, data_dir: str | os.PathLike | None = None, split: str = "validation",
                        eval_source: tuple[str, str] = EVAL, force: bool = False) -> torch.LongTensor:
    """Random token windows for calibration.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        source: ``"c4"``, ``"wikitext2"`` or a local text file (see `lmcompose.data.text`).
        n: number of windows.
        seqlen: tokens per window.
        seed: seed of the sampler's own generator.
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``, then the data shipped with lmcompose,
            then the hub: see `lmcompose.data.text.resolve_file`).
        split: the split of a named source.
        eval_source: the ``(source, split)`` used for evaluation, which calibration must not use.
        force: allow calibrating on the evaluation data anyway.

    Returns:
        int64 tensor ``[n, seqlen]``.

    Raises:
        ValueError: bad `n`/`seqlen`, calibration on the evaluation data without `force`, or a source
            with fewer than ``seqlen + 1`` tokens in all.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; allowed: an integer >= 1")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r} is not allowed; allowed: an integer >= 2")
    source = str(source)
    calib_file = resolve_file(source, split, data_dir)
    if not force and _is_eval_data(source, split, calib_file, eval_source, data_dir):
        raise ValueError(f"calibration source {source}:{split} is the evaluation data {eval_source[0]}:"
                         f"{eval_source[1]}; calibrate on c4 or wikitext2:validation, or pass force=True "
                         "(CLI: --force-calibration)")
    docs = load_documents(source, split, data_dir)
    if not docs:
        raise ValueError(f"calibration source {source}:{split} has no documents")
    gen = torch.Generator().manual_seed(seed)
    cache: dict[int, list[int]] = {}
    n_long = 0  # documents known to be long enough
    windows: list[list[int]] = []
    while len(windows) < n:
        if n_long == 0 and len(cache) == len(docs):
            break  # every document tokenized, none long enough
        i = int(torch.randint(len(docs), (1,), generator=gen))
        if i not in cache:
            cache[i] = _tokens(tokenizer, docs[i])
            n_long += len(cache[i]) > seqlen
        ids = cache[i]
        if len(ids) <= seqlen:
            continue
        start = int(torch.randint(len(ids) - seqlen, (1,), generator=gen))
        windows.append(ids[start:start + seqlen])
    if not windows:
        log.info("no document of %s:%s has %d+ tokens; sampling windows from their concatenation",
                 source, split, seqlen + 1)
        eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
        joined: list[int] = []
        for i, doc in enumerate(docs):
            joined += (cache[i] if i in cache else _tokens(tokenizer, doc)) + eos
        if len(joined) <= seqlen:
            raise ValueError(f"{source}:{split} has only {len(joined)} tokens in all; seqlen={seqlen} needs "
                             f"at least {seqlen + 1}")
        for _ in range(n):
            start = int(torch.randint(len(joined) - seqlen, (1,), generator=gen))
            windows.append(joined[start:start + seqlen])
    log.debug("%d calibration windows of %d tokens from %s:%s (seed %d)", n, seqlen, source, split, seed)
    return torch.tensor(windows, dtype=torch.long)


def eval_tokens(tokenizer, source: str | os.PathLike = "wikitext2", split: str = "test",
                data_dir: str | os.PathLike | None = None) -> torch.LongTensor:
    """The whole evaluation text (see `load_text`) tokenized once, without special tokens: ``[1, T]``.

    Cached in memory per (tokenizer, file); a changed file (size or mtime) is tokenized again.
    """
    path = resolve_file(source, split, data_dir)
    stamp = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) if path else (str(source), split)
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), stamp)
    if key not in _EVAL_CACHE:
        if len(_EVAL_CACHE) >= _EVAL_CACHE_SIZE:
            _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
        _EVAL_CACHE[key] = torch.tensor([_tokens(tokenizer, load_text(source, split, data_dir))], dtype=torch.long)
    return _EVAL_CACHE[key].clone()
