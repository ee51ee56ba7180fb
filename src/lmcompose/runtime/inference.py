"""Inference that uses the structure: choose an execution path for every term of every CompressedLinear.

The paths live in `lmcompose.runtime.kernels`. ``InferencePolicy()`` (``auto``) picks them by rules that
follow measurements on this project's CPU: weight-only int4/int8 kernels only for bf16/fp16 and a few
rows, CSR only below `CSR_MAX_DENSITY`, low rank as two matmuls only when that costs fewer flops. On
another machine, rerun `measure_csr_threshold` and ``lmcompose bench-speed``.

Method notes: docs/methods/inference.md (the rules and the measurements behind them)

Example::

    from lmcompose.runtime.inference import InferencePolicy, prepare_inference
    record = prepare_inference(model, InferencePolicy())   # {layer name: "int4" | "csr" | ...}
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..algebra.quant import QTensor
from ..algebra.terms import LowRank, Sparse
from .kernels import path_error, quantized_slot, to_csr
from .linear import CompressedLinear

# Largest density at which torch's CPU CSR matmul beat the dense fp32 GEMM for one input row
# (1536x576, one core, torch 2.13+cpu; `measure_csr_threshold` reproduces the measurement).
CSR_MAX_DENSITY = 0.1


class InferencePolicy(BaseModel):
    """How `prepare_inference` chooses paths. ``auto`` follows the measurements in docs/methods/inference.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant: Literal["auto", "kernel", "dequant", "dense"] = Field(
        "auto", description="quantized terms: weight-only kernel where one fits (else dequant), on-the-fly "
                            "dequantization, a cached dense copy, or auto (a kernel that fits for bf16/fp16, "
                            "else dense)")
    sparse: Literal["auto", "csr", "dense"] = Field(
        "auto", description="sparse terms: CSR where supported, dense, or auto (CSR below csr_max_density)")
    lowrank: Literal["auto", "factored", "merged"] = Field(
        "auto", description="low-rank terms: two matmuls, merged into the dense matrix, or auto (fewer flops)")
    csr_max_density: float = Field(CSR_MAX_DENSITY, ge=0.0, le=1.0,
                                   description="largest density for which auto picks CSR")
    kernel_max_rows: int = Field(4, ge=0, description="most input rows the int8/int4 kernels take; "
                                                      "more rows dequantize on the fly")


def _quant_path(term, policy: InferencePolicy, dtype, device) -> str | None:
    """Path for a term whose values are quantized, or None to leave the choice to the sparse rule."""
    mode = policy.quant
    if mode in ("auto", "kernel") and (mode == "kernel" or dtype in (torch.bfloat16, torch.float16)):
        for path in ("int4", "int8"):
            if path_error(term, path, dtype, device) is None:
                return path
        return "dequant" if mode == "kernel" else "dense"
    return "dense" if mode == "auto" else mode


def choose_paths(layer: CompressedLinear, policy: InferencePolicy) -> tuple[str, ...]:
    """One path per term of `layer` under `policy`, for the layer's current device and compute dtype."""
    dtype, device = layer._probe.dtype, layer._probe.device
    paths = []
    for term in layer.terms:
        if isinstance(term, LowRank):
            r = term.u.shape[1]
            factored = policy.lowrank == "factored" or (
                policy.lowrank == "auto" and r * (layer.in_features + layer.out_features)
                < layer.in_features * layer.out_features)
            paths.append("lowrank" if factored else "dense")
            continue
        path = _quant_path(term, policy, dtype, device) if quantized_slot(term) is not None else None
        if isinstance(term, Sparse) and path in (None, "dense", "dequant"):
            density = float(term.mask.float().mean())
            wants_csr = policy.sparse == "csr" or (policy.sparse == "auto" and density <= policy.csr_max_density)
            if wants_csr and path_error(term, "csr", dtype, device) is None:
                path = "csr"
        paths.append(path or "dense")
    return tuple(paths)


def prepare_inference(model: nn.Module, policy: InferencePolicy | None = None) -> dict[str, str]:
    """Set the execution paths of every CompressedLinear in `model`; returns {layer name: mode}."""
    policy = policy or InferencePolicy()
    record = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            module.set_paths(choose_paths(module, policy), kernel_max_rows=policy.kernel_max_rows)
            record[name] = module.mode
    return record


def _stored_nbytes(t) -> int:
    if isinstance(t, QTensor):
        return sum(x.numel() * x.element_size() for x in (t.codes, t.scale, t.zero, t.perm) if x is not None)
    return t.numel() * t.element_size()


def held_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes held in memory: ordinary parameters/buffers, the CompressedLinears' stored terms (as held in
    memory: uint8 codes, dense-layout sparse values plus masks), and the forward caches built so far."""
    seen, params = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            params += t.numel() * t.element_size()
    terms = cached = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            for term in module.terms:
                terms += sum(_stored_nbytes(s) for s in term.slots().values())
                terms += sum(_stored_nbytes(x) for x in (getattr(term, "mask", None), getattr(term, "d", None))
                             if x is not None)
            cached += module.cached_nbytes()
    return {"parameters": params, "terms": terms, "cached": cached, "total": params + terms + cached}


def median_seconds(fn, repeats: int, warmup: int = 2, device: torch.device | None = None) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (CUDA synchronized)."""
    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_csr_threshold(out_features: int = 1536, in_features: int = 576, rows: int = 1,
                          dtype=torch.float32, densities=(0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02),
                          repeats: int = 20, seed: int = 0) -> dict:
    """Time dense GEMM vs CSR matmul for a random unstructured mask at each density (CPU).

    Returns {"threshold": largest density at which CSR was faster (0.0 if none), "dense_us": ...,
    "csr_us": {density: microseconds}}.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} has no CPU CSR matmul; allowed: torch.float32, torch.float64")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    x = torch.randn(rows, in_features, generator=gen, dtype=dtype)
    dense_us = 1e6 * median_seconds(lambda: torch.nn.functional.linear(x, w), repeats)
    csr_us, threshold = {}, 0.0
    for d in densities:
        sparse = to_csr(w * (torch.rand(w.shape, generator=gen) < d))
        csr_us[d] = 1e6 * median_seconds(lambda: torch.sparse.mm(sparse, x.t()), repeats)
        if csr_us[d] < dense_us:
            threshold = max(threshold, d)
    return {"threshold": threshold, "dense_us": dense_us, "csr_us": csr_us, "rows": rows,
            "shape": [out_features, in_features], "dtype": str(dtype)}
