"""Trusting a run directory: checksums of what was saved, and agreement between lmcompose.json and the
tensors of model.safetensors.

Two kinds of damage are told apart, each an error naming the file, the layer and the field
(`CheckpointError`):

* **Inconsistency**, found on every load (cheap: shapes, dtypes and names only). Each compressed Linear's
  metadata determines exactly which tensors it stores, with which dtype and shape (`expected_tensors`:
  packed codes of ``bits`` bits, one scale per group, a zero point only when asymmetric, ...), and the
  file must hold exactly those. An edited ``bits``, ``symmetric``, ``shape``, ``kind`` or ``index`` no
  longer matches the tensors, and the message names the field that decided the tensor at fault.
* **Corruption**, found by the checksums that `checksums` records at save time (``verify=True``, the
  default): the sha256 of every tensor (its dtype, shape and bytes; not of the file, whose header
  safetensors writes in no fixed key order), and the sha256 of every layer's metadata and of the
  model-level operations, and of every other file but lmcompose.json (config.json, the tokenizer). A
  flipped byte in a scale or a code, an edit that happens to stay consistent (``group_size`` 64 -> 65 on
  576 columns keeps 9 groups), or an edited ``rope_theta`` in config.json fails with the tensor, layer or
  file it touched. Verifying costs one sha256 pass over the tensors (0.10-0.15 s for SmolLM2-135M at 4 bits;
  BENCHMARKS.md, "Verifying run directories and the model cache").

Method notes: docs/methods/formats.md (run directories, "Run directories are checked on load")

Example::

    meta["checksums"] = checksums(tensors, meta)          # at save time
    verify_checksums(path, meta, state)                   # at load time (raises CheckpointError)
    check_layer_tensors(path, name, meta["layers"][name], state)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algebra.ops import TRANSFORM_KINDS
from ..algebra.packing import nm_index_bits, packed_nbytes
from ..algebra.quant import QuantSpec
from ..core.dtypes import FLOAT_DTYPES
from ..core.errors import CheckpointError
from ..core.io import file_sha256, tensor_sha256

ALGORITHM = "sha256"
META_FILE = "lmcompose.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # a sharded checkpoint's files, hashed per tensor
_FLOATS = frozenset(FLOAT_DTYPES.values())
_INDEX_INTS = frozenset({torch.int16, torch.int32})


# -- checksums -----------------------------------------------------------------------------------------
def meta_sha256(value) -> str:
    """sha256 of a JSON value, key order ignored (the value as lmcompose.json holds it)."""
    canonical = json.dumps(json.loads(json.dumps(value, default=str)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def checksums(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``checksums`` entry of lmcompose.json for `tensors` (what model.safetensors will hold) and
    `meta` (its ``layers`` and ``model_ops``)."""
    return checksums_of({name: tensor_sha256(t) for name, t in tensors.items()}, meta)


def checksums_of(tensor_sums: dict[str, str], meta: dict) -> dict:
    """`checksums` from the tensors' sha256 already taken (a checkpoint written shard by shard)."""
    return {"algorithm": ALGORITHM,
            "tensors": dict(sorted(tensor_sums.items())),
            "layers": {name: meta_sha256(m) for name, m in meta["layers"].items()},
            "model_ops": meta_sha256(meta.get("model_ops", []))}


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file of a run directory but model.safetensors (hashed per tensor) and lmcompose.json
    (edited after saving): config.json and the tokenizer's files."""
    return {p.relative_to(directory).as_posix(): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in (WEIGHTS_FILE, META_FILE) and not SHARD_FILE.fullmatch(p.name)}


def _layer_of(key: str, layers) -> str | None:
    for name in layers:
        if key.startswith(name + "."):
            return name
    return None


def verify_checksums(path: str, meta: dict, state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless `state` (model.safetensors) and the metadata in `meta` are what was
    saved, per ``meta["checksums"]``. `path`: the run directory (for messages)."""
    verify_recorded(path, meta, state.keys())
    verify_tensors(path, meta, state)
    verify_files(path, meta)


def verify_recorded(path: str, meta: dict, keys) -> None:
    """The checks of `verify_checksums` that read no tensor: the checksum table's form, every layer's metadata
    and the model operations against their recorded sha256, and the names `keys` of the stored tensors against
    the names recorded (none missing, none added). A checkpoint read a block at a time (`models.stream`) runs
    this once, then `verify_tensors` on each part it reads."""
    meta_file, weights = f"{path}/{META_FILE}", f"{path}/{WEIGHTS_FILE}"
    sums = meta["checksums"]
    if not isinstance(sums, dict) or sums.get("algorithm") != ALGORITHM or not isinstance(sums.get("tensors"), dict) \
            or not isinstance(sums.get("layers"), dict):
        raise CheckpointError(f"is not a {ALGORITHM} checksum table (algorithm, tensors, layers)", file=meta_file,
                              field="checksums")
    layers = meta["layers"]
    for name in layers.keys() | sums["layers"].keys():
        if name not in sums["layers"]:
            raise CheckpointError("is listed in 'layers' but has no checksum: lmcompose.json was edited",
                                  file=meta_file, layer=name, field="layers")
        if name not in layers:
            raise CheckpointError("has a checksum but is missing from 'layers': lmcompose.json was edited",
                                  file=meta_file, layer=name, field="layers")
        if meta_sha256(layers[name]) != sums["layers"][name]:
            raise CheckpointError("the layer's metadata does not match the sha256 recorded when it was saved: "
                                  "lmcompose.json was edited", file=meta_file, layer=name, field="layers")
    if meta_sha256(meta.get("model_ops", [])) != sums.get("model_ops"):
        raise CheckpointError("does not match the sha256 recorded when it was saved: lmcompose.json was edited",
                              file=meta_file, field="model_ops")
    recorded, keys = sums["tensors"], set(keys)
    for key in sorted(recorded.keys() - keys):
        raise CheckpointError(f"tensor {key} was saved but is missing", file=weights, layer=_layer_of(key, layers))
    for key in sorted(keys - recorded.keys()):
        raise CheckpointError(f"holds tensor {key}, which was not saved with this lmcompose.json", file=weights,
                              layer=_layer_of(key, layers))


def verify_tensors(path: str, meta: dict, state: dict[str, torch.Tensor]) -> None:
    """The sha256 of every tensor of `state` (all of a checkpoint's tensors, or the part just read) against the
    one recorded when it was saved (`verify_recorded` checked the table's form and its names)."""
    recorded, layers = meta["checksums"]["tensors"], meta["layers"]
    for key in sorted(state):
        if tensor_sha256(state[key]) != recorded.get(key):
            raise CheckpointError(f"tensor {key} does not match the sha256 recorded when it was saved: the file is "
                                  "damaged", file=f"{path}/{WEIGHTS_FILE}", layer=_layer_of(key, layers))


def verify_files(path: str, meta: dict) -> None:
    """The sha256 of every other file saved with the checkpoint (config.json, the tokenizer's files)."""
    files = meta["checksums"].get("files", {})  # absent in checkpoints saved before files were hashed
    for name, digest in (files.items() if isinstance(files, dict) else []):
        p = Path(path) / name
        if not p.is_file():
            raise CheckpointError("was saved with the checkpoint but is missing", file=str(p))
        if file_sha256(p) != digest:
            raise CheckpointError("does not match the sha256 recorded when it was saved: it was edited or is damaged "
                                  "(verify=False / --no-verify loads it anyway)", file=str(p))


# -- what each layer's metadata says it stores -----------------------------------------------------------
@dataclass(frozen=True)
class Expected:
    """A tensor a layer's metadata says is stored: allowed dtypes, its shape, whether it may be absent, and
    the metadata fields that decide its existence (`field`), shape (`shape_field`) and dtype (`dtype_field`)."""

    dtypes: frozenset
    shape: tuple[int, ...]
    field: str
    shape_field: str
    dtype_field: str
    optional: bool = False


class _Layer:
    """Reads one layer's metadata, raising CheckpointError that names the layer and the field."""

    def __init__(self, file: str, name: str):
        self.file, self.name = file, name

    def error(self, field: str, what: str) -> CheckpointError:
        return CheckpointError(what, file=self.file, layer=self.name, field=field)

    def get(self, meta, key, field: str, kind=None):
        if not isinstance(meta, dict):
            raise self.error(field, f"is {type(meta).__name__}, not an object")
        if key not in meta:
            raise self.error(f"{field}.{key}" if field else key, "is missing")
        value = meta[key]
        where = f"{field}.{key}" if field else key
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise self.error(where, f"is {value!r}, not a non-negative integer")
        if kind is bool and not isinstance(value, bool):
            raise self.error(where, f"is {value!r}, not true/false")
        if kind in (list, dict) and not isinstance(value, kind):
            raise self.error(where, f"is {type(value).__name__}, not a{'n object' if kind is dict else ' list'}")
        return value

    def shape(self, slot: dict, field: str) -> tuple[int, int]:
        shape = self.get(slot, "shape", field, list)
        if len(shape) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise self.error(f"{field}.shape", f"is {shape!r}, not two positive integers")
        return shape[0], shape[1]

    def slot(self, prefix: str, slot, field: str, count: int | None = None) -> dict[str, Expected]:
        """Tensors of one stored slot (float, or quantized: codes, scale, zero, perm); `count` entries when
        only a sparse term's kept entries are stored."""
        rows, cols = self.shape(slot, field)
        if "quant" not in slot:
            dtype = self.get(slot, "dtype", field)
            if dtype not in FLOAT_DTYPES:
                raise self.error(f"{field}.dtype", f"is {dtype!r}; allowed: {sorted(FLOAT_DTYPES)}")
            shape = (rows, cols) if count is None else (count,)
            return {prefix: Expected(frozenset({FLOAT_DTYPES[dtype]}), shape, field, f"{field}.shape",
                                     f"{field}.dtype")}
        q = self.get(slot, "quant", field, dict)
        try:
            spec = QuantSpec(**q)
        except (TypeError, ValueError) as err:
            raise self.error(f"{field}.quant", str(err)) from None
        n = rows * cols if count is None else count
        qf, groups = f"{field}.quant", spec.n_groups(cols)
        out = {f"{prefix}.codes": Expected(frozenset({torch.uint8}), (packed_nbytes(n, spec.bits),), qf,
                                           f"{qf}.bits or {field}.shape", qf),
               f"{prefix}.scale": Expected(frozenset({FLOAT_DTYPES[spec.scale_dtype]}), (rows, groups), qf,
                                           f"{qf}.group_size or {field}.shape", f"{qf}.scale_dtype"),
               f"{prefix}.perm": Expected(_INDEX_INTS, (cols,), qf, f"{field}.shape", qf, optional=True)}
        if not spec.symmetric:
            out[f"{prefix}.zero"] = Expected(frozenset({torch.uint8}), (packed_nbytes(rows * groups, spec.bits),),
                                             f"{qf}.symmetric", f"{qf}.bits or {qf}.group_size", qf)
        return out

    def term(self, prefix: str, term, field: str, out_f: int, in_f: int) -> dict[str, Expected]:
        kind = self.get(term, "kind", field)
        if kind == "dense":
            if self.shape(self.get(term, "a", field, dict), f"{field}.a") != (out_f, in_f):
                raise self.error(f"{field}.a.shape", f"is {term['a']['shape']}; the layer is "
                                 f"[out_features, in_features] = [{out_f}, {in_f}]")
            return self.slot(f"{prefix}.a", term["a"], f"{field}.a")
        if kind == "sparse":
            values = self.get(term, "values", field, dict)
            if self.shape(values, f"{field}.values") != (out_f, in_f):
                raise self.error(f"{field}.values.shape", f"is {values['shape']}; the layer is [{out_f}, {in_f}]")
            nnz = self.get(term, "nnz", field, int)
            if nnz > out_f * in_f:
                raise self.error(f"{field}.nnz", f"is {nnz}, more than the {out_f * in_f} entries of the layer")
            out = self.slot(f"{prefix}.values", values, f"{field}.values", count=nnz)
            index = self.get(term, "index", field)
            u8 = frozenset({torch.uint8})
            if index == "nm":
                n, m = self.get(term, "n", field, int), self.get(term, "m", field, int)
                if not 0 < n < m or in_f % m:
                    raise self.error(f"{field}.n", f"n={n}, m={m} is not an N:M pattern of {in_f} columns")
                size = packed_nbytes(out_f * (in_f // m), nm_index_bits(n, m))
                out[f"{prefix}.index"] = Expected(u8, (size,), f"{field}.index", f"{field}.n or {field}.m",
                                                  f"{field}.index")
            elif index == "bitmask":
                out[f"{prefix}.index"] = Expected(u8, (packed_nbytes(out_f * in_f, 1),), f"{field}.index",
                                                  f"{field}.values.shape", f"{field}.index")
            elif index == "csr":
                out[f"{prefix}.col"] = Expected(_INDEX_INTS, (nnz,), f"{field}.index", f"{field}.nnz",
                                                f"{field}.index")
                out[f"{prefix}.rowptr"] = Expected(frozenset({torch.int32, torch.int64}), (out_f + 1,),
                                                   f"{field}.index", f"{field}.values.shape", f"{field}.index")
            else:
                raise self.error(f"{field}.index", f"is {index!r}; allowed: ['bitmask', 'csr', 'nm']")
            return out
        if kind == "lowrank":
            ru, cu = self.shape(self.get(term, "u", field, dict), f"{field}.u")
            rv, cv = self.shape(self.get(term, "v", field, dict), f"{field}.v")
            if ru != out_f or cv != in_f or cu != rv:
                raise self.error(f"{field}.u.shape", f"U {[ru, cu]} times V {[rv, cv]} is not the layer's "
                                 f"[{out_f}, {in_f}]")
            out = {**self.slot(f"{prefix}.u", term["u"], f"{field}.u"),
                   **self.slot(f"{prefix}.v", term["v"], f"{field}.v")}
            if self.get(term, "d", field, bool):
                out[f"{prefix}.d"] = Expected(_FLOATS, (cu,), f"{field}.d", f"{field}.u.shape", f"{field}.d")
            return out
        raise self.error(f"{field}.kind", f"is {kind!r}; allowed: ['dense', 'lowrank', 'sparse']")


def expected_tensors(file: str, name: str, meta) -> dict[str, Expected]:
    """Every tensor layer `name` stores according to its metadata `meta` (one entry of lmcompose.json's
    ``layers``); raises CheckpointError (naming `file`, the layer and the field) on malformed metadata."""
    r = _Layer(file, name)
    out_f, in_f = r.get(meta, "out_features", "", int), r.get(meta, "in_features", "", int)
    terms = r.get(meta, "terms", "", list)
    if not terms:
        raise r.error("terms", "is empty; a compressed Linear has at least one term")
    out: dict[str, Expected] = {}
    for i, term in enumerate(terms):
        out.update(r.term(f"{name}.terms.{i}", term, f"terms[{i}]", out_f, in_f))
    if r.get(meta, "bias", "", bool):
        out[f"{name}.bias"] = Expected(_FLOATS, (out_f,), "bias", "out_features", "bias")
    for i, op in enumerate(r.get(meta, "input_ops", "", list) if "input_ops" in meta else []):
        field = f"input_ops[{i}]"
        kind = r.get(op, "kind", field)
        n = r.get(op, "n", field, int)
        if n != in_f:
            raise r.error(f"{field}.n", f"is {n}; the layer has in_features={in_f}")
        if kind == "scale":
            dtype = r.get(op, "dtype", field)
            if dtype not in FLOAT_DTYPES:
                raise r.error(f"{field}.dtype", f"is {dtype!r}; allowed: {sorted(FLOAT_DTYPES)}")
            out[f"{name}.input_ops.{i}.scale"] = Expected(frozenset({FLOAT_DTYPES[dtype]}), (n,), f"{field}.kind",
                                                          f"{field}.n", f"{field}.dtype")
        elif kind == "rotate":
            if r.get(op, "transform", field) not in TRANSFORM_KINDS:
                raise r.error(f"{field}.transform", f"is {op['transform']!r}; allowed: {list(TRANSFORM_KINDS)}")
            r.get(op, "seed", field, int)
            if "block" in op and (r.get(op, "block", field, int) <= 0 or n % op["block"]):
                raise r.error(f"{field}.block", f"is {op['block']}; allowed: a size > 0 that divides n={n}")
        else:
            raise r.error(f"{field}.kind", f"is {kind!r}; allowed: ['rotate', 'scale']")
    return out


_SUFFIX_FIELD = {"zero": "quant.symmetric", "codes": "quant", "scale": "quant", "perm": "quant"}


def _field_of(rest: str) -> str:
    """The metadata field that would describe tensor `rest` of a layer (its name after the layer's), e.g.
    ``terms.0.a.zero`` -> ``terms[0].a.quant.symmetric``."""
    parts = rest.split(".")
    if parts[0] in ("terms", "input_ops") and len(parts) > 1 and parts[1].isdigit():
        head, parts = f"{parts[0]}[{parts[1]}]", parts[2:]
        if head.startswith("input_ops") or not parts:
            return head
        if parts[0] in ("index", "col", "rowptr"):
            return f"{head}.index"
        if len(parts) == 1:  # a float slot (a, values, u, v) or a diagonal d
            return f"{head}.{parts[0]}"
        return f"{head}.{parts[0]}.{_SUFFIX_FIELD.get(parts[-1], 'quant')}"
    return parts[0]


def check_layer_tensors(path: str, name: str, meta, state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless `state` holds exactly the tensors layer `name`'s metadata describes,
    with their dtypes and shapes. `path`: the run directory (for messages)."""
    meta_file, weights = f"{path}/{META_FILE}", f"{path}/{WEIGHTS_FILE}"
    expected = expected_tensors(meta_file, name, meta)
    for key, e in expected.items():
        t = state.get(key)
        if t is None:
            if e.optional:
                continue
            raise CheckpointError(f"says tensor {key} is stored, but {WEIGHTS_FILE} lacks it", file=meta_file,
                                  layer=name, field=e.field)
        if t.dtype not in e.dtypes:
            allowed = sorted(str(d).removeprefix("torch.") for d in e.dtypes)
            raise CheckpointError(f"tensor {key} is {str(t.dtype).removeprefix('torch.')}; lmcompose.json says "
                                  f"{' or '.join(allowed)}", file=weights, layer=name, field=e.dtype_field)
        if tuple(t.shape) != e.shape:
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)}; lmcompose.json implies {list(e.shape)}",
                                  file=weights, layer=name, field=e.shape_field)
    prefix = name + "."
    for key in sorted(k for k in state if k.startswith(prefix) and k not in expected):
        field = _field_of(key[len(prefix):])
        raise CheckpointError(f"holds tensor {key}, which lmcompose.json does not describe for this layer",
                              file=weights, layer=name, field=field)
