"""Saving and loading compressed models: safetensors + JSON, no pickles anywhere.

A compressed checkpoint is a directory::

    model.safetensors   every stored tensor: packed codes, scales, zeros, sparse indices, factors,
                        and the model's other weights in the recipe's float dtype
    lmcompose.json      format version, per-layer structure, recipe, report, evaluation protocol
    config.json         the Hugging Face config, to rebuild the architecture
    tokenizer files

It is written into a temporary sibling directory and renamed into place, so an interrupted save never
leaves a directory that looks whole. ``export_dense`` writes a merged dense checkpoint with
``save_pretrained`` that any engine can load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..algebra.linear import CompressedLinear
from ..algebra.quant import FLOAT_BYTES, FLOAT_DTYPES
from ..pipeline.blocks import set_module

FORMAT_VERSION = 1
META_FILE = "lmcompose.json"
WEIGHTS_FILE = "model.safetensors"


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary directory that replaces `out_dir` only if the body succeeds."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


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


def other_nbytes(model: nn.Module, float_dtype: str) -> int:
    """Bytes :func:`other_tensors` will write, computed without copying anything."""
    skip = tuple(f"{n}." for n in compressed_modules(model))
    total, seen = 0, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if name.startswith(skip) or key in seen:
            continue
        seen.add(key)
        total += t.numel() * (FLOAT_BYTES[float_dtype] if t.is_floating_point() else t.element_size())
    return total


def model_nbytes(model: nn.Module, float_dtype: str) -> int:
    """Total tensor bytes of the saved checkpoint."""
    return sum(m.nbytes() for m in compressed_modules(model).values()) + other_nbytes(model, float_dtype)


def save_compressed(model: nn.Module, out_dir: str | Path, tokenizer=None, *, float_dtype: str = "fp16",
                    recipe: dict | None = None, report: dict | None = None, protocol: dict | None = None,
                    base_model: str = "", overwrite: bool = False) -> Path:
    layers = compressed_modules(model)
    tensors = other_tensors(model, float_dtype)
    for name, mod in layers.items():
        tensors.update(mod.state(name))
    meta = {"format_version": FORMAT_VERSION, "base_model": base_model, "float_dtype": float_dtype,
            "layers": {n: m.meta() for n, m in layers.items()}, "recipe": recipe, "report": report,
            "protocol": protocol}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lmcompose": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path` and rename it over `path`, so that a crash leaves
    either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def update_metadata(out_dir: str | Path, **fields) -> dict:
    """Set top-level `fields` of a saved checkpoint's lmcompose.json (atomically)."""
    path = Path(out_dir) / META_FILE
    meta = json.loads(path.read_text())
    meta.update(fields)
    write_text_atomically(path, json.dumps(meta, indent=2, default=str))
    return meta


REPORT_FILE = "report.json"


def record_result(run_dir: str | Path, key: str, value: dict) -> bool:
    """Store an evaluation of a saved run (``zeroshot``, ``fidelity``) under `key` of its report.json, where
    ``lmcompose report`` shows it beside perplexity. Returns False (and writes nothing) when `run_dir` is
    not a run directory of ``lmcompose compress``."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    report[key] = value
    write_text_atomically(path, json.dumps(report, indent=2, default=str))
    return True


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
    del state, rest
    release_freed_memory()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer, meta


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Rebuilding hundreds of layers allocates and frees many medium-sized temporaries, which glibc keeps in
    its heap: without this, loading SmolLM2-135M at 4 bits left the process at 2.1 GB RSS although only
    0.7 GB was live (measured; 0.73 GB after the trim)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def export_dense(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: str = "fp16",
                 overwrite: bool = False) -> Path:
    """Merge every CompressedLinear into a dense nn.Linear and write a standard HF checkpoint."""
    layers = compressed_modules(model)
    try:
        for name, mod in layers.items():
            dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias_value is not None,
                              device="meta")
            dense.weight = nn.Parameter(mod.to_dense(FLOAT_DTYPES[dtype]), requires_grad=False)
            if mod.bias_value is not None:
                dense.bias = nn.Parameter(mod.bias_value.to(FLOAT_DTYPES[dtype]), requires_grad=False)
            set_module(model, name, dense)
        with atomic_dir(out_dir, overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for name, mod in layers.items():
            set_module(model, name, mod)
    return Path(out_dir)
