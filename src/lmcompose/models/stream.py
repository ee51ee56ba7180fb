"""Compressing a model bigger than memory: read the base checkpoint block by block, write the result
shard by shard.

`open_streamed` builds the architecture on the meta device (no memory), reads from the base safetensors
(memory-mapped by safetensors, one file or a sharded ``model.safetensors.index.json`` checkpoint) only the
tensors outside the decoder blocks (embeddings, final norm, head), and returns a `StreamedBlocks` that the
sequential loop asks to ``load`` block i just before it visits it and to ``release`` it (back to the meta
device) once it is final. The finished blocks live in the run's work directory
(`pipeline.resume`), and `models.checkpoint.save_streamed` turns them into one shard per block plus one for
the other tensors, with the index file transformers writes for sharded checkpoints. Peak memory is the
calibration activations plus one block (in the weights dtype, and its compressed copy), whatever the
number of blocks; a streamed run resumes like any other (``--resume``).

Streaming is asked for (CLI ``--stream``); it reads local directories with safetensors weights and
``.gguf`` files (through their dequantized safetensors copy). Steps that need the whole model at once
(model-level transforms, dense pre-passes, ``recover``) and the ``step-major`` schedule are refused by
name (`api._check_streamable`). The tensors saved are bit-identical to an in-memory run's.

Example::

    model, tokenizer, blocks = open_streamed("/models/llama-2-7b", dtype="fp16")
    report = compress(model, recipe, windows, work_dir="runs/x.partial", block_io=blocks)
    save_streamed(model, "runs/x", tokenizer, work_dir="runs/x.partial", float_dtype=recipe.float_dtype)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.dtypes import FLOAT_DTYPES
from ..core.errors import CheckpointError
from ..core.memory import release_freed_memory
from ..pipeline.blocks import find_blocks
from ..runtime.linear import CompressedLinear
from .checkpoint import (
    assign_tensors,
    attach_checked_model_ops,
    build_empty_model,
    check_other_tensors,
    index_weight_map,
    open_metadata,
    safetensors_table,
    weights_files,
)
from .integrity import (
    META_FILE,
    WEIGHTS_FILE,
    check_layer_tensors,
    expected_tensors,
    verify_files,
    verify_recorded,
    verify_tensors,
)

log = logging.getLogger(__name__)


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """Which safetensors file of `directory` holds each tensor: from its ``model.safetensors.index.json``,
    else from every ``*.safetensors`` file's header."""
    directory = Path(directory)
    files = index_weight_map(directory)
    if files is not None:
        return files
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files.update({key: path for key in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    if not files:
        raise FileNotFoundError(f"directory {str(directory)!r} holds no .safetensors weights to stream")
    return files


class StreamedBlocks:
    """Loads one decoder block's weights from the base checkpoint at a time (see the module docstring)."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype):
        self.files, self.dtype = files, dtype

    def read_stored(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` (full names) in their stored dtypes, each file opened once."""
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise CheckpointError(f"lacks tensors {missing[:3]} of the model its config.json describes",
                                  file=str(next(iter(self.files.values())).parent))
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.update({key: f.get_tensor(key) for key in names})
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ... on a damaged file
                raise CheckpointError(f"cannot be read, it is truncated or damaged ({type(err).__name__}: {err})",
                                      file=str(path)) from None
        return out

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` (full names) in the weights dtype."""
        return {k: t.to(self.dtype) if t.is_floating_point() else t for k, t in self.read_stored(keys).items()}

    def load(self, index: int, block: nn.Module, prefix: str) -> None:
        names = [n for n, p in block.named_parameters() if p.device.type == "meta"]
        state = self.read([f"{prefix}.{n}" for n in names])
        block.load_state_dict({n: state[f"{prefix}.{n}"] for n in names}, strict=False, assign=True)

    def release(self, index: int, block: nn.Module) -> None:
        """Free the block's weights: every parameter and compressed Linear goes to the meta device."""
        for module in block.modules():
            if isinstance(module, CompressedLinear):
                # Its size depends on its values (a sparse mask's count): keep the spec the report counts.
                spec = module.spec()
                module.to("meta")
                module.spec = lambda spec=spec: spec
                continue
            for name, p in list(module._parameters.items()):
                if p is not None and p.device.type != "meta":
                    module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                            requires_grad=p.requires_grad)
        # glibc keeps freed medium-sized tensors in its heap: without the trim, RSS grew by ~35 MiB per block
        # of a 1024/2816-wide model (measured over 12 blocks), with it it stays flat
        release_freed_memory()


def open_streamed(name_or_path: str, dtype: str = "fp32", trust_remote_code: bool = False):
    """``(model, tokenizer or None, StreamedBlocks)``: the model with its decoder blocks on the meta device and
    everything else read from `name_or_path` (a local directory with safetensors weights, or a ``.gguf``
    file) in `dtype`.

    Raises:
        ValueError: a bad `dtype`; a hub id or a short name's package (download it first); an lmcompose run
            directory.
        FileNotFoundError / CheckpointError: missing or damaged files.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .load import _dequantized_dir, resolve_model

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    src = resolve_model(name_or_path)
    if src.kind == "hub":
        raise ValueError(f"--stream reads a local directory or a .gguf file, not the hub id {src.path!r}: download "
                         f"it first (hf download {src.path} --local-dir DIR) and pass --model DIR")
    where = Path(_dequantized_dir(src) if src.kind == "gguf" else src.path)
    if (where / META_FILE).is_file():
        raise ValueError(f"{str(where)!r} is an lmcompose run directory (it has {META_FILE}); --stream reads a "
                         "base Hugging Face checkpoint")
    files = tensor_files(where)
    torch_dtype = FLOAT_DTYPES[dtype]
    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed as from_pretrained does
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    prefix, _ = find_blocks(model)
    # Tied tensors (embedding and head) are one parameter with several names, and a checkpoint stores it under
    # any one of them (transformers keeps the first; a GGUF's dequantized copy keeps `lm_head.weight`):
    # read whichever name is stored and give it to every name of the group.
    model.tie_weights()  # on the meta model: tied names become one parameter
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if not n.startswith(f"{prefix}."):
            groups.setdefault(id(p), []).append(n)
    stored = {next(n for n in names if n in files): names for names in groups.values() if any(n in files for n in names)}
    blocks = StreamedBlocks(files, torch_dtype)
    state = blocks.read(list(stored))
    model.load_state_dict({n: state[key] for key, names in stored.items() for n in names}, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(f"{prefix}.")]
    if still:
        raise CheckpointError(f"lacks tensors {still[:3]}", file=str(where / WEIGHTS_FILE))
    has_tokenizer = (where / "tokenizer_config.json").is_file() or (where / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code) if has_tokenizer else None
    log.info("streaming %s (%s, %d tensor files): blocks are read one at a time", src.name, dtype,
             len(set(files.values())))
    return model.eval(), tokenizer, blocks


class CompressedBlocks(StreamedBlocks):
    """Loads one decoder block of an lmcompose run directory at a time (`open_streamed_run`): only that block's
    tensors are read (from its shard, or from the one ``model.safetensors``), checked against lmcompose.json
    as `checkpoint.load_compressed` checks them (with `verify`, also against the sha256 recorded when they were
    saved), and its compressed Linears rebuilt computing in `dtype`. ``release`` is `StreamedBlocks`'."""

    def __init__(self, path: Path, files: dict[str, Path], dtype: torch.dtype, meta: dict, verify: bool):
        super().__init__(files, dtype)
        self.path, self.meta, self.verify = path, meta, verify and "checksums" in meta

    def install(self, root: nn.Module, root_name: str, keep) -> None:
        """Read the stored tensors whose full names `keep` accepts, check them and assign them into `root`, the
        module named `root_name` ("" for the whole model)."""
        layers = {n: m for n, m in self.meta["layers"].items() if keep(f"{n}.")}
        state = self.read_stored([k for k in self.files if keep(k)])
        for name, layer_meta in layers.items():
            check_layer_tensors(str(self.path), name, layer_meta, state)
        skip = tuple(f"{n}." for n in layers)
        head = f"{root_name}." if root_name else ""
        places = {f"{head}{k}": t for k, t in root.state_dict().items()}
        check_other_tensors(self.path, places, {k: t for k, t in state.items() if not k.startswith(skip)})
        if self.verify:
            verify_tensors(str(self.path), self.meta, state)
        assign_tensors(self.path, root, root_name, layers, state, self.dtype)

    def load(self, index: int, block: nn.Module, prefix: str) -> None:
        self.install(block, prefix, lambda key: key.startswith(f"{prefix}."))
        still = [f"{prefix}.{n}" for n, p in block.named_parameters() if p.device.type == "meta"]
        if still:
            raise CheckpointError(f"lacks tensors for {still[:5]}", file=str(self.path / WEIGHTS_FILE))


def open_streamed_run(path: str | Path, dtype: str = "fp32", verify: bool = True):
    """``(model, tokenizer or None, CompressedBlocks)`` for an lmcompose run directory, sharded (as
    `checkpoint.save_streamed` writes it) or one ``model.safetensors``: the architecture of its config.json with
    the decoder blocks on the meta device, every other tensor read, checked and cast to `dtype`, and the
    model-level operations attached, as `checkpoint.load_compressed` does for the whole model. With `verify`,
    the metadata, the other files and the names of the stored tensors are checked against their checksums
    here, and each tensor's bytes when its block is read.

    Raises:
        CheckpointError / CheckpointFileMissing: a damaged, edited or inconsistent directory.
        ValueError: a bad `dtype`.
    """
    from transformers import AutoTokenizer

    path, meta, ops = open_metadata(path, dtype)
    meta_file = str(path / META_FILE)
    for name, layer_meta in meta["layers"].items():  # well formed before build_empty_model reads their shapes
        expected_tensors(meta_file, name, layer_meta)
    files = None if (path / WEIGHTS_FILE).is_file() else index_weight_map(path)  # load_compressed's preference
    if files is None:
        (weights,) = weights_files(path)
        files = dict.fromkeys(safetensors_table(weights), weights)  # its header: no weight is read
    if verify and "checksums" in meta:
        verify_recorded(str(path), meta, files.keys())
        verify_files(str(path), meta)
    elif verify:
        log.warning("%s has no checksums (saved by an older lmcompose): its tensors are not verified", meta_file)
    model = build_empty_model(path, meta)
    prefix, _ = find_blocks(model)
    compute = FLOAT_DTYPES[dtype]
    blocks = CompressedBlocks(path, files, compute, meta, verify)
    blocks.install(model, "", lambda key: not key.startswith(f"{prefix}."))
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(f"{prefix}.")]
    if still:
        raise CheckpointError(f"lacks tensors for {still[:5]}", file=str(path / WEIGHTS_FILE))
    model = model.to(dtype=compute).eval()  # buffers too, as load_compressed casts them
    attach_checked_model_ops(model, ops, meta_file)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    log.info("streaming run directory %s (%s, %d tensor files): blocks are read one at a time", path, dtype,
             len(set(files.values())))
    return model, tokenizer, blocks


def open_for_streaming(name_or_path: str, dtype: str = "fp32", trust_remote_code: bool = False,
                       verify: bool = True):
    """`open_streamed_run` for an lmcompose run directory, else `open_streamed`, as `load.load_any` tells them
    apart."""
    if (Path(name_or_path) / META_FILE).is_file():
        return open_streamed_run(name_or_path, dtype, verify)
    return open_streamed(name_or_path, dtype, trust_remote_code)
