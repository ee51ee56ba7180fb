"""Do two compression methods compose? The orthogonality analysis (METHODS §4.10, §6 fact 1).

For techniques A and B, each at its own budget, we run A alone, B alone, A→B, B→A (where the chain is
legal; an illegal order is reported with the reason `Recipe.check` gives) and, optionally, a joint
method J that does both at once, all from the same dense model and the same calibration windows, and
measure:

* **per Linear**, the relative reconstruction error ‖(W − Ŵ)X‖²/‖WX‖² of each variant, where X are the
  inputs the Linear saw when its last step ran (inputs of the already-compressed earlier blocks, as in
  every sequential method), and the additive threshold e_A + e_B;
* **for the model**, perplexity under a recorded protocol, and the orthogonality threshold of Harma et
  al. (2025): ``ppl_dense + (ppl_A − ppl_dense) + (ppl_B − ppl_dense)``, the perplexity the combination
  would have if the degradations simply added. A combination above its threshold is *non-orthogonal*:
  the methods hurt each other. The exact formula in the paper is not verified (METHODS §4.10 [I]); the
  layer-level reading (errors add) is the other reading, and both are reported.

Example::

    analysis = analyze("smollm2-135m", {"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 64}},
                       joint={"sparsegpt": {"sparsity": 0.5, "bits": 4, "group_size": 64}})
    write(analysis, "runs/analyze-wanda-gptq")
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import InvariantError
from ..recipe import Calibration, Recipe

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One chain of the analysis and what it measured (``legal=False``: refused, with `reason`)."""

    name: str
    steps: list[dict]
    legal: bool = True
    reason: str = ""
    ppl: float | None = None
    bits_per_weight: float | None = None
    total_bytes: int | None = None
    compress_seconds: float | None = None
    layer_errors: dict[str, float] = field(default_factory=dict)

    @property
    def mean_error(self) -> float | None:
        return sum(self.layer_errors.values()) / len(self.layer_errors) if self.layer_errors else None


@dataclass
class Analysis:
    model: str
    a: dict
    b: dict
    joint: dict | None
    calibration: dict
    protocol: dict
    dense_ppl: float
    variants: dict[str, Variant]
    wall_seconds: float = 0.0

    @property
    def threshold_ppl(self) -> float | None:
        """ppl_dense + ΔA + ΔB: the perplexity of an orthogonal (additive) combination."""
        a, b = self.variants["A"].ppl, self.variants["B"].ppl
        return None if a is None or b is None else a + b - self.dense_ppl

    def layer_threshold(self) -> dict[str, float]:
        ea, eb = self.variants["A"].layer_errors, self.variants["B"].layer_errors
        return {n: ea[n] + eb[n] for n in ea if n in eb}

    def combinations(self) -> list[dict]:
        """One row per combined variant: its gap to the model and layer thresholds."""
        thr, lthr = self.threshold_ppl, self.layer_threshold()
        rows = []
        for key in ("A→B", "B→A", "joint"):
            v = self.variants.get(key)
            if v is None:
                continue
            row = {"variant": key, "legal": v.legal, "reason": v.reason, "ppl": v.ppl,
                   "bits_per_weight": v.bits_per_weight, "threshold_ppl": thr}
            if v.legal and v.ppl is not None and thr is not None:
                row["ppl_over_threshold"] = v.ppl - thr
                row["orthogonal"] = v.ppl <= thr
                common = [n for n in v.layer_errors if n in lthr]
                above = [n for n in common if v.layer_errors[n] > lthr[n]]
                row["layers_above_additive"] = f"{len(above)}/{len(common)}"
                row["mean_error"] = v.mean_error
                row["mean_additive_error"] = sum(lthr[n] for n in common) / max(len(common), 1)
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold_ppl"] = self.threshold_ppl
        d["combinations"] = self.combinations()
        return d


def _name(step: dict) -> str:
    (tech, params), = step.items()
    return f"{tech}({', '.join(f'{k}={v}' for k, v in (params or {}).items())})"


def plan_variants(a: dict, b: dict, joint: dict | None, shapes, other_bytes: int,
                  calibration: dict | None = None) -> dict[str, Variant]:
    """The chains to run, each type-checked on the model's shapes before any weights are loaded."""
    chains = {"A": [a], "B": [b], "A→B": [a, b], "B→A": [b, a]}
    if joint is not None:
        chains["joint"] = [joint]
    variants = {}
    for key, steps in chains.items():
        recipe = Recipe.from_dict({"calibration": calibration or {}, "steps": steps})  # bad steps raise here
        try:
            planned = recipe.check(shapes, other_bytes)
        except ValueError as err:
            if key in ("A", "B", "joint"):
                raise ValueError(f"{key} = {_name(steps[0])} cannot run on this model: {err}") from None
            variants[key] = Variant(key, steps, legal=False, reason=str(err))
            continue
        variants[key] = Variant(key, steps, bits_per_weight=planned.bits_per_weight,
                                total_bytes=planned.total_bytes)
    return variants


def analyze(model_name: str, a: dict, b: dict, joint: dict | None = None, *, calibration: dict | None = None,
            protocol="quick", data_dir=None, dtype: str = "auto", device: str = "cpu",
            on_variant=None, trust_remote_code: bool = False, verify: bool = True) -> Analysis:
    """Run the orthogonality analysis of steps `a` and `b` (``{technique: {params}}``) on one model.

    The dense model is held in fp32; `dtype` is the compute dtype (``lmcompose.core.dtypes``) of the
    compression forwards and of every evaluation, the dense one included. `model_name` is anything
    ``load_model`` takes (not an lmcompose run directory); `trust_remote_code` and `verify` (the checksums
    of a .gguf model's cached dequantized copy) are passed to it."""
    from ..api import compress
    from ..core.dtypes import cast_for_eval
    from ..data import calibration_windows
    from ..eval.perplexity import get_protocol, perplexity
    from ..models.load import load_model, model_linear_shapes

    cal = Calibration(**(calibration or {}))
    if cal.none:
        raise ValueError("calibration.source: none is for compress; the analysis runs its variants on calibration "
                         "windows (give a source, e.g. c4)")
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    shapes, other = model_linear_shapes(model_name, trust_remote_code=trust_remote_code)
    variants = plan_variants(a, b, joint, shapes, other, cal.model_dump())  # fails before any loading
    t0 = time.perf_counter()
    dense, tokenizer = load_model(model_name, dtype="fp32", device=device, trust_remote_code=trust_remote_code,
                                  verify=verify)
    windows = calibration_windows(tokenizer, cal.source, cal.n, cal.seqlen, cal.seed, data_dir, cal.split)
    evaluated = copy.deepcopy(dense)
    cast_for_eval(evaluated, dtype)
    dense_result = perplexity(evaluated, tokenizer, protocol, data_dir=data_dir)
    dense_ppl, protocol_used = dense_result.ppl, dense_result.protocol
    del evaluated
    for v in variants.values():
        if on_variant:
            on_variant(v.name, v.steps)
        if not v.legal:
            log.info("%s is not a legal chain: %s", v.name, v.reason)
            continue
        model = copy.deepcopy(dense)
        recipe = Recipe.from_dict({"calibration": cal.model_dump(), "steps": v.steps})
        try:
            report = compress(model, recipe, windows, model_name=model_name, compute_dtype=dtype)
        except (InvariantError, ValueError) as err:  # one broken variant must not lose the others
            log.error("%s failed: %s", v.name, err)
            v.legal, v.reason = False, f"failed while running: {err}"
            continue
        cast_for_eval(model, dtype)
        v.ppl = perplexity(model, tokenizer, protocol, data_dir=data_dir).ppl
        v.compress_seconds = report.wall_seconds
        v.bits_per_weight, v.total_bytes = report.bits_per_weight, report.total_bytes
        v.layer_errors = {l.name: l.rel_error for l in report.layers if l.steps}
        log.info("%s: ppl %.3f at %.3f bits/weight", v.name, v.ppl, v.bits_per_weight)
        del model
    return Analysis(model_name, a, b, joint, {**cal.model_dump(), "windows": list(windows.shape)},
                    protocol_used, dense_ppl, variants, time.perf_counter() - t0)


# -- outputs ---------------------------------------------------------------------------------------


def _fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def to_markdown(an: Analysis) -> str:
    p = an.protocol
    lines = [f"# Orthogonality: A = `{_name(an.a)}`, B = `{_name(an.b)}` on {an.model}", "",
             f"Protocol: {p['dataset']}:{p['split']}, seqlen {p['seqlen']}, max windows {p.get('max_windows')}; "
             f"calibration {an.calibration['source']} {an.calibration['windows'][0]}×{an.calibration['windows'][1]}, "
             f"seed {an.calibration['seed']}. Dense perplexity {an.dense_ppl:.3f}. "
             f"Threshold = ppl_dense + ΔA + ΔB = {_fmt(an.threshold_ppl)}.", "",
             "| variant | steps | bits/weight | perplexity | mean layer rel. error | compress s |",
             "|---|---|---:|---:|---:|---:|"]
    for v in an.variants.values():
        steps = " → ".join(f"`{_name(s)}`" for s in v.steps)
        if not v.legal:
            lines.append(f"| {v.name} | {steps} | — | not run: {v.reason.splitlines()[0][:160]} | — | — |")
            continue
        lines.append(f"| {v.name} | {steps} | {_fmt(v.bits_per_weight)} | {_fmt(v.ppl)} | "
                     f"{_fmt(v.mean_error, '.3e')} | {_fmt(v.compress_seconds, '.0f')} |")
    lines += ["", "| combination | perplexity | threshold | over threshold | orthogonal? | layers above e_A + e_B |"
              " mean error / mean e_A + e_B |", "|---|---:|---:|---:|---|---:|---:|"]
    for r in an.combinations():
        if not r["legal"]:
            lines.append(f"| {r['variant']} | not run | | | | | |")
            continue
        ratio = (r["mean_error"] / r["mean_additive_error"]) if r.get("mean_additive_error") else None
        lines.append(f"| {r['variant']} | {_fmt(r['ppl'])} | {_fmt(r['threshold_ppl'])} | "
                     f"{_fmt(r.get('ppl_over_threshold'), '+.3f')} | {'yes' if r.get('orthogonal') else 'no'} | "
                     f"{r.get('layers_above_additive', '—')} | {_fmt(ratio)} |")
    return "\n".join(lines) + "\n"


def plot(an: Analysis, path: str | Path) -> None:
    """Per-layer errors (left) and perplexities against the threshold (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    names = list(an.variants["A"].layer_errors)
    x = range(len(names))
    for v in an.variants.values():
        if v.legal and v.layer_errors:
            left.plot(x, [v.layer_errors.get(n, float("nan")) for n in names], label=v.name, lw=1)
    lthr = an.layer_threshold()
    left.plot(x, [lthr.get(n, float("nan")) for n in names], "k--", lw=1, label="e_A + e_B")
    left.set_yscale("log")
    left.set_xlabel("Linear (model order)")
    left.set_ylabel("relative error ‖ΔW X‖² / ‖W X‖²")
    left.legend(fontsize=8)
    left.set_title("per-layer reconstruction error")
    legal = [v for v in an.variants.values() if v.legal and v.ppl is not None]
    right.bar([v.name for v in legal], [v.ppl for v in legal], color="tab:blue")
    right.axhline(an.dense_ppl, color="tab:green", lw=1, label=f"dense {an.dense_ppl:.2f}")
    if an.threshold_ppl is not None:
        right.axhline(an.threshold_ppl, color="k", ls="--", lw=1, label=f"threshold {an.threshold_ppl:.2f}")
    right.set_ylabel("perplexity")
    right.legend(fontsize=8)
    right.set_title("model perplexity")
    fig.suptitle(f"A = {_name(an.a)}   B = {_name(an.b)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(an: Analysis, out: str | Path) -> Path:
    """Write analysis.json, analysis.md and analysis.png into `out`, each file atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def atomic(name: str, write_to) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=Path(name).suffix, dir=out)
        os.close(fd)
        try:
            write_to(tmp)
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    atomic("analysis.json", lambda p: Path(p).write_text(json.dumps(an.to_dict(), indent=1)))
    atomic("analysis.md", lambda p: Path(p).write_text(to_markdown(an)))
    atomic("analysis.png", lambda p: plot(an, p))
    return out
