"""Export to compressed-tensors (``pack-quantized``: what vLLM and transformers load).

Codes are written bit-exactly, as unsigned values packed into int32 words (a dense bit stream per row,
as compressed-tensors' ``pack_to_int32`` writes it), with one scale per group (and packed zero points for
asymmetric grids).

* **Mixed bits.** Linears are grouped by (bits, group size, symmetric), one ``config_group`` each, whose
  ``targets`` list the Linears by their exact names; Linears written as floats are in no group.
* **Sparse results.** A sparse Linear's pruned entries are written as the zero-point code (an exact 0
  after dequantization) and the pattern is recorded in ``sparsity_config`` (format ``dense``,
  ``sparsity_structure`` "2:4" or "unstructured", explicit ``targets``): the ``pack-quantized`` + dense
  sparsity layout llm-compressor writes for W4A16/W8A16 sparse models and vLLM reads. The installed
  compressed-tensors (0.20) dropped the compressors that stored only the nonzeros (``sparse-bitmask``,
  ``sparse-24-bitmask``, ``marlin-24`` are "legacy", with no decompressor), so nothing that reads the
  file saves the pruned bytes: the summary reports our bytes beside the file's.
* Groups that do not divide in_features and stored act-order permutations are refused with the reason.

Load it in transformers with ``quantization_config=CompressedTensorsConfig(dequantize=True)``.

Method notes: docs/methods/formats.md (the layout, the limits and why)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...algebra.quant import QTensor
from ...core.dtypes import FLOAT_DTYPES
from ...core.io import atomic_dir
from ..checkpoint import other_tensors
from . import ExportSummary, layer_exports, path_bytes

VLLM_BITS = (4, 8)  # vLLM's CompressedTensorsWNA16: symmetric 4- and 8-bit weight-only grids (WNA16_SUPPORTED_BITS)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit values [rows, n] along the last axis into int32 words: value i of a row at
    bit ``i·bits`` of the row's bit stream, low bits first (a value may straddle two words), as
    compressed-tensors' ``pack_to_int32``; ``ceil(n·bits/32)`` words per row."""
    rows, n = values.shape
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    words = math.ceil(n * bits / 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :n * bits] = stream
    packed = (padded.reshape(rows, words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # two's-complement wrap


def ct_refusal(q: QTensor) -> str | None:
    """Why compressed-tensors cannot hold `q` exactly, or None."""
    spec, cols = q.spec, q.shape[1]
    if q.perm is not None:
        return ("the grid stores an act-order permutation, which compressed-tensors cannot represent "
                "(actorder='group' / g_idx was removed); quantize with GPTQ static_groups: true, or act_order: false")
    if spec.group_size is not None and cols % spec.group_size:
        return (f"group_size={spec.group_size} does not divide in_features={cols}, and compressed-tensors has no "
                "shorter last group; pick a group size that divides it")
    return None


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


def _stored(q: QTensor) -> str:
    g = f"g{q.spec.group_size}" if q.spec.group_size else "per-row"
    return f"int{q.spec.bits} {g} {'sym' if q.spec.symmetric else 'asym'}"


def _sparsity_config(layers) -> dict | None:
    sparse = {name: l for name, l in layers.items() if l.sparsity}
    if not sparse:
        return None
    patterns = sorted({l.sparsity for l in sparse.values()})
    zeros = sum(int((l.weight.dequantize() if isinstance(l.weight, QTensor) else l.weight).eq(0).sum())
                for l in sparse.values())
    total = sum(l.weight.shape[0] * l.weight.shape[1] for l in layers.values())
    return {"format": "dense", "targets": sorted(sparse), "ignore": [],
            "global_sparsity": zeros / total,
            "sparsity_structure": patterns[0] if len(patterns) == 1 else "unstructured"}


def export_compressed_tensors(model, out_dir: str | Path, tokenizer=None, float_dtype: str = "fp16",
                              overwrite: bool = False, merge_dense: bool = False) -> ExportSummary:
    """Write a Hugging Face checkpoint in compressed-tensors ``pack-quantized`` format.

    Args:
        model: a model whose CompressedLinears are quantized, sparse (quantized or float) or float.
        out_dir: output directory (written atomically).
        tokenizer: saved beside the weights when given.
        float_dtype: dtype of every other tensor (embeddings, norms, float Linears) and of config ``dtype``.
        overwrite: replace an existing `out_dir`.
        merge_dense: write Linears whose structure the format cannot carry (low rank, input operations,
            a sum of terms) as merged float weights instead of refusing.

    Returns:
        An `ExportSummary`: per Linear, how it is stored, our bytes and the bytes its tensors take.
    """
    layers = layer_exports(model, "compressed-tensors", merge_dense=merge_dense)
    for name, l in layers.items():
        reason = ct_refusal(l.weight) if isinstance(l.weight, QTensor) else None
        if reason and not merge_dense:
            raise ValueError(f"{name}: {reason}. Pass --merge-dense (merge_dense=True) to write such Linears as "
                             "merged float weights, or use --format dense")
        if reason:
            l.structure = "merged act-order" if l.weight.perm is not None else "merged group size"
            l.weight, l.merged = l.weight.dequantize(torch.float32), True
    fdtype = FLOAT_DTYPES[float_dtype]
    tensors = other_tensors(model, float_dtype)
    summary = ExportSummary(Path(out_dir), "compressed-tensors")
    groups: dict[tuple, list[str]] = {}
    for name, l in layers.items():
        if isinstance(l.weight, QTensor):
            own = ct_tensors(name, l.weight)
            groups.setdefault((l.weight.spec.bits, l.weight.spec.group_size, l.weight.spec.symmetric), []).append(name)
            stored = _stored(l.weight)
        else:
            own = {f"{name}.weight": l.weight.to(fdtype).contiguous()}
            stored = f"{float_dtype}{' merged' if l.merged else ''}"
        if l.bias is not None:
            own[f"{name}.bias"] = l.bias.to(fdtype).contiguous()
        tensors.update(own)
        summary.layers[name] = {"structure": l.structure, "stored": stored, "our_bytes": l.our_bytes,
                                "file_bytes": sum(t.numel() * t.element_size() for t in own.values())}
    odd = sorted({f"{'sym' if sym else 'asym'} {bits}-bit" for bits, _, sym in groups if bits not in VLLM_BITS or not sym})
    if odd:
        summary.notes.append(f"{', '.join(odd)} Linears load in transformers; vLLM's weight-only scheme "
                             f"(CompressedTensorsWNA16) takes symmetric {' and '.join(map(str, VLLM_BITS))}-bit grids")
    config_groups = {f"group_{i}": {"targets": names, "weights": _ct_scheme(layers[names[0]].weight.spec),
                                    "input_activations": None, "output_activations": None,
                                    "format": "pack-quantized"}
                     for i, names in enumerate(groups.values())}
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
               "global_compression_ratio": None}
    sparsity = _sparsity_config(layers)
    if sparsity is not None:
        qconfig["sparsity_config"] = sparsity
        summary.notes.append(f"sparse Linears written as explicit zeros ({sparsity['sparsity_structure']}, "
                             f"{len(sparsity['targets'])} Linears): the file holds the dense grid")
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if config_groups:
            config["quantization_config"] = qconfig
        config["dtype"] = str(fdtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    summary.file_bytes = path_bytes(out_dir)
    return summary
