"""Saving and loading compressed models: safetensors + JSON, no pickles anywhere.

A compressed checkpoint is a directory::

    model.safetensors   every stored tensor: packed codes, scales, zeros, sparse indices, factors,
                        and the model's other weights in the recipe's float dtype
    lmcompose.json      format version, per-layer structure, model-level online operations ("model_ops",
                        e.g. a rotation conjugating the final norm: 0 bytes, re-attached on load),
                        recipe, report, evaluation protocol
    config.json         the Hugging Face config, to rebuild the architecture
    tokenizer files

It is written into a temporary sibling directory and renamed into place, so an interrupted save never
leaves a directory that looks whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.dtypes import FLOAT_DTYPES
from ..core.io import atomic_dir
from ..core.memory import release_freed_memory
from ..pipeline.blocks import compressed_modules, set_module
from ..runtime.linear import CompressedLinear
from ..runtime.model_ops import ModelOp, attach_model_op, check_model_ops, model_ops

FORMAT_VERSION = 1
META_FILE = "lmcompose.json"
WEIGHTS_FILE = "model.safetensors"


def other_tensors(model: nn.Module, float_dtype: str) -> dict[str, torch.Tensor]:
    """Everything but the compressed Linears, as saved: floats in `float_dtype`, tied tensors once."""
    skip = tuple(f"{n}." for n in compressed_modules(model))
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if name.startswith(skip):
            continue
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = (t.to(FLOAT_DTYPES[float_dtype]) if t.is_floating_point() else t).detach().cpu().contiguous()
    return out


def save_compressed(model: nn.Module, out_dir: str | Path, tokenizer=None, *, float_dtype: str = "fp16",
                    recipe: dict | None = None, report: dict | None = None, protocol: dict | None = None,
                    base_model: str = "", overwrite: bool = False) -> Path:
    layers = compressed_modules(model)
    tensors = other_tensors(model, float_dtype)
    for name, mod in layers.items():
        tensors.update(mod.state(name))
    meta = {"format_version": FORMAT_VERSION, "base_model": base_model, "float_dtype": float_dtype,
            "layers": {n: m.meta() for n, m in layers.items()},
            "model_ops": [op.meta() for op in model_ops(model)], "recipe": recipe, "report": report,
            "protocol": protocol}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lmcompose": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


def file_tensor_bytes(path: str | Path, prefix: str | None = None) -> int:
    """Sum of tensor bytes stored in a safetensors file (optionally under one key prefix)."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if prefix is None or key.startswith(prefix):
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I16": 2, "I32": 4,
                              "I64": 8, "BOOL": 1}[sl.get_dtype()]
    return total


def load_compressed(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """Rebuild a compressed model saved by :func:`save_compressed`. Returns (model, tokenizer, meta)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an lmcompose checkpoint: {META_FILE} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version={meta.get('format_version')!r}; this lmcompose reads {FORMAT_VERSION}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    compute = FLOAT_DTYPES[dtype]
    try:  # refused before any weight is read: a model without its online operations computes something else
        ops = [ModelOp.from_meta(m) for m in meta.get("model_ops", [])]
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {err}") from None
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    state = load_file(str(path / WEIGHTS_FILE))
    for name, layer_meta in meta["layers"].items():
        set_module(model, name, CompressedLinear.from_state(name, layer_meta, state, compute))
    skip = tuple(f"{n}." for n in meta["layers"])
    rest = {k: v.to(compute) if v.is_floating_point() else v for k, v in state.items() if not k.startswith(skip)}
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"checkpoint {str(path)!r} lacks tensors for {still_meta[:5]}")
    model = model.to(device=device, dtype=compute).eval()
    check_model_ops(model, ops)
    for op in ops:
        attach_model_op(model, op)
    del state, rest
    release_freed_memory()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer, meta


