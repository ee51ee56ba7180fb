"""Run directories as data: what a report needs from each, the exact byte breakdown, the Pareto set.

The byte breakdown reads the tensor table of the saved ``model.safetensors``, or of every shard that
``model.safetensors.index.json`` lists for a run saved in shards (``compress --stream``): the JSON header
of each file, with name, dtype, shape and byte offsets of every tensor; no weight is read. It sorts every
stored tensor into a category using the per-layer term kinds of ``lmcompose.json``. Counting the files themselves makes the
breakdown exact by construction; :attr:`Run.bytes_match` compares its sum with the ``total_bytes`` the
algebra computed (``LinearSpec.nbytes`` plus the other tensors), and the report shows any mismatch.

Perplexities are only comparable under one evaluation protocol. :func:`protocol_key` is the protocol
without ``batch_size`` (windows all have the same length, so batching does not change the number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..models.checkpoint import META_FILE, SHARD_INDEX, WEIGHTS_FILE, safetensors_table
from ..models.rundir import DENSE_KEY, REPORT_FILE
from ..recipe import NO_CALIBRATION

CATEGORIES = ("dense", "sparse values", "sparse index", "low-rank factors", "scales/zeros/perm", "other tensors")
_SLOTS = {"dense": {"a"}, "sparse": {"values", "index", "col", "rowptr"}, "lowrank": {"u", "v", "d"}}
_QUANT_PARTS = {"codes", "scale", "zero", "perm"}
# Fields shown in a step's short label even when they equal the technique's default.
_KNOBS = {"bits": "w{}", "group_size": "g{}", "sparsity": "{:.0%}", "pattern": "{}", "rank": "rank {}",
          "ratio": "ratio {}", "rank_fraction": "rank {:.0%}"}
_HIDDEN = {"include", "exclude"} | set(_KNOBS)


def _category(key: str, layers: dict) -> str:
    """The category of one stored tensor (`layers` is the ``layers`` table of lmcompose.json)."""
    if ".terms." not in key:
        return "other tensors"  # embeddings, norms, uncompressed Linears and the biases of compressed ones
    layer, rest = key.rsplit(".terms.", 1)
    parts = rest.split(".")
    if layer not in layers or len(parts) not in (2, 3) or not parts[0].isdigit():
        raise ValueError(f"tensor {key!r} looks like a term of a compressed Linear, but {META_FILE} has no such "
                         f"layer/term (expected <layer>.terms.<i>.<slot>[.codes|.scale|.zero|.perm])")
    kind = layers[layer]["terms"][int(parts[0])]["kind"]
    slot, part = parts[1], parts[2] if len(parts) == 3 else None
    if slot not in _SLOTS.get(kind, ()) or (part is not None and part not in _QUANT_PARTS):
        raise ValueError(f"tensor {key!r}: slot {slot!r} (part {part!r}) is not one of a {kind!r} term's slots "
                         f"{sorted(_SLOTS.get(kind, ()))} with parts {sorted(_QUANT_PARTS)}")
    if part in ("scale", "zero", "perm"):
        return "scales/zeros/perm"
    if kind == "sparse":
        return "sparse values" if slot == "values" else "sparse index"
    return "dense" if kind == "dense" else "low-rank factors"


def byte_breakdown(weights_path: str | Path, meta: dict) -> dict[str, int]:
    """Bytes of a saved checkpoint by category (keys: :data:`CATEGORIES`); sums to its files' tensor bytes.
    `weights_path`: the run directory (one file or shards), its index file or its ``model.safetensors``."""
    out = dict.fromkeys(CATEGORIES, 0)
    for key, nbytes in safetensors_table(weights_path).items():
        out[_category(key, meta["layers"])] += nbytes
    return out


def n_runs(n: int) -> str:
    """``1 run``, ``2 runs``: how headers and captions count runs."""
    return f"{n} run{'' if n == 1 else 's'}"


def protocol_key(protocol: dict | None) -> str:
    """Two perplexities are comparable iff their protocol keys are equal."""
    return json.dumps({k: v for k, v in (protocol or {}).items() if k != "batch_size"}, sort_keys=True)


def uncalibrated(cal: dict | None) -> bool:
    """Whether a report's calibration says the run had none (its per-Linear errors are on the weights)."""
    return (cal or {}).get("source") == NO_CALIBRATION


def calibration_label(cal: dict | None, long: bool = False) -> str:
    """The calibration of a run's report: ``c4 128×512, seed 0`` (`long`: ``c4 (validation), 128 windows of
    512 tokens, seed 0``), or ``none`` for a run without calibration, whose errors are on the weights."""
    c = cal or {}
    if uncalibrated(c):
        return "none (no calibration pass; per-Linear errors measured on the weights)" if long else "none"
    if long:
        return (f"{c.get('source', '?')} ({c.get('split', '?')}), {c.get('n', '?')} windows of {c.get('seqlen', '?')} "
                f"tokens, seed {c.get('seed', '?')}")
    return f"{c.get('source', '?')} {c.get('n', '?')}×{c.get('seqlen', '?')}, seed {c.get('seed', '?')}"


def protocol_label(protocol: dict | None) -> str:
    """Short human form, e.g. ``quick: wikitext2/test, seqlen 512, ≤64 windows``."""
    if not protocol:
        return "not evaluated"
    p = protocol
    parts = [f"{p.get('dataset', '?')}/{p.get('split', '?')}", f"seqlen {p.get('seqlen', '?')}"]
    if p.get("max_windows"):
        parts.append(f"≤{p['max_windows']} windows")
    if p.get("max_tokens"):
        parts.append(f"≤{p['max_tokens']} tokens")
    return f"{p.get('name', 'custom')}: " + ", ".join(parts)


def _fmt_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def step_label(step: dict) -> str:
    """``{"gptq": {"bits": 4, "group_size": 64, ...}}`` -> ``gptq w4 g64`` (+ fields that differ from defaults)."""
    from ..techniques.registry import registry

    (name, params), = step.items()
    params = params or {}
    words = [name] + [fmt.format(params[k]) for k, fmt in _KNOBS.items() if params.get(k) is not None]
    tech = registry().get(name)
    if tech is not None:
        for k, f in tech.model_fields.items():
            if k in params and k not in _HIDDEN and params[k] != f.default and _fmt_value(params[k]) != _fmt_value(
                    f.default):
                words.append(f"{k}={_fmt_value(params[k])}")
    for k in ("include", "exclude"):
        if params.get(k) and tuple(params[k]) not in {("*",), ()}:
            words.append(f"{k}={_fmt_value(params[k])}")
    return " ".join(words)


def recipe_label(recipe: dict | None) -> str:
    """A short description of a recipe: its steps' labels joined by arrows."""
    steps = (recipe or {}).get("steps") or []
    return " → ".join(step_label(s) for s in steps) or "no steps"


@dataclass
class Run:
    """One run directory: its report.json, its lmcompose.json and the byte breakdown of its file."""

    path: Path
    name: str
    report: dict
    meta: dict
    bytes_by_category: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return recipe_label(self.report.get("recipe"))

    @property
    def evaluation(self) -> dict:
        return self.report.get("evaluation") or {}

    @property
    def ppl(self) -> float | None:
        return self.evaluation.get("ppl")

    @property
    def protocol(self) -> dict | None:
        return self.evaluation.get("protocol")

    @property
    def zeroshot(self) -> dict | None:
        """``lmcompose zeroshot --model RUN_DIR`` results (lm-evaluation-harness), if recorded."""
        return self.report.get("zeroshot")

    @property
    def fidelity(self) -> dict | None:
        """``lmcompose fidelity --compressed RUN_DIR`` results (KL and top-1 agreement), if recorded."""
        return self.report.get("fidelity")

    @property
    def dense(self) -> dict:
        """What was measured on the run's dense base model (``model``, ``perplexity``, ``zeroshot``): recorded by
        ``lmcompose compress`` when it evaluates, or by ``lmcompose eval|zeroshot --model BASE --dense-for RUN``."""
        return self.report.get(DENSE_KEY) or {}

    @property
    def base_model(self) -> str:
        return self.dense.get("model") or self.meta.get("base_model") or self.report.get("model") or "?"

    @property
    def dense_total_bytes(self) -> int:
        """Bytes of the same model with its compressed Linears dense in fp16 (the other tensors as stored)."""
        r = self.report
        return r["total_bytes"] - r["linear_bytes"] + r.get("linear_dense_fp16_bytes", 0)

    @property
    def total_bytes(self) -> int:
        return self.report["total_bytes"]

    @property
    def file_bytes(self) -> int:
        return sum(self.bytes_by_category.values())

    @property
    def bytes_match(self) -> bool:
        return self.file_bytes == self.total_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the compressed Linears (all their storage: codes, scales, index, ...)."""
        r = self.report
        return 8 * r["linear_bytes"] / r["linear_weights"] if r.get("linear_weights") else float("nan")

    @property
    def layer_errors(self) -> dict[str, float]:
        """Final relative output error of every compressed Linear, by module name."""
        return {l["name"]: l["rel_error"] for l in self.report.get("layers", []) if l.get("rel_error") is not None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read one run directory written by ``lmcompose compress --out DIR``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist or is not a directory")
    missing = [f for f in (REPORT_FILE, META_FILE) if not (path / f).is_file()]
    if not any((path / f).is_file() for f in (WEIGHTS_FILE, SHARD_INDEX)):
        missing.append(f"{WEIGHTS_FILE} (or {SHARD_INDEX} with its shards)")
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not an lmcompose run directory: {', '.join(missing)} missing "
                                "(a run directory is what `lmcompose compress --out DIR` writes)")
    report, meta = _read_json(path / REPORT_FILE), _read_json(path / META_FILE)
    for key in ("total_bytes", "linear_bytes", "layers"):
        if key not in report:
            raise ValueError(f"{str(path / REPORT_FILE)!r} lacks {key!r}; is it a report.json of `lmcompose compress`?")
    return Run(path, name or path.name, report, meta, byte_breakdown(path, meta))


def load_runs(paths) -> list[Run]:
    """Read several run directories; names are the directory names, made unique with their parents."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no run directories given; pass at least one RUN_DIR")
    names = [p.resolve().name for p in paths]
    names = [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [load_run(p, n) for p, n in zip(paths, names)]
