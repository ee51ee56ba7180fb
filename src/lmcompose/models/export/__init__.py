"""Exports of a compressed model for other engines: a merged dense checkpoint (`dense`),
compressed-tensors (`compressed_tensors`, what vLLM and transformers load) and GGUF (`gguf`, llama.cpp).

The compressed-tensors and GGUF exports need a *quantization-only* result: every CompressedLinear holds
one Dense term whose tensor is a :class:`QTensor` (RTN, GPTQ, ...). Anything else (sparse, low-rank, a
float dense term) is refused with the first offending layer and its structure; such results go out as a
merged dense checkpoint. Codes are written bit-exactly: nothing is re-quantized.

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

FORMATS = ("dense", "compressed-tensors", "gguf")


def quantized_weights(model, fmt: str) -> dict[str, QTensor]:
    """The QTensor of every CompressedLinear; refuse anything that is not quantization-only."""
    out = {}
    for name, mod in compressed_modules(model).items():
        terms = mod.terms
        if len(terms) != 1 or not isinstance(terms[0], Dense) or not isinstance(terms[0].a, QTensor):
            raise ValueError(f"the {fmt} export needs quantization-only layers (one dense term holding a quantized "
                             f"tensor); {name} is {mod.spec().describe()}. Use --format dense for other results")
        out[name] = terms[0].a.to("cpu")
    return out
