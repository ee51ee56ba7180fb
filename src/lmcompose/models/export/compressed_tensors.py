"""Export to compressed-tensors (``pack-quantized``: what vLLM and transformers load).

Codes are written bit-exactly, as unsigned values packed into int32 words, with one scale per group (and
packed zero points for asymmetric grids). Widths that do not divide 32, groups that do not divide
in_features and stored act-order permutations are refused with the reason. Load it in transformers with
``quantization_config=CompressedTensorsConfig(dequantize=True)``.

Method notes: docs/methods/formats.md (the layout, the limits and why)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...algebra.quant import QTensor
from ...core.dtypes import FLOAT_DTYPES
from ...core.io import atomic_dir
from ...pipeline.blocks import compressed_modules
from ..checkpoint import other_tensors
from . import quantized_weights


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit values [rows, n] along the last axis into int32 words, low bits first."""
    per_word = 32 // bits
    rows, n = values.shape
    padded = torch.zeros(rows, -(-n // per_word) * per_word, dtype=torch.int64)
    padded[:, :n] = values.to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded.reshape(rows, -1, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's-complement wrap


def _ct_check(name: str, q: QTensor) -> None:
    spec, cols = q.spec, q.shape[1]
    if 32 % spec.bits:
        raise ValueError(f"{name}: bits={spec.bits} cannot be written as compressed-tensors pack-quantized; "
                         "allowed: 2, 4, 8 (widths that divide 32)")
    if q.perm is not None:
        raise ValueError(f"{name}: the grid stores an act-order permutation, which compressed-tensors cannot "
                         "represent (actorder='group' / g_idx was removed); quantize with GPTQ "
                         "static_groups: true, or act_order: false")
    if spec.group_size is not None and cols % spec.group_size:
        raise ValueError(f"{name}: group_size={spec.group_size} does not divide in_features={cols}, and "
                         "compressed-tensors has no shorter last group; pick a group size that divides it")


def _ct_scheme(spec) -> dict:
    grouped = spec.group_size is not None
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "group_size": spec.group_size, "strategy": "group" if grouped else "channel",
            "dynamic": False}


def ct_tensors(name: str, q: QTensor) -> dict[str, torch.Tensor]:
    """One Linear's tensors in compressed-tensors pack-quantized layout (see the module docstring)."""
    out = {f"{name}.weight_packed": pack_int32(q.codes, q.spec.bits),
           f"{name}.weight_scale": q.scale.contiguous(),
           f"{name}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
    if q.zero is not None:  # packed along rows: transpose, pack, transpose back
        out[f"{name}.weight_zero_point"] = pack_int32(q.zero.T, q.spec.bits).T.contiguous()
    return out


def export_compressed_tensors(model, out_dir: str | Path, tokenizer=None, float_dtype: str = "fp16",
                              overwrite: bool = False) -> Path:
    """Write a Hugging Face checkpoint in compressed-tensors ``pack-quantized`` format.

    Args:
        model: a model whose CompressedLinears are quantization-only.
        out_dir: output directory (written atomically).
        tokenizer: saved beside the weights when given.
        float_dtype: dtype of every other tensor (embeddings, norms, unquantized Linears) and of config ``dtype``.
        overwrite: replace an existing `out_dir`.
    """
    weights = quantized_weights(model, "compressed-tensors")
    for name, q in weights.items():
        _ct_check(name, q)
    layers = compressed_modules(model)
    tensors = other_tensors(model, float_dtype)
    groups: dict[tuple, list[str]] = {}
    for name, q in weights.items():
        tensors.update(ct_tensors(name, q))
        bias = layers[name].bias_value
        if bias is not None:
            tensors[f"{name}.bias"] = bias.to(FLOAT_DTYPES[float_dtype]).cpu().contiguous()
        groups.setdefault((q.spec.bits, q.spec.group_size, q.spec.symmetric), []).append(name)
    config_groups = {f"group_{i}": {"targets": names, "weights": _ct_scheme(weights[names[0]].spec),
                                    "input_activations": None, "output_activations": None,
                                    "format": "pack-quantized"}
                     for i, names in enumerate(groups.values())}
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
               "global_compression_ratio": None}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = qconfig
        config["dtype"] = str(FLOAT_DTYPES[float_dtype]).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
