"""Export to GGUF (llama architecture only; for llama.cpp), with a GGML type per tensor.

Each quantized Linear goes to the cheapest GGML block type that holds its grid *exactly* (codes and d
bit-exact), so a mixed-bit result (sensitivity allocation) gets one type per Linear:

    symmetric b ≤ 4 → Q4_0 (d·(q-8), our code shifted by 8 - 2^(b-1)),  symmetric 5 → Q5_0 (d·(q-16)),
    symmetric 6..8 → Q8_0 (d·q, q = code - 2^(b-1));
    asymmetric b ≤ 3 → Q4_0 (q = code - zero + 8), asymmetric 4 → Q4_1 (d·q + m), 5 → Q5_1,
    asymmetric 6, 7 → Q8_0 (q = code - zero, which fits an int8)

A grid maps only when its 32-column blocks never straddle two of our groups and its scales are fp16
values. For Q4_1/Q5_1 the offset m = -d·zero is rounded to fp16 (the one inexact value). A grid with no
exact type (asymmetric 8-bit, a stored act-order permutation, misaligned groups) is refused unless
``allow_requant=True``, which re-quantizes its dequantized weight to the type of the nearest width that
``gguf.quants`` can write (Q4_0/Q4_1, Q5_0/Q5_1, Q8_0; F16 when in_features is not a multiple of 32),
logged and listed in the ``lmcompose.requantized`` metadata key. The GGML types are the legacy 32-column
ones: ``gguf.quants`` can write no K-quant (Q2_K..Q6_K raise NotImplementedError), so a 2- or 3-bit
Linear takes Q4_0's 4.5 bits per weight; the summary reports our bytes beside the file's.

A sparse Linear is written as its dense grid with the pruned entries at the zero-point code (exact zeros,
except Q4_1/Q5_1's rounded m); float Linears as F16 (or F32). The tokenizer is written as a byte-level BPE.

Method notes: docs/methods/formats.md (the type table, the tokenizer, the limits)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...algebra.quant import QTensor
from ...core.io import atomic_file
from ..checkpoint import other_tensors
from . import ExportSummary, layer_exports

log = logging.getLogger(__name__)


GGUF_BLOCK = 32

# Legacy 32-column GGML types: (bytes per block, the signed range of the stored q around its offset)
GGML_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def exact_type_name(symmetric: bool, bits: int) -> str | None:
    """The cheapest GGML type holding a (symmetric, bits) grid exactly (module docstring), or None."""
    if symmetric:
        return "Q4_0" if bits <= 4 else "Q5_0" if bits == 5 else "Q8_0"
    return {2: "Q4_0", 3: "Q4_0", 4: "Q4_1", 5: "Q5_1", 6: "Q8_0", 7: "Q8_0"}.get(bits)


def requant_type_name(symmetric: bool, bits: int) -> str:
    """The type `allow_requant` re-quantizes a (symmetric, bits) grid to: the nearest width gguf.quants writes."""
    if bits <= 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 5:
        return "Q5_0" if symmetric else "Q5_1"
    return "Q8_0"


def gguf_type(q: QTensor) -> tuple[str | None, str]:
    """(GGML type name, "") when the grid maps onto one exactly, else (None, reason)."""
    spec, cols = q.spec, q.shape[1]
    name = exact_type_name(spec.symmetric, spec.bits)
    if name is None:
        return None, (f"{'symmetric' if spec.symmetric else 'asymmetric'} {spec.bits}-bit has no exact GGML type "
                      "(asymmetric codes minus zero points must fit Q8_0's int8: up to 7 bits)")
    if q.perm is not None:
        return None, "the grid stores an act-order permutation (GGUF blocks follow the column order)"
    if cols % GGUF_BLOCK or (spec.group_size is not None and spec.group_size % GGUF_BLOCK):
        return None, (f"GGML blocks are {GGUF_BLOCK} columns: in_features={cols} and group_size={spec.group_size} "
                      f"must be multiples of {GGUF_BLOCK}")
    if not torch.equal(q.scale.to(torch.float16).to(q.scale.dtype), q.scale):
        return None, f"scale_dtype={spec.scale_dtype} scales are not all fp16 values (GGML stores fp16 d)"
    return name, ""


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """GGML 4-bit layout of [n, 32] codes: byte j holds element j (low) and element j+16 (high)."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def gguf_blocks(q: QTensor, type_name: str) -> np.ndarray:
    """The GGML block bytes [rows, blocks·type_size] of `q` in `type_name` (the exact map, codes and d
    bit-exact)."""
    rows, cols = q.shape
    g = q.spec.group_size or cols
    block_group = torch.arange(0, cols, GGUF_BLOCK) // g
    d = q.scale[:, block_group].reshape(-1)  # fp16 values (checked), one per 32-column block
    codes = q.codes.to(torch.int32)
    if q.zero is None:
        signed = codes - (q.spec.maxq + 1) // 2  # our d·(code - 2^(b-1))
    else:
        signed = codes - q.zero.to(torch.int32)[:, q.group_index()]  # d·(code - zero)
    signed = signed.reshape(-1, GGUF_BLOCK)
    codes = codes.reshape(-1, GGUF_BLOCK)
    parts = [_f16_bytes(d)]
    if type_name in ("Q4_1", "Q5_1"):  # d·q + m with q = code and m = -d·zero (rounded to fp16)
        zero = q.zero.float()[:, block_group].reshape(-1)
        parts.append(_f16_bytes(-d.float() * zero))
        stored = codes
    else:  # d·(q - offset): q = signed + offset (Q8_0 stores the signed int8 itself)
        stored = signed + {"Q4_0": 8, "Q5_0": 16, "Q8_0": 0}[type_name]
    if type_name == "Q8_0":
        parts.append(stored.to(torch.int8).view(torch.uint8))
    else:
        if type_name in ("Q5_0", "Q5_1"):  # 5th bits as one little-endian uint32 per block
            high = ((stored >> 4) & 1).to(torch.int64) << torch.arange(GGUF_BLOCK, dtype=torch.int64)
            parts.append(high.sum(1).to(torch.int32).reshape(-1, 1).view(torch.uint8))
        parts.append(_nibbles(stored).to(torch.uint8))
    blocks = torch.cat(parts, dim=1)
    return blocks.reshape(rows, -1).numpy()


def _rope_rows(rows: int, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (``convert_hf_to_gguf.py`` LlamaModel.permute) as a row index."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _permute_rows(t, idx):
    if isinstance(t, QTensor):
        return QTensor(t.codes[idx], t.scale[idx], None if t.zero is None else t.zero[idx], t.spec, t.perm)
    return t[idx]


def _gguf_hparams(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not written by this GGUF "
                         "export (only the default RoPE); use --format dense or compressed-tensors")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _gguf_tokenizer(writer, tokenizer, vocab_size: int, pre: str) -> None:
    """Byte-level BPE vocabulary as ``convert_hf_to_gguf`` writes it (``tokenizer.ggml.model = gpt2``)."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise ValueError(f"the GGUF export writes byte-level BPE tokenizers only; this one is "
                         f"{model.get('type')!r} with pre-tokenizer {(backend.get('pre_tokenizer') or {}).get('type')!r}. "
                         "Pass tokenizer=None (CLI: --no-tokenizer) to write the weights only")
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(vocab) >= vocab_size:
        raise ValueError(f"tokenizer has token id {max(vocab)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            add(token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model, out_path: str | Path, tokenizer=None, *, allow_requant: bool = False,
                float_dtype: str = "fp16", pre_tokenizer: str = "gpt-2", overwrite: bool = False,
                merge_dense: bool = False) -> ExportSummary:
    """Write a llama-architecture GGUF file, each quantized Linear in the cheapest GGML type that holds its
    codes exactly (module docstring).

    Args:
        model: a ``llama`` model (config ``model_type``) whose Linears are quantized, sparse or float.
        out_path: the ``.gguf`` file (written to a temporary sibling, then renamed).
        tokenizer: byte-level BPE tokenizer written as GGUF metadata; None writes weights only.
        allow_requant: re-quantize Linears whose grid has no exact GGML type to the nearest one
            (`requant_type_name`) instead of refusing.
        float_dtype: ``fp16`` or ``fp32`` for the other 2-D tensors (1-D tensors are F32, as in llama.cpp).
        pre_tokenizer: ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name; ``gpt-2`` is GPT-2's regex).
        overwrite: replace an existing file.
        merge_dense: write Linears whose structure GGUF cannot carry (low rank, input operations, a sum of
            terms) as merged F16/F32 weights instead of refusing.

    Returns:
        An `ExportSummary`: per Linear, its GGML type, our bytes and the bytes its tensors take in the file.
    """
    import gguf
    import gguf.quants

    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"the GGUF export writes the llama architecture only; model_type={config.model_type!r}. "
                         "Use --format compressed-tensors or dense")
    if float_dtype not in ("fp16", "fp32"):
        raise ValueError(f"float_dtype={float_dtype!r} is not allowed for GGUF; allowed: fp16, fp32")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    layers = layer_exports(model, "GGUF", merge_dense=merge_dense)
    tensors: dict[str, torch.Tensor | QTensor] = dict(other_tensors(model, "fp32"))
    types: dict[str, str] = {}  # HF weight name -> GGML type of a quantized Linear
    requant = []
    for name, l in layers.items():
        w = l.weight
        if isinstance(w, QTensor):
            type_name, reason = gguf_type(w)
            if type_name is None and not allow_requant:
                raise ValueError(f"{name}: {reason}; pass allow_requant=True (CLI: --allow-requant) to re-quantize "
                                 "such Linears to the nearest GGML type")
            if type_name is None:
                type_name = requant_type_name(w.spec.symmetric, w.spec.bits) if w.shape[1] % GGUF_BLOCK == 0 else None
                log.warning("GGUF export: %s re-quantized to %s (%s)", name, type_name or "F16", reason)
                requant.append(name)
                w = w.dequantize(torch.float32)
            if type_name is not None:
                types[f"{name}.weight"] = type_name
        tensors[f"{name}.weight"] = w if isinstance(w, QTensor) else w.float()
        if l.bias is not None:
            tensors[f"{name}.bias"] = l.bias.float()

    summary = ExportSummary(out, "gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(getattr(config, "_name_or_path", "") or "lmcompose export")
        _gguf_hparams(writer, config)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("lmcompose.requantized", json.dumps(requant))
        if tokenizer is not None:
            _gguf_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
        for hf_name, t in tensors.items():
            base, _, suffix = hf_name.rpartition(".")
            mapped = names.get_name(base)
            if mapped is None:
                raise ValueError(f"tensor {hf_name!r} has no llama.cpp name in gguf.TensorNameMap")
            n_head = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(
                mapped.rpartition(".")[2])
            if n_head is not None:
                rows = t.shape[0]
                t = _permute_rows(t, _rope_rows(rows, n_head))
            gguf_name = f"{mapped}.{suffix}"
            type_name = types.get(hf_name)
            if isinstance(t, QTensor):
                data = gguf_blocks(t, type_name)
                writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
            elif type_name is not None:  # re-quantized (allow_requant)
                data = gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[type_name])
                writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
            else:
                data = t.float().numpy() if t.ndim == 1 or float_dtype == "fp32" else t.to(torch.float16).numpy()
                writer.add_tensor(gguf_name, data)
            if base in layers:
                row = summary.layers.setdefault(base, {"structure": layers[base].structure, "our_bytes":
                                                       layers[base].our_bytes, "file_bytes": 0})
                row["file_bytes"] += int(data.nbytes)
                if suffix == "weight":
                    stored = type_name or ("F16" if data.dtype == np.float16 else "F32")
                    row["stored"] = f"{stored} requant" if base in requant else \
                        f"{stored} merged" if layers[base].merged else stored
                    row["gguf_name"] = gguf_name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    summary.file_bytes = out.stat().st_size
    if requant:
        summary.notes.append(f"{len(requant)} Linears re-quantized (no exact GGML type): {', '.join(requant)}")
    return summary
