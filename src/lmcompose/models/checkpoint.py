"""Saving and loading compressed models: safetensors + JSON, no pickles anywhere.

A compressed checkpoint is a directory::

    model.safetensors   every stored tensor: packed codes, scales, zeros, sparse indices, factors,
                        and the model's other weights in the recipe's float dtype
    lmcompose.json      format version, per-layer structure, model-level online operations ("model_ops",
                        e.g. a rotation conjugating the final norm: 0 bytes, re-attached on load),
                        recipe, report, evaluation protocol, and the sha256 of every tensor and of the
                        metadata of every layer ("checksums", checked on load: models/integrity.py)
    config.json         the Hugging Face config, to rebuild the architecture
    tokenizer files

It is written into a temporary sibling directory and renamed into place, so an interrupted save never
leaves a directory that looks whole (and the next save to the same place removes what it left). Loading
checks that the files agree and are what was saved; a damaged or edited directory is a `CheckpointError`
naming the file, the layer and the field, never a model that computes something else.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.dtypes import FLOAT_DTYPES
from ..core.errors import CheckpointError, CheckpointFileMissing
from ..core.io import atomic_dir
from ..core.memory import release_freed_memory
from ..pipeline.blocks import compressed_modules, find_blocks, set_module
from ..pipeline.resume import read_block
from ..runtime.linear import CompressedLinear
from ..runtime.model_ops import ModelOp, attach_model_op, check_model_ops, model_ops
from .integrity import (
    META_FILE,
    WEIGHTS_FILE,
    check_layer_tensors,
    checksums,
    checksums_of,
    file_checksums,
    tensor_sha256,
    verify_checksums,
)

SHARD_INDEX = "model.safetensors.index.json"

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def other_tensors(model: nn.Module, float_dtype: str, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Everything but the compressed Linears (and the tensors under `skip_prefixes`), as saved: floats in
    `float_dtype`, tied tensors once."""
    skip = tuple(f"{n}." for n in compressed_modules(model)) + tuple(skip_prefixes)
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
    meta = _meta(base_model, float_dtype, {n: m.meta() for n, m in layers.items()}, model, recipe, report, protocol)
    meta["checksums"] = checksums(tensors, meta)
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "lmcompose": str(FORMAT_VERSION)})
        _finish(tmp, model, tokenizer, meta)
    return Path(out_dir)


def _meta(base_model, float_dtype, layers: dict, model, recipe, report, protocol) -> dict:
    """lmcompose.json of a run, before its checksums."""
    return {"format_version": FORMAT_VERSION, "base_model": base_model, "float_dtype": float_dtype,
            "layers": layers, "model_ops": [op.meta() for op in model_ops(model)], "recipe": recipe,
            "report": report, "protocol": protocol}


def _finish(tmp: Path, model, tokenizer, meta: dict) -> None:
    """Config, tokenizer, then lmcompose.json (last: it hashes every file written before it)."""
    model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    meta["checksums"]["files"] = file_checksums(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def _shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"  # as transformers names the files of a sharded checkpoint


def save_streamed(model: nn.Module, out_dir: str | Path, tokenizer=None, *, work_dir: str | Path,
                  float_dtype: str = "fp16", recipe: dict | None = None, report: dict | None = None,
                  protocol: dict | None = None, base_model: str = "", overwrite: bool = False) -> Path:
    """Save a model compressed block by block from disk (`models.stream`): the final blocks recorded in
    `work_dir` (`pipeline.resume`) become one shard each, the tensors outside the blocks one more, with a
    ``model.safetensors.index.json`` as transformers writes it. Same metadata, same checksums and the same
    tensors (bit for bit) as `save_compressed` of the same model compressed in memory; one block is read
    at a time."""
    prefix, blocks = find_blocks(model)
    total = len(blocks) + 1
    cast = FLOAT_DTYPES[float_dtype]
    layers, sums, weight_map, size = {}, {}, {}, 0

    def write(tensors: dict[str, torch.Tensor], name: str, tmp: Path) -> None:
        nonlocal size
        save_file(tensors, str(tmp / name), metadata={"format": "pt", "lmcompose": str(FORMAT_VERSION)})
        for key, t in tensors.items():
            sums[key], weight_map[key] = tensor_sha256(t), name
            size += t.numel() * t.element_size()

    with atomic_dir(out_dir, overwrite) as tmp:
        for i in range(len(blocks)):
            meta_i, state = read_block(work_dir, i)
            block_layers = {n: {k: v for k, v in m.items() if k != "compute_dtype"} for n, m in meta_i["layers"].items()}
            skip = tuple(f"{n}." for n in block_layers)
            write({k: (t.to(cast).contiguous() if t.is_floating_point() and not k.startswith(skip) else t)
                   for k, t in state.items()}, _shard_name(i + 1, total), tmp)
            layers.update(block_layers)
            del state
            release_freed_memory()  # one block in memory at a time, also for glibc
        write(other_tensors(model, float_dtype, (f"{prefix}.",)), _shard_name(total, total), tmp)
        meta = _meta(base_model, float_dtype, layers, model, recipe, report, protocol)
        meta["checksums"] = checksums_of(sums, meta)
        (tmp / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _finish(tmp, model, tokenizer, meta)
    return Path(out_dir)


def index_weight_map(directory: str | Path) -> dict[str, Path] | None:
    """Which shard of `directory` holds each tensor, from its ``model.safetensors.index.json`` (each shard
    checked to exist); None when there is no index. The one reader of the index: loading, streaming and
    reporting all use it."""
    directory = Path(directory)
    index = directory / SHARD_INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot be read ({type(err).__name__}: {err})", file=str(index)) from None
    files = {key: directory / name for key, name in weight_map.items()}
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise CheckpointFileMissing(f"is missing (listed in {SHARD_INDEX})", file=str(path))
    return files


def weights_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: `path` is a run directory (its ``model.safetensors``, else the
    shards its ``model.safetensors.index.json`` lists), an index file (its shards) or one safetensors file.

    Raises:
        CheckpointFileMissing: no weights there, or a shard the index lists is missing.
        CheckpointError: an unreadable index.
    """
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    if path.is_dir() or path.name == SHARD_INDEX:
        directory = path if path.is_dir() else path.parent
        files = index_weight_map(directory)
        if files is None:
            raise CheckpointFileMissing(f"is missing (and so is {SHARD_INDEX})", file=str(directory / WEIGHTS_FILE))
        return sorted(set(files.values()))
    if not path.is_file():
        raise CheckpointFileMissing("is missing", file=str(path))
    return [path]


def safetensors_table(path: str | Path) -> dict[str, int]:
    """Stored bytes of every tensor of a checkpoint (`path` as for :func:`weights_files`: a run directory,
    sharded or not, an index file or one safetensors file), from the files' headers alone (no weight is read)."""
    out = {}
    for file in weights_files(path):
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            out.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                        if k != "__metadata__"})
        except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"has no readable safetensors header ({type(err).__name__}: {err})",
                                  file=str(file)) from None
    return out


def file_tensor_bytes(path: str | Path, prefix: str | None = None) -> int:
    """Sum of tensor bytes stored in a checkpoint (optionally under one key prefix); `path` is a run directory
    (one ``model.safetensors`` or shards), an index file or one safetensors file."""
    return sum(n for k, n in safetensors_table(path).items() if prefix is None or k.startswith(prefix))


def read_metadata(path: str | Path) -> dict:
    """The lmcompose.json of run directory `path`, checked to be a checkpoint this lmcompose reads: a JSON
    object with a known ``format_version``, a ``layers`` object and a ``model_ops`` list.

    Raises:
        CheckpointFileMissing: `path` or its lmcompose.json is missing.
        CheckpointError: anything else (the message names the file and the field).
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointFileMissing("is not a directory", file=str(path))
    if not meta_path.is_file():
        raise CheckpointFileMissing(f"is missing: {str(path)!r} is not an lmcompose checkpoint", file=str(meta_path))
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"is not valid JSON ({err})", file=str(meta_path)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"holds a JSON {type(meta).__name__}, not an object", file=str(meta_path))
    for key, kind in (("format_version", None), ("layers", dict)):
        if key not in meta:
            raise CheckpointError("is missing", file=str(meta_path), field=key)
        if kind is not None and not isinstance(meta[key], kind):
            raise CheckpointError(f"is {type(meta[key]).__name__}, not an object", file=str(meta_path), field=key)
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"is {meta['format_version']!r}; this lmcompose reads {FORMAT_VERSION} (was it "
                              "written by a newer lmcompose?)", file=str(meta_path), field="format_version")
    if not isinstance(meta.get("model_ops", []), list):
        raise CheckpointError("is not a list", file=str(meta_path), field="model_ops")
    return meta


def _read_sharded(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded run directory (`save_streamed`), each where its index says."""
    files = index_weight_map(path)
    state = {}
    for shard in sorted(set(files.values())):
        try:
            tensors = load_file(str(shard))
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... on a damaged file
            raise CheckpointError(f"cannot be read, it is truncated or damaged ({type(err).__name__}: {err})",
                                  file=str(shard)) from None
        for key in tensors:
            if files.get(key) != shard:
                raise CheckpointError(f"holds tensor {key}, which {SHARD_INDEX} places in "
                                      f"{files[key].name if key in files else None!r}", file=str(shard))
        state.update(tensors)
    for key in sorted(files.keys() - state.keys()):
        raise CheckpointError(f"lists tensor {key}, which no shard holds", file=str(path / SHARD_INDEX))
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not (path / WEIGHTS_FILE).is_file() and (path / SHARD_INDEX).is_file():
        return _read_sharded(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointFileMissing("is missing", file=str(weights))
    try:
        return load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... on a damaged file
        raise CheckpointError(f"cannot be read, it is truncated or damaged ({type(err).__name__}: {err})",
                              file=str(weights)) from None


def build_empty_model(path: Path, meta: dict):
    """The architecture of config.json on the meta device, checked to hold every Linear lmcompose.json lists."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointFileMissing("is missing", file=str(config_path))
    try:
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds on a damaged config
        first = (str(err).strip().splitlines() or [""])[0]  # transformers appends paragraphs of advice
        raise CheckpointError(f"cannot build a model ({type(err).__name__}: {first})", file=str(config_path)) from None
    for name, layer in meta["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError("lmcompose.json lists this Linear, but the model that config.json describes has "
                                  "no such module (config.json edited, e.g. fewer layers?)", file=str(config_path),
                                  layer=name) from None
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"is a {type(module).__name__} in the model that config.json describes, not a "
                                  "Linear", file=str(config_path), layer=name)
        if (module.out_features, module.in_features) != (layer["out_features"], layer["in_features"]):
            raise CheckpointError(f"lmcompose.json says [out, in] = [{layer['out_features']}, {layer['in_features']}]; "
                                  f"config.json gives [{module.out_features}, {module.in_features}]",
                                  file=str(config_path), layer=name, field="out_features/in_features")
    return model


def check_other_tensors(path: Path, places: dict[str, torch.Tensor], others: dict[str, torch.Tensor]) -> None:
    """Every tensor outside the compressed Linears must have a place of its shape in the model (`places`: its
    state dict, or a part of it, by full name)."""
    weights = str(path / WEIGHTS_FILE)
    for key, t in others.items():
        if key not in places and ".terms." in key:
            raise CheckpointError(f"holds tensor {key} of a compressed Linear, but lmcompose.json does not list the "
                                  "layer", file=weights, layer=key.split(".terms.")[0], field="layers")
        if key not in places:
            raise CheckpointError(f"holds tensor {key}, which has no place in the model that config.json describes "
                                  "(config.json edited, or lmcompose.json lacks the layer?)", file=weights)
        if tuple(places[key].shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)}; the model that config.json describes "
                                  f"needs {list(places[key].shape)}", file=weights)


def open_metadata(path: str | Path, dtype: str) -> tuple[Path, dict, list[ModelOp]]:
    """``(path, lmcompose.json's content, its model operations)`` of run directory `path`, checked before any
    weight is read; `dtype` (the compute dtype asked for) must be one of `FLOAT_DTYPES`. Every loader of a run
    directory (`load_compressed`, `stream.open_streamed_run`) starts with it."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    path = Path(path)
    meta = read_metadata(path)
    return path, meta, read_model_ops(meta, str(path / META_FILE))


def read_model_ops(meta: dict, meta_file: str) -> list[ModelOp]:
    """The model-level online operations lmcompose.json lists, refused before any weight is read: a model
    without them computes something else."""
    try:
        return [ModelOp.from_meta(m) for m in meta.get("model_ops", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err),
                              file=meta_file, field="model_ops") from None


def attach_checked_model_ops(model: nn.Module, ops: list[ModelOp], meta_file: str) -> None:
    """Attach `ops` (from `read_model_ops`) to `model`, each checked to fit the module it names."""
    try:
        check_model_ops(model, ops)
    except ValueError as err:
        raise CheckpointError(str(err), file=meta_file, field="model_ops") from None
    for op in ops:
        attach_model_op(model, op)


def assign_tensors(path: Path, root: nn.Module, prefix: str, layers: dict, state: dict[str, torch.Tensor],
                   compute: torch.dtype) -> None:
    """Put checked tensors of run directory `path` into `root` (the module named `prefix`, "" for the whole
    model; `state` by full names): each compressed Linear of `layers` rebuilt from its tensors, every other
    tensor cast to `compute` and assigned in place of the meta tensor it replaces."""
    head = f"{prefix}." if prefix else ""
    for name, layer_meta in layers.items():
        try:
            linear = CompressedLinear.from_state(name, layer_meta, state, compute)
        except Exception as err:  # noqa: BLE001 - shapes agree, values do not decode (e.g. a bad index)
            raise CheckpointError(f"cannot be decoded ({type(err).__name__}: {err})", file=str(path / WEIGHTS_FILE),
                                  layer=name) from None
        set_module(root, name[len(head):], linear)
    skip = tuple(f"{n}." for n in layers)
    rest = {k[len(head):]: v.to(compute) if v.is_floating_point() else v for k, v in state.items()
            if not k.startswith(skip)}
    root.load_state_dict(rest, strict=False, assign=True)


def load_compressed(path: str | Path, dtype: str = "fp32", device: str = "cpu", verify: bool = True):
    """Rebuild a compressed model saved by :func:`save_compressed`. Returns (model, tokenizer, meta).

    Every load checks that lmcompose.json, model.safetensors and config.json agree (each layer stores
    exactly the tensors its metadata describes, every other tensor has a place in the model);
    `verify` also checks the checksums recorded at save time (``models/integrity.py``: one sha256 pass
    over the tensors, ~0.1 s for SmolLM2-135M). A checkpoint saved before checksums existed loads with
    a warning.

    Raises:
        CheckpointError: a damaged, edited or inconsistent directory (the message names the file, and the
            layer and field where there is one); `CheckpointFileMissing` for a missing file.
        ValueError: a bad `dtype`.
    """
    from transformers import AutoTokenizer

    path, meta, ops = open_metadata(path, dtype)
    meta_file = str(path / META_FILE)
    compute = FLOAT_DTYPES[dtype]
    state = _read_tensors(path)
    for name, layer_meta in meta["layers"].items():
        check_layer_tensors(str(path), name, layer_meta, state)
    model = build_empty_model(path, meta)
    skip = tuple(f"{n}." for n in meta["layers"])
    check_other_tensors(path, model.state_dict(), {k: t for k, t in state.items() if not k.startswith(skip)})
    if verify and "checksums" in meta:
        verify_checksums(str(path), meta, state)
    elif verify:
        log.warning("%s has no checksums (saved by an older lmcompose): its tensors are not verified", meta_file)
    assign_tensors(path, model, "", meta["layers"], state, compute)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"lacks tensors for {still_meta[:5]}", file=str(path / WEIGHTS_FILE))
    model = model.to(device=device, dtype=compute).eval()
    attach_checked_model_ops(model, ops, meta_file)
    del state
    release_freed_memory()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer, meta
