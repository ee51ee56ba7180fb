"""Exports of a compressed model for other engines: a merged dense checkpoint (`dense`),
compressed-tensors (`compressed_tensors`, what vLLM and transformers load) and GGUF (`gguf`, llama.cpp).

The compressed-tensors and GGUF exports need a *quantization-only* result: every CompressedLinear holds
one Dense term whose tensor is a :class:`QTensor` (RTN, GPTQ, ...). Anything else (sparse, low-rank, a
float dense term) is refused with the first offending layer and its structure; such results go out as a
merged dense checkpoint. Codes are written bit-exactly: nothing is re-quantized.

Online operations (a rotated model, ``techniques/transform/rotate.py``): neither format carries an operation
on a Linear's input (an R4 rotation or a stored scale), so such a layer is refused, naming it; the dense
export merges it into the weight (``to_dense``). No export carries a model-level online operation (Q
after a post-norm, a final norm conjugated under a tied head: `runtime.model_ops`): every format refuses
them by name, and such a model stays an lmcompose checkpoint.

Example::

    model, tok, _ = load_compressed("runs/smollm2-gptq4")
    export_compressed_tensors(model, "out/ct", tok)          # vLLM: LLM("out/ct")
    export_gguf(model, "out/model.gguf", tok)                 # llama.cpp / from_pretrained(gguf_file=...)

CLI: ``lmcompose export RUN_DIR --format dense|compressed-tensors|gguf --out PATH``.

Method notes: docs/methods/formats.md (the formats, their limits, and loading)
"""

from __future__ import annotations

from ...algebra.quant import QTensor
from ...algebra.terms import Dense
from ...pipeline.blocks import compressed_modules
from ...runtime.model_ops import model_ops

FORMATS = ("dense", "compressed-tensors", "gguf")


def refuse_model_ops(model, fmt: str) -> None:
    """Refuse a model carrying model-level online operations, naming them: no export format holds them."""
    ops = model_ops(model)
    if ops:
        raise ValueError(f"the {fmt} export cannot carry the model's online operations ({'; '.join(o.describe() for o in ops)}): "
                         "a rotation of the residual stream that no weight could absorb (after a post-norm, or around "
                         "the final norm of a tied head); a plain checkpoint without them computes something else. "
                         "Keep the lmcompose checkpoint (load_compressed), or compress without rotate for this export")


def quantized_weights(model, fmt: str) -> dict[str, QTensor]:
    """The QTensor of every CompressedLinear; refuse anything that is not quantization-only, and online
    operations (`refuse_model_ops`, and any operation on a Linear's input)."""
    refuse_model_ops(model, fmt)
    out = {}
    for name, mod in compressed_modules(model).items():
        if mod.input_ops:
            raise ValueError(f"the {fmt} export cannot carry an operation on a Linear's input; {name} applies "
                             f"{', '.join(op.spec().describe() for op in mod.input_ops)} before its weight "
                             f"({mod.spec().describe()}). Use --format dense, which merges it into the weight")
        terms = mod.terms
        if len(terms) != 1 or not isinstance(terms[0], Dense) or not isinstance(terms[0].a, QTensor):
            raise ValueError(f"the {fmt} export needs quantization-only layers (one dense term holding a quantized "
                             f"tensor); {name} is {mod.spec().describe()}. Use --format dense for other results")
        out[name] = terms[0].a.to("cpu")
    return out
