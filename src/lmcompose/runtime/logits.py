"""A causal LM's logits a chunk of positions at a time: the trunk once, then the output head per chunk.

A large vocabulary never materialises as ``batch × seqlen × vocab`` fp32 logits this way: the trunk's
hidden states (``[B, L, hidden]``) are kept and the head (with the model's final soft cap, where it has
one) runs over `CHUNK` positions at a time. Perplexity, fidelity and recovery's KL loss use it.

Example::

    parts = head_path(model)                     # (trunk, head) or None
    if parts and head_path_agrees(model, *parts, batch[:1]):
        hidden = parts[0](input_ids=batch, use_cache=False).last_hidden_state
        logits = softcap(model, parts[1](hidden[:, :CHUNK]))
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
CHUNK = 256  # positions per fp32 log-softmax chunk


def softcap(model, logits: torch.Tensor) -> torch.Tensor:
    """The model's final logit soft cap (Gemma's ``final_logit_softcapping``), if it has one."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_path(model):
    """(trunk, head) when the logits can be computed chunk by chunk from the hidden states, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, "base_model", None)
    if head is None or trunk is None or trunk is model:
        return None
    return trunk, head


@torch.inference_mode()
def head_path_agrees(model, trunk, head, batch: torch.Tensor) -> bool:
    """Whether trunk + head (+ soft cap) reproduce the model's own logits on a slice of `batch`."""
    x = batch[:1, : min(batch.shape[1], 32)]
    full = model(input_ids=x, use_cache=False).logits.float()
    mine = softcap(model, head(trunk(input_ids=x, use_cache=False).last_hidden_state)).float()
    ok = full.shape == mine.shape and bool((full - mine).abs().max() <= 1e-3 * full.abs().max() + 1e-4)
    if not ok:
        log.warning("%s post-processes its logits: its full logits are used (more memory)", type(model).__name__)
    return ok
