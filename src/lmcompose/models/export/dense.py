"""Dense export: every CompressedLinear merged into a plain ``nn.Linear``, written with
``save_pretrained`` so that any engine loads it (every byte the compression saved is given back).

A Linear's input operations (an online rotation, a stored scale) are merged too: ``to_dense`` returns the
effective weight. Model-level online operations (`runtime.model_ops`) have no place in a plain checkpoint
and are refused by name (`refuse_model_ops`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ...core.dtypes import FLOAT_DTYPES
from ...core.io import atomic_dir
from ...pipeline.blocks import compressed_modules, set_module
from . import refuse_model_ops


def export_dense(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: str = "fp16",
                 overwrite: bool = False) -> Path:
    """Merge every CompressedLinear (with its input operations) into a dense nn.Linear and write a standard
    HF checkpoint; a model with model-level online operations is refused."""
    refuse_model_ops(model, "dense")
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
