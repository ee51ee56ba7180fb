"""Recovery: fine-tune the float factors of a compressed model on a causal-LM loss, everything else frozen.

SSLC's optional recovery (METHODS §2.3 step 7: "train U', V' with S frozen, mask fixed") and SVD-LLM's
parameter update, read as one pass over the whole model after the sequential pass, on the calibration
windows: the float low-rank factors (with ``train: lowrank+sparse`` also the float sparse values, inside
their masks) train with AdamW; codes, masks and the byte count do not change.

Method notes: docs/methods/recover.md

Example::

    recover: {steps: 200, lr: 1.0e-4, batch_size: 1, train: lowrank}
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra.quant import QTensor
from ..algebra.terms import as_float
from ..core import dtypes as compute
from ..core.dtypes import FLOAT_DTYPES, dtype_name
from ..pipeline.blocks import compressed_modules
from ..recipe import Recovery
from ..runtime.linear import CompressedLinear


def _float(t) -> bool:
    return not isinstance(t, QTensor)


class _Trainable:
    """One CompressedLinear during recovery: its frozen terms summed once, its trained ones as Parameters."""

    def __init__(self, module: CompressedLinear, cfg: Recovery, dtype: torch.dtype):
        self.module = module
        self.index, self.params, frozen = [], [], []
        for i, term in enumerate(module.terms):
            slots = {k: v for k, v in term.slots().items() if _float(v)}
            if cfg.trains(term.kind) and len(slots) == len(term.slots()):
                self.index.append(i)
                self.params.append({k: nn.Parameter(v.detach().float()) for k, v in slots.items()})
            else:
                frozen.append(term)
        # the frozen part, summed once and held in the compute dtype (what autocast would cast it to)
        self.frozen = torch.stack([t.weight(torch.float32) for t in frozen]).sum(0).to(dtype) if frozen else None
        self.bias = None if module.bias_value is None else module.bias_value.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.frozen, self.bias) if self.frozen is not None else (
            0 if self.bias is None else self.bias)
        for i, p in zip(self.index, self.params):
            term = self.module.terms[i]
            if term.kind == "lowrank":
                v = p["v"] if term.d is None else term.d.float().unsqueeze(1) * p["v"]
                y = y + F.linear(F.linear(x, v), p["u"])
            else:
                y = y + F.linear(x, p["values"] * term.mask.to(p["values"].dtype))
        return y

    def write_back(self) -> None:
        terms = list(self.module.terms)
        for i, p in zip(self.index, self.params):
            term = terms[i]
            new = {k: as_float(v.detach() * (term.mask if k == "values" else 1), dtype_name(term.slots()[k].dtype))
                   for k, v in p.items()}
            terms[i] = term.replace(**new)
        self.module.terms = tuple(terms)
        self.module._cache = None


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def recover(model: nn.Module, windows: torch.Tensor, cfg: Recovery, compute_dtype: str = "fp32",
            device=None) -> dict:
    """Fine-tune `model`'s compressed Linears in place (see the module docstring). Returns a record: the
    mean LM loss of the first (up to) 8 windows before and after training (`loss_before`, `loss_after`;
    training windows, so a check that training worked, not an evaluation), and the mean training loss
    over the first and the last tenth of the steps (different windows, so noisy)."""
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.to(device)
    modules = compressed_modules(model)
    specs = {n: m.spec() for n, m in modules.items()}
    layers = {n: _Trainable(m, cfg, FLOAT_DTYPES[compute_dtype]) for n, m in modules.items()}
    layers = {n: t for n, t in layers.items() if t.params}
    if not layers:
        raise ValueError(f"recover.train={cfg.train!r}: no compressed Linear has a float tensor to train")
    params = [p for t in layers.values() for d in t.params for p in d.values()]
    trained = sum(int(t.module.terms[i].mask.sum()) if "values" in d else sum(p.numel() for p in d.values())
                  for t in layers.values() for i, d in zip(t.index, t.params))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, t0 = [], time.perf_counter()
    was_training = model.training
    probe = windows[:min(8, windows.shape[0])].to(device)  # the same windows before and after

    @torch.no_grad()
    def probe_loss() -> float:
        with compute.autocast(compute_dtype, device):
            return sum(float(model(input_ids=probe[i:i + 1], labels=probe[i:i + 1], use_cache=False).loss)
                       for i in range(probe.shape[0])) / probe.shape[0]

    try:
        for t in layers.values():
            t.module.forward = t.forward
        with _frozen(model):
            before = probe_loss()
            model.train()
            for step in range(cfg.steps):
                rows = torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % windows.shape[0]
                batch = windows[rows].to(device)
                with compute.autocast(compute_dtype, device):
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            model.eval()
            after = probe_loss()
    finally:
        for t in layers.values():
            del t.module.forward  # back to the class's forward
        model.train(was_training)
    for n, t in layers.items():
        t.write_back()
        if t.module.spec() != specs[n]:
            raise RuntimeError(f"recovery changed the structure of {n}: {specs[n].describe()} -> "
                               f"{t.module.spec().describe()}")
    model.to(home)
    tenth = max(1, len(losses) // 10)
    return {**cfg.model_dump(), "trained_linears": len(layers), "trained_parameters": trained,
            "loss_before": before, "loss_after": after, "probe_windows": probe.shape[0],
            "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "seconds": round(time.perf_counter() - t0, 2)}
