"""Exports of a compressed model for other engines: a merged dense checkpoint (`dense`),
compressed-tensors (`compressed_tensors`, what vLLM and transformers load) and GGUF (`gguf`, llama.cpp).

Each compressed Linear is read as one *layer export* (`layer_exports`): the tensor the format stores for
it, the structure it carries and our exact bytes. What each format carries is the table `CARRIES`
(``lmcompose export --list`` prints it):

* quantized codes (any width, per group or per row), with a width and group size per Linear (mixed bits
  from sensitivity allocation): written bit-exactly, never re-quantized unless asked (GGUF
  ``allow_requant``);
* sparse results (N:M such as 2:4, or unstructured): the pruned entries are written as exact zeros (the
  zero-point code of a quantized tensor) and the pattern is recorded (compressed-tensors
  ``sparsity_config``), so the file takes the bytes of the dense grid, not ours (both are reported);
* a float Linear (one a recipe left unquantized): written as a float weight.

Structures no format but the dense merge carries are refused, naming the structure and the Linear: low
rank (U·V), a sum of terms (sparse + low rank, ...), a stored input diagonal (AWQ's input scale), an
online rotation of a Linear's input (rotate's online Hadamard) and an act-order permutation
(compressed-tensors). ``merge_dense=True`` (CLI ``--merge-dense``) writes such Linears as merged float
weights instead, and the export's summary lists them. No export carries a model-level online operation
(Q after a post-norm, a final norm conjugated under a tied head: `runtime.model_ops`): every format
refuses them by name, and such a model stays an lmcompose checkpoint.

Example::

    model, tok, _ = load_compressed("runs/smollm2-sparse24-gptq4")
    summary = export_compressed_tensors(model, "out/ct", tok)   # vLLM: LLM("out/ct")
    summary = export_gguf(model, "out/model.gguf", tok)          # llama.cpp / from_pretrained(gguf_file=...)
    summary.file_bytes, summary.our_bytes                        # what the format takes vs what we store

CLI: ``lmcompose export RUN_DIR --format dense|compressed-tensors|gguf --out PATH [--merge-dense]``,
``lmcompose export --list``.

Method notes: docs/methods/formats.md (the formats, their limits, and loading)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...algebra.ops import InputRotation, InputScale
from ...algebra.quant import QTensor
from ...algebra.terms import Dense, LowRank, Sparse
from ...pipeline.blocks import compressed_modules
from ...runtime.model_ops import model_ops

FORMATS = ("dense", "compressed-tensors", "gguf")

# What a result's Linears may hold, and how each format writes it: "exact" (the stored values, bit for
# bit), "as zeros" (a sparse pattern written as explicit zeros in a dense grid: exact values, not our
# bytes), "merged" (folded into a float weight), "requant" (only with allow_requant: re-quantized to the
# nearest type), "no" (refused, naming the Linear; --merge-dense writes it as a float weight).
STRUCTURES = {
    "quantized": "integer codes, per group or per row (RTN, GPTQ, AWQ's codes, ...)",
    "mixed bits": "a width and group size per Linear (sensitivity allocation)",
    "act-order": "codes grouped over a stored column permutation (GPTQ act_order without static_groups)",
    "sparse 2:4": "an N:M pattern (2:4, 4:8), float or quantized values",
    "sparse unstructured": "any mask (magnitude, Wanda, SparseGPT at a ratio), float or quantized values",
    "float": "a float weight (a Linear a recipe left unquantized)",
    "low rank": "U·V (SVD, ASVD, SVD-LLM), with an optional stored diagonal",
    "sum of terms": "two or more terms (sparse + low rank, dense + low-rank correction, ...)",
    "input scale": "a stored diagonal on a Linear's input (AWQ where nothing absorbs it)",
    "online rotation": "a Hadamard/orthogonal transform of a Linear's input (rotate online: true)",
    "model operation": "a rotation of the residual stream no weight absorbs (rotate after a post-norm)",
}
CARRIES = {
    "dense": {"quantized": "merged", "mixed bits": "merged", "act-order": "merged", "sparse 2:4": "merged",
              "sparse unstructured": "merged", "float": "exact", "low rank": "merged", "sum of terms": "merged",
              "input scale": "merged", "online rotation": "merged", "model operation": "no"},
    "compressed-tensors": {"quantized": "exact", "mixed bits": "exact", "act-order": "no",
                           "sparse 2:4": "as zeros", "sparse unstructured": "as zeros", "float": "exact",
                           "low rank": "no", "sum of terms": "no", "input scale": "no", "online rotation": "no",
                           "model operation": "no"},
    "gguf": {"quantized": "exact", "mixed bits": "exact", "act-order": "requant", "sparse 2:4": "as zeros",
             "sparse unstructured": "as zeros", "float": "exact", "low rank": "no", "sum of terms": "no",
             "input scale": "no", "online rotation": "no", "model operation": "no"},
}


def format_table() -> list[dict[str, str]]:
    """One row per structure: its description and what each format does with it (`CARRIES`)."""
    return [{"structure": s, "what": what, **{fmt: CARRIES[fmt][s] for fmt in FORMATS}}
            for s, what in STRUCTURES.items()]


def refuse_model_ops(model, fmt: str) -> None:
    """Refuse a model carrying model-level online operations, naming them: no export format holds them."""
    ops = model_ops(model)
    if ops:
        raise ValueError(f"the {fmt} export cannot carry the model's online operations ({'; '.join(o.describe() for o in ops)}): "
                         "a rotation of the residual stream that no weight could absorb (after a post-norm, or around "
                         "the final norm of a tied head); a plain checkpoint without them computes something else. "
                         "Keep the lmcompose checkpoint (load_compressed), or compress without rotate for this export")


@dataclass
class LayerExport:
    """One Linear as a format writes it. `weight`: a QTensor (pruned entries already at the zero-point
    code) or a float tensor; `sparsity`: "2:4"-style or "unstructured" when the Linear is sparse;
    `structure`: the `STRUCTURES` key it carries (``merged: ...`` when merge_dense folded it)."""

    weight: QTensor | torch.Tensor
    bias: torch.Tensor | None
    structure: str
    our_bytes: int
    sparsity: str | None = None
    merged: bool = False


@dataclass
class ExportSummary:
    """What an export wrote. ``layers``: per Linear, its structure, how the format stores it (``stored``),
    our bytes and the bytes its tensors take in the file; ``file_bytes``: the file(s) on disk."""

    path: Path
    format: str
    layers: dict[str, dict] = field(default_factory=dict)
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def our_bytes(self) -> int:
        return sum(r["our_bytes"] for r in self.layers.values())

    @property
    def layer_file_bytes(self) -> int:
        return sum(r["file_bytes"] for r in self.layers.values())

    def by_stored(self) -> dict[str, dict]:
        """Totals per storage type (``Q4_0``, ``int4 g32``, ``F16 merged``, ...): Linears, our bytes, file bytes."""
        out: dict[str, dict] = {}
        for r in self.layers.values():
            t = out.setdefault(r["stored"], {"linears": 0, "our_bytes": 0, "file_bytes": 0})
            t["linears"] += 1
            t["our_bytes"] += r["our_bytes"]
            t["file_bytes"] += r["file_bytes"]
        return out

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "file_bytes": self.file_bytes,
                "our_bytes": self.our_bytes, "layer_file_bytes": self.layer_file_bytes,
                "by_stored": self.by_stored(), "layers": self.layers, "notes": self.notes}


def path_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pattern(term: Sparse) -> str:
    return f"{term.n}:{term.m}" if term.n else "unstructured"


def zeroed(q: QTensor, mask: torch.Tensor) -> QTensor:
    """`q` with every entry outside `mask` set to its group's zero-point code, which dequantizes to 0."""
    if q.zero is None:
        fill = torch.full_like(q.codes, (q.spec.maxq + 1) // 2)
    else:
        fill = q.zero[:, q.group_index()]
    return q.with_codes(torch.where(mask.to(q.codes.device), q.codes, fill))


def describe_structure(mod) -> tuple[str, str] | None:
    """(the `STRUCTURES` key, what the Linear holds) for a Linear no format but the dense merge carries;
    None when its terms and operations are carried (quantized, sparse, float)."""
    for op in mod.input_ops:
        key = {InputRotation: "online rotation", InputScale: "input scale"}.get(type(op), "input operation")
        return key, f"applies {op.spec().describe()} before its weight ({mod.spec().describe()})"
    terms = mod.terms
    if len(terms) != 1:
        return "sum of terms", f"is {' + '.join(t.kind for t in terms)} ({mod.spec().describe()})"
    (term,) = terms
    if isinstance(term, LowRank):
        diag = ", with a stored diagonal" if term.d is not None else ""
        return "low rank", f"is U·V of rank {term.spec().rank}{diag} ({mod.spec().describe()})"
    if not isinstance(term, (Dense, Sparse)):
        return f"a {term.kind} term", f"is {mod.spec().describe()}"
    return None


def layer_exports(model, fmt: str, *, merge_dense: bool = False) -> dict[str, LayerExport]:
    """Every CompressedLinear as `fmt` writes it (see `LayerExport`). Refuses model-level online operations,
    and Linears whose structure no format but the dense merge carries (unless `merge_dense`), naming the
    structure and the Linear."""
    refuse_model_ops(model, fmt)
    out = {}
    for name, mod in compressed_modules(model).items():
        bias = None if mod.bias_value is None else mod.bias_value.detach().cpu()
        our = mod.nbytes()
        problem = describe_structure(mod)
        if problem is not None:
            key, detail = problem
            if not merge_dense:
                raise ValueError(f"the {fmt} export cannot carry {key}: {name} {detail}. Pass --merge-dense "
                                 "(merge_dense=True) to write such Linears as merged float weights (their bytes "
                                 "given back), or use --format dense")
            out[name] = LayerExport(mod.to_dense(torch.float32).cpu(), bias, f"merged {key}", our, merged=True)
            continue
        term = mod.terms[0].to("cpu")
        if isinstance(term, Dense):
            structure = "quantized" if isinstance(term.a, QTensor) else "float"
            out[name] = LayerExport(term.a, bias, structure, our)
        else:
            pattern = _pattern(term)
            weight = zeroed(term.values, term.mask) if isinstance(term.values, QTensor) else term.weight(term.values.dtype)
            kind = "quantized" if isinstance(term.values, QTensor) else "float"
            out[name] = LayerExport(weight, bias, f"sparse {pattern} {kind}", our, sparsity=pattern)
    return out
