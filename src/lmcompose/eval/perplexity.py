"""Perplexity under a fixed, recorded protocol (DESIGN §6).

The evaluation text (WikiText-2 test by default) is tokenized once and cut into non-overlapping windows
of `seqlen` tokens; the trailing partial window is dropped. Each window predicts its last seqlen−1
tokens from the ones before (the GPTQ/SparseGPT evaluation convention); perplexity is
exp(Σ NLL / number of predicted tokens). `max_tokens` (whole windows) and `max_windows` give quick
evaluations; the protocol, with these limits, is written into every result.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.calibration import eval_tokens


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: int = Field(2048, ge=2)
    batch_size: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=2)
    max_windows: int | None = Field(None, ge=1)


PROTOCOLS = {
    "full": Protocol(name="full", seqlen=2048),
    "quick": Protocol(name="quick", seqlen=512, max_windows=64),
}


def get_protocol(name: str, **overrides) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is not known; allowed: {sorted(PROTOCOLS)}")
    data = {**PROTOCOLS[name].model_dump(), **overrides}
    try:
        return Protocol(**data)
    except ValidationError as err:
        raise ValueError(f"protocol {name}: {err.errors()[0]['loc'][0]}: {err.errors()[0]['msg']}") from None


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    n_tokens: int
    n_windows: int
    seconds: float
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(tokens: torch.Tensor, protocol: Protocol) -> torch.Tensor:
    """The [n, seqlen] evaluation windows the protocol uses."""
    total = tokens.shape[1]
    if protocol.max_tokens is not None:
        total = min(total, protocol.max_tokens)
    n = total // protocol.seqlen
    if protocol.max_windows is not None:
        n = min(n, protocol.max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {tokens.shape[1]} tokens: not one window of seqlen={protocol.seqlen}")
    return tokens[0, : n * protocol.seqlen].reshape(n, protocol.seqlen)


@torch.inference_mode()
def window_nll(model, batch: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Summed next-token NLL of each window, log-softmax in fp32 chunk by chunk (bounded memory)."""
    head = model.get_output_embeddings()
    if head is None or model.base_model is model:  # no separable head: take the full logits
        logits = model(input_ids=batch, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(),
                               reduction="none").view(batch.shape[0], -1).sum(1).double()
    hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for s in range(0, batch.shape[1] - 1, chunk):
        h = hidden[:, s:min(s + chunk, batch.shape[1] - 1)]
        logits = head(h).float()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        target = batch[:, s + 1:s + 1 + h.shape[1]]
        total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(
            batch.shape[0], -1).sum(1).double()
    return total


def perplexity(model, tokenizer, protocol: Protocol, data_dir=None, device=None, progress=None) -> PerplexityResult:
    device = device or next(model.parameters()).device
    t0 = time.perf_counter()
    windows = windows_of(eval_tokens(tokenizer, protocol.dataset, protocol.split, data_dir), protocol)
    nll, n = 0.0, 0
    for start in range(0, windows.shape[0], protocol.batch_size):
        batch = windows[start:start + protocol.batch_size].to(device)
        nll += float(window_nll(model, batch).sum())
        n += batch.shape[0] * (batch.shape[1] - 1)
        if progress:
            progress(min(start + protocol.batch_size, windows.shape[0]), windows.shape[0])
    return PerplexityResult(math.exp(nll / n), nll, n, windows.shape[0], time.perf_counter() - t0,
                            protocol.model_dump())
