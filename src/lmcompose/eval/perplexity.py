"""Perplexity under a fixed, recorded protocol (DESIGN §6).

The evaluation text (WikiText-2 raw test by default) is tokenized once and cut into non-overlapping
windows of `seqlen` tokens; each window predicts its last ``seqlen - 1`` tokens (the GPTQ/SparseGPT
``eval`` convention), and perplexity is token level. The log-softmax runs in fp32 over chunks of
positions, so a large vocabulary never materialises as ``batch × seqlen × vocab`` fp32 logits.

Method notes: docs/methods/evaluation.md

Example::

    result = perplexity(model, tokenizer, get_protocol("quick"), data_dir="../shared/data")
    print(result.ppl, result.n_tokens)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.dtypes import dtype_name, model_dtype
from ..data.calibration import eval_tokens
from ..runtime.logits import CHUNK
from ..runtime.logits import head_path as _head_path
from ..runtime.logits import head_path_agrees as _head_path_agrees
from ..runtime.logits import softcap as _softcap

log = logging.getLogger(__name__)


class Protocol(BaseModel):
    """What a perplexity number means; written into every result and report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: int = Field(2048, ge=2)
    batch_size: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=2)
    max_windows: int | None = Field(None, ge=1)
    # Compute dtype of the evaluated model (fp32/bf16/fp16). None in a request means "the model's own";
    # every result records the dtype it actually ran in (bf16 and fp32 differ in the 4th digit).
    dtype: str | None = None


PROTOCOLS = {
    "full": Protocol(name="full", seqlen=2048),
    "quick": Protocol(name="quick", seqlen=512, max_windows=64),
}


def get_protocol(name: str, **overrides) -> Protocol:
    """A named protocol (``full`` or ``quick``) with some fields overridden, e.g. ``max_tokens=65536``."""
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is not known; allowed: {sorted(PROTOCOLS)}")
    try:
        return Protocol(**{**PROTOCOLS[name].model_dump(), **overrides})
    except ValidationError as err:
        e = err.errors()[0]
        field = e["loc"][0] if e["loc"] else "?"
        raise ValueError(f"protocol {name}: {field}={overrides.get(field, e.get('input'))!r} is not allowed: "
                         f"{e['msg']}") from None


@dataclass
class PerplexityResult:
    """ppl = exp(nll_sum / n_tokens); n_tokens counts predicted tokens (seqlen - 1 per window)."""

    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    seconds: float
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(tokens: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """The ``[n, seqlen]`` evaluation windows the protocol uses, from ``[1, T]`` tokens."""
    total = tokens.shape[-1]
    if protocol.max_tokens is not None:
        total = min(total, protocol.max_tokens)
    n = total // protocol.seqlen
    if protocol.max_windows is not None:
        n = min(n, protocol.max_windows)
    if n == 0:
        raise ValueError(f"seqlen={protocol.seqlen} is longer than the {total} evaluation tokens available "
                         f"(text: {tokens.shape[-1]}, max_tokens={protocol.max_tokens}): not one window")
    return tokens.reshape(-1)[: n * protocol.seqlen].reshape(n, protocol.seqlen)


def _chunked_nll(logits_of, batch: torch.Tensor) -> torch.Tensor:
    """Per-window summed NLL; ``logits_of(s, e)`` gives the logits of positions s..e-1 (predicting s+1..e)."""
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for s in range(0, batch.shape[1] - 1, CHUNK):
        e = min(s + CHUNK, batch.shape[1] - 1)
        logits = logits_of(s, e).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, s + 1:e + 1].flatten(), reduction="none")
        total += nll.view(batch.shape[0], -1).sum(1).double()
    return total


@torch.inference_mode()
def window_nll(model, batch: torch.Tensor, use_head_path: bool = True) -> torch.Tensor:
    """Summed next-token NLL of each window of `batch` ``[B, L]`` (L - 1 predictions each), in fp64."""
    parts = _head_path(model) if use_head_path else None
    if parts is None:
        logits = model(input_ids=batch, use_cache=False).logits
        return _chunked_nll(lambda s, e: logits[:, s:e], batch)
    trunk, head = parts
    hidden = trunk(input_ids=batch, use_cache=False).last_hidden_state
    return _chunked_nll(lambda s, e: _softcap(model, head(hidden[:, s:e])), batch)


def perplexity(model, tokenizer, protocol: Protocol | str, data_dir=None, device=None,
               progress=None) -> PerplexityResult:
    """Token-level perplexity of `model` under `protocol` (see the module docstring).

    Args:
        model: a causal LM (left in its mode and on its device).
        tokenizer: its tokenizer.
        protocol: a `Protocol` or the name of one in `PROTOCOLS`.
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``).
        device: where the windows go (default: the device of the model's first parameter).
        progress: optional ``callable(done_windows, total_windows)``.
    """
    protocol = run_protocol(model, protocol)
    device = device or next(model.parameters()).device
    t0 = time.perf_counter()
    windows = windows_of(eval_tokens(tokenizer, protocol.dataset, protocol.split, data_dir), protocol)
    parts = _head_path(model)
    use_head = parts is not None and _head_path_agrees(model, *parts, windows[:1].to(device))
    nll, total = 0.0, windows.shape[0]
    for start in range(0, total, protocol.batch_size):
        batch = windows[start:start + protocol.batch_size].to(device)
        nll += float(window_nll(model, batch, use_head).sum())
        if progress is not None:
            progress(min(start + protocol.batch_size, total), total)
    return result_of(nll, total, protocol, t0)


def run_protocol(model, protocol: Protocol | str) -> Protocol:
    """`protocol` (or the named one) with the dtype `model` computes in recorded; a different dtype asked for
    is refused. Every perplexity path (in memory, `eval.streamed`) starts with it."""
    if isinstance(protocol, str):
        protocol = get_protocol(protocol)
    ran_in = dtype_name(model_dtype(model))
    if protocol.dtype not in (None, ran_in):
        raise ValueError(f"protocol dtype={protocol.dtype!r} but the model's weights are {ran_in}; cast the model "
                         "first (lmcompose.core.dtypes.cast_for_eval)")
    return protocol.model_copy(update={"dtype": ran_in})


def result_of(nll: float, n_windows: int, protocol: Protocol, t0: float) -> PerplexityResult:
    """The result of summed NLL `nll` over `n_windows` windows of `protocol`, begun at ``perf_counter`` `t0`."""
    n_tokens = n_windows * (protocol.seqlen - 1)
    result = PerplexityResult(math.exp(nll / n_tokens), nll, n_tokens, n_windows, time.perf_counter() - t0,
                              protocol.model_dump())
    log.info("perplexity %.4f over %d tokens (%d windows of %d) in %.1fs", result.ppl, n_tokens, n_windows,
             protocol.seqlen, result.seconds)
    return result
