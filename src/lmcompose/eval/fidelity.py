"""Fidelity without labels: how far the compressed model's next-token distribution is from the dense one.

Both models predict every position of the protocol's held-out windows; we report ``kl_mean``, the mean
KL(p_dense ‖ p_compressed) in nats, and ``top1_agreement``, the fraction of positions where both argmaxes
agree (the KL/top-1 metrics of e.g. llama.cpp's ``perplexity --kl-divergence``). The output head runs in
chunks of `CHUNK` positions, so no ``[B, L, V]`` fp32 logits exist; the cost is that of two perplexity
evaluations over the same windows.

Method notes: docs/methods/evaluation.md

Example::

    result = fidelity(dense, compressed, tokenizer, "quick", data_dir="../shared/data", max_windows=16)
    print(result.kl_mean, result.top1_agreement)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..core.dtypes import dtype_name, model_dtype
from ..data.calibration import eval_tokens
from .perplexity import (
    CHUNK,
    Protocol,
    _head_path,
    _head_path_agrees,
    _softcap,
    get_protocol,
    windows_of,
)

log = logging.getLogger(__name__)


@dataclass
class FidelityResult:
    """kl_mean in nats per position; top1_agreement in [0, 1]; n_tokens = scored positions."""

    kl_mean: float
    top1_agreement: float
    n_tokens: int
    n_windows: int
    seconds: float
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


class ChunkedLogits:
    """fp32 logits of positions s..e-1 of one batch, computed from the hidden states when possible."""

    def __init__(self, model, use_head: bool):
        self.model, self.parts = model, (_head_path(model) if use_head else None)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def run(self, batch: torch.Tensor) -> None:
        x = batch.to(self.device)
        if self.parts is None:
            self.cache = self.model(input_ids=x, use_cache=False).logits  # model dtype, converted per chunk
        else:
            self.cache = self.parts[0](input_ids=x, use_cache=False).last_hidden_state

    @torch.inference_mode()
    def logits(self, s: int, e: int, device) -> torch.Tensor:
        if self.parts is None:
            return self.cache[:, s:e].to(device=device, dtype=torch.float32)
        return _softcap(self.model, self.parts[1](self.cache[:, s:e])).to(device=device, dtype=torch.float32)


def kl_top1(dense_logits: torch.Tensor, comp_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(dense ‖ compressed) in fp64 and top-1 agreement (bool) from ``[..., V]`` logits."""
    logp = F.log_softmax(dense_logits.float(), dim=-1)
    logq = F.log_softmax(comp_logits.float(), dim=-1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)  # Σ p (log p − log q)
    return kl.clamp_min(0).double(), dense_logits.argmax(-1) == comp_logits.argmax(-1)


@torch.inference_mode()
def compare_runs(dense: ChunkedLogits, comp: ChunkedLogits, length: int, chunk: int = CHUNK) -> tuple[float, int]:
    """(summed KL, number of agreeing argmaxes) over the `length` positions both sides last ran on (``run``),
    `chunk` positions at a time; the sides' caches are freed."""
    kl_sum, agree = 0.0, 0
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        kl, same = kl_top1(dense.logits(s, e, dense.device), comp.logits(s, e, dense.device))
        kl_sum += float(kl.sum())
        agree += int(same.sum())
    dense.cache = comp.cache = None
    return kl_sum, agree


def chunked_kl_top1(dense: ChunkedLogits, comp: ChunkedLogits, batch: torch.Tensor,
                    chunk: int = CHUNK) -> tuple[float, int]:
    """(summed KL, number of agreeing argmaxes) over all positions of `batch`, `chunk` positions at a time."""
    dense.run(batch)
    comp.run(batch)
    return compare_runs(dense, comp, batch.shape[1], chunk)


def fidelity_protocol(protocol: Protocol | str, max_windows: int | None, dense_model, compressed_model) -> Protocol:
    """The protocol `fidelity` runs: at most `max_windows` windows (None: the protocol's own limit), its dtype
    the two models' (as they were loaded); the models must share a vocabulary."""
    if isinstance(protocol, str):
        protocol = get_protocol(protocol)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows={max_windows} is not allowed: must be >= 1 or None")
        protocol = protocol.model_copy(update={"max_windows": min(max_windows, protocol.max_windows or max_windows)})
    dtypes = {dtype_name(model_dtype(m)) for m in (dense_model, compressed_model)}
    vd, vc = (m.get_output_embeddings().weight.shape[0] if m.get_output_embeddings() else None
              for m in (dense_model, compressed_model))
    if vd != vc:
        raise ValueError(f"the models have different vocabularies ({vd} vs {vc}): KL is not defined")
    return protocol.model_copy(update={"dtype": "/".join(sorted(dtypes))})  # what the two ran in


def fidelity_result(kl_sum: float, agree: int, windows: torch.Tensor, protocol: Protocol, t0: float) -> FidelityResult:
    n_tokens = windows.numel()
    result = FidelityResult(kl_sum / n_tokens, agree / n_tokens, n_tokens, windows.shape[0],
                            time.perf_counter() - t0, protocol.model_dump())
    log.info("fidelity: KL %.5f nats, top-1 %.4f over %d positions in %.1fs", result.kl_mean,
             result.top1_agreement, n_tokens, result.seconds)
    return result


def fidelity(dense_model, compressed_model, tokenizer, protocol: Protocol | str = "quick", data_dir=None,
             max_windows: int | None = 16, progress=None) -> FidelityResult:
    """KL(dense ‖ compressed) and top-1 agreement on the protocol's evaluation windows.

    Args:
        dense_model: the reference causal LM.
        compressed_model: the model to compare (same tokenizer and vocabulary); may be on another device.
        tokenizer: the tokenizer of both.
        protocol: a `Protocol` or the name of one (its dataset, split, seqlen and batch size are used).
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``).
        max_windows: at most this many windows (None: the protocol's own limit).
        progress: optional ``callable(done_windows, total_windows)``.
    """
    protocol = fidelity_protocol(protocol, max_windows, dense_model, compressed_model)
    t0 = time.perf_counter()
    windows = windows_of(eval_tokens(tokenizer, protocol.dataset, protocol.split, data_dir), protocol)
    sides = []
    for model in (dense_model, compressed_model):
        parts = _head_path(model)
        device = next(model.parameters()).device
        sides.append(ChunkedLogits(model, parts is not None and _head_path_agrees(model, *parts,
                                                                                    windows[:1].to(device))))
    kl_sum, agree, total = 0.0, 0, windows.shape[0]
    for start in range(0, total, protocol.batch_size):
        k, a = chunked_kl_top1(*sides, windows[start:start + protocol.batch_size])
        kl_sum, agree = kl_sum + k, agree + a
        if progress is not None:
            progress(min(start + protocol.batch_size, total), total)
    return fidelity_result(kl_sum, agree, windows, protocol, t0)
