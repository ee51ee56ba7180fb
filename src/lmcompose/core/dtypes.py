"""Float dtypes: the storage dtypes' names and sizes, and the compute dtype of forward passes: ``fp32``, ``bf16``, ``fp16`` or ``auto``.

Weights keep their storage precision; only the matmuls of forward passes (block forwards during
compression, evaluation) run in the compute dtype. ``auto`` picks bf16 where it is measurably faster
than fp32 on the device at hand and fp32 elsewhere, so one default serves a CPU with AMX (bf16
matmuls several times faster than fp32; measured in BENCHMARKS.md), a CPU without fast bf16 (where
bf16 is several times *slower*), and a GPU. The choice is measured once per process and per device
type by timing one matmul in each dtype (a few milliseconds), then recorded in every result.

Two ways of using it, and where each is used:

* `autocast(name, device)`: keeps fp32 master weights and casts inside each matmul. The compression
  pipeline runs its block forwards so, because techniques must read the weights in full precision.
* `cast_for_eval(model, name)`: casts the model's float weights to the dtype (in place). Faster than
  autocast (norms, attention and the residual stream run in bf16 too; BENCHMARKS.md, "Compute dtype:
  cast against autocast"); evaluation uses it, on models whose weights are saved or no longer needed. A
  `CompressedLinear` keeps its stored terms whatever the cast (only its forward cache follows).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FLOAT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
CHOICES = ("auto", "fp32", "bf16", "fp16")
SPEEDUP_NEEDED = 1.5  # bf16 must beat fp32 by this factor for `auto` to take it


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in FLOAT_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not a storage float dtype; allowed: {sorted(FLOAT_DTYPES)}")


def check(name: str, field: str = "dtype") -> str:
    if name not in CHOICES:
        raise ValueError(f"{field}={name!r} is not allowed; allowed: {list(CHOICES)}")
    return name


@functools.lru_cache(maxsize=None)
def bf16_speedup(device_type: str) -> float:
    """Measured fp32-time / bf16-time of a 1024×576×1536 matmul on `device_type` (cached per process)."""
    if device_type == "cuda":
        return float("inf") if torch.cuda.is_bf16_supported() else 0.0
    if device_type != "cpu":
        return 0.0
    seconds = {}
    for dt in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 576, dtype=dt), torch.randn(576, 1536, dtype=dt)
        a @ b  # warm up the kernel
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        seconds[dt] = time.perf_counter() - t0
    ratio = seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-9)
    log.info("bf16 matmul is %.1fx fp32 speed on this %s", ratio, device_type)
    return ratio


def resolve(name: str, device, model_dtype: torch.dtype = torch.float32) -> str:
    """The concrete compute dtype for `name` on `device` for a model whose weights are `model_dtype`.

    ``auto``: a model already in half precision computes in its own dtype; an fp32 model computes in
    bf16 where bf16 is at least `SPEEDUP_NEEDED`× faster, else in fp32."""
    check(name)
    if name != "auto":
        return name
    if model_dtype != torch.float32:
        return dtype_name(model_dtype)
    return "bf16" if bf16_speedup(torch.device(device).type) >= SPEEDUP_NEEDED else "fp32"


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def autocast(name: str, device):
    """Autocast context for compute dtype `name` (already resolved); a no-op for fp32."""
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=FLOAT_DTYPES[name])


def full_precision(device):
    """Autocast switched off: techniques and error measurements run in the dtypes they ask for."""
    return torch.autocast(torch.device(device).type, enabled=False)


def cast_for_eval(model: nn.Module, name: str = "auto") -> str:
    """Cast `model` in place to the evaluation dtype `name` resolves to; returns that dtype's name."""
    device = next(model.parameters()).device
    resolved = resolve(name, device, model_dtype(model))
    if FLOAT_DTYPES[resolved] != model_dtype(model):
        model.to(FLOAT_DTYPES[resolved])
    return resolved


def eval_dtype(dtype: str, device: str) -> str:
    """The dtype to load a model in for evaluation: `dtype`, with ``auto`` resolved for `device`
    (``auto`` meaning CUDA when present)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve(dtype, device)
