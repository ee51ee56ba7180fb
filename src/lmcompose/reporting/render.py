"""Markdown and self-contained HTML from loaded runs, written atomically; the `lmcompose report` command.

Both formats are built from the same blocks (:func:`sections`) and the same PNG bytes: markdown links
``figures/*.png`` beside it, the HTML embeds them as ``data:image/png;base64`` and carries its CSS
inline, so the one file can be mailed or archived and opened offline.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

from ..core.io import atomic_dir
from .figures import (
    byte_unit,
    bytes_figure,
    heatmap_figure,
    pareto_figure,
    png,
    protocol_groups,
)
from .runs import CATEGORIES, Run, calibration_label, n_runs, protocol_key, protocol_label

MIB = 2**20
NUMERIC = re.compile(r"—|[-+]?[\d.,]+(e[-+]?\d+)?( \([\d.,]+ [KMG]?i?B\))?")  # right-aligned table cells
CAPTIONS = {
    "pareto": "Perplexity against total stored bytes and against bits/weight of the compressed Linears. "
              "Red: the Pareto front (no other run is both smaller and better).",
    "errors": "Relative output error ‖ΔW X‖² / ‖W X‖² of every compressed Linear after its last step "
              "(log colour scale, shared by all panels; grey: not compressed or lossless).",
    "bytes": "Stored bytes by term type, counted from each checkpoint's tensor table; every bar sums to the "
             "run's total bytes.",
}


def _num(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def caveats(runs: list[Run]) -> list[str]:
    """Sentences the reader must see before comparing numbers."""
    out = []
    groups = protocol_groups(runs)
    if len(groups) > 1:
        labels = "; ".join(f"{protocol_label(g[0].protocol)} ({n_runs(len(g))})" for g in groups)
        out.append(f"Caveat: the runs were evaluated under {len(groups)} different protocols ({labels}). "
                   "Perplexities under different protocols are not comparable, so the Pareto figure has one "
                   "row of panels per protocol.")
    unevaluated = [r.name for r in runs if r.ppl is None]
    if unevaluated:
        out.append(f"Not evaluated (no perplexity, left out of the Pareto figure): {', '.join(unevaluated)}.")
    for r in runs:
        if not r.bytes_match:
            out.append(f"Warning: {r.name}: the file stores {r.file_bytes:,} tensor bytes but report.json says "
                       f"total_bytes={r.total_bytes:,}.")
    return out


def _summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        rep = r.report
        ppl = f"{r.ppl:.3f} ({protocol_label(r.protocol)})" if r.ppl is not None else "— (not evaluated)"
        errs = list(r.layer_errors.values())
        unit, size = byte_unit(r.total_bytes)
        rows.append([r.name, r.label, _num(r.bits_per_weight, ".3f"),
                     f"{r.total_bytes:,} ({r.total_bytes / size:,.1f} {unit})", ppl,
                     _num(sum(errs) / len(errs) if errs else None, ".2e"), _num(rep.get("wall_seconds"), ".1f"),
                     _num(rep["peak_rss_bytes"] / MIB if rep.get("peak_rss_bytes") else None, ",.0f")])
    return rows


def _provenance_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        env = r.report.get("environment") or {}
        device = f"cuda ({env['cuda']})" if env.get("cuda") else "cpu"
        rows.append([r.name, r.report.get("model", ""), r.report.get("recipe_hash", ""),
                     calibration_label(r.report.get("calibration")),
                     f"torch {env.get('torch', '?')}, {device}, {env.get('threads', '?')} threads", str(r.path)])
    return rows


def _accuracy_cell(m: dict) -> str:
    """``0.617 ± 0.028 (norm 0.583)`` from one task's metrics."""
    cell = f"{m['acc']:.3f}" + (f" ± {m['acc_stderr']:.3f}" if m.get("acc_stderr") is not None else "")
    return cell + (f" (norm {m['acc_norm']:.3f})" if "acc_norm" in m else "")


def _zeroshot_table(runs: list[Run]) -> tuple | None:
    """Accuracy per task (acc_norm beside acc where the task has it) and the mean over a run's tasks."""
    done = [r for r in runs if r.zeroshot]
    if not done:
        return None
    tasks = list(dict.fromkeys(t for r in done for t in r.zeroshot["tasks"]))
    rows = []
    for r in done:
        got = r.zeroshot["tasks"]
        cells = [_accuracy_cell(got[t]) if t in got else "—" for t in tasks]
        accs = [got[t]["acc"] for t in tasks if t in got]
        limit = r.zeroshot.get("limit")
        rows.append([r.name, *cells, f"{sum(accs) / len(accs):.3f}",
                     f"{limit} per task" if limit else "all", r.zeroshot.get("lm_eval_version", "?")])
    return ("table", ["run", *tasks, "mean acc", "examples", "lm-eval"], rows)


def _fidelity_rows(runs: list[Run]) -> list[list[str]]:
    return [[r.name, str(r.fidelity.get("dense", "?")), f"{r.fidelity['kl_mean']:.4f}",
             f"{r.fidelity['top1_agreement']:.4f}", f"{r.fidelity.get('n_tokens', 0):,}",
             protocol_label(r.fidelity.get("protocol"))] for r in runs if r.fidelity]


def _change(run_value: float, dense_value: float) -> str:
    return f"{100 * (run_value / dense_value - 1):+.1f}%" if dense_value else "—"


def _mean_acc(zeroshot: dict | None, tasks) -> float | None:
    accs = [zeroshot["tasks"][t]["acc"] for t in tasks] if zeroshot else []
    return sum(accs) / len(accs) if accs else None


def dense_rows(run: Run) -> list[list[str]]:
    """``measure | this run | dense base model | change`` for one run: what every number of the run is to be
    read against. A dense number never measured says which command measures it (and records it in the run)."""
    dense, base = run.dense, run.base_model
    flag = f" --protocol {run.protocol['name']}" if run.protocol and run.protocol.get("name") not in (None, "quick") \
        else ""
    rows = [["bits/weight of the compressed Linears", _num(run.bits_per_weight, ".3f"), "16.000 (fp16)", ""],
            ["total bytes", f"{run.total_bytes:,}", f"{run.dense_total_bytes:,} (Linears in fp16)",
             _change(run.total_bytes, run.dense_total_bytes)]]
    dppl = (dense.get("perplexity") or {})
    if run.ppl is None:
        rows.append(["perplexity", f"not evaluated — run `lmcompose eval --model {run.path}`", "", ""])
    elif not dppl:
        rows.append([f"perplexity ({protocol_label(run.protocol)})", f"{run.ppl:.3f}",
                     f"not measured — run `lmcompose eval --model {base}{flag} --dense-for {run.path}`", ""])
    elif protocol_key(dppl.get("protocol")) != protocol_key(run.protocol):
        rows.append([f"perplexity ({protocol_label(run.protocol)})", f"{run.ppl:.3f}",
                     f"{dppl['ppl']:.3f} under another protocol ({protocol_label(dppl.get('protocol'))}): not "
                     "comparable", "—"])
    else:
        rows.append([f"perplexity ({protocol_label(run.protocol)})", f"{run.ppl:.3f}", f"{dppl['ppl']:.3f}",
                     _change(run.ppl, dppl["ppl"])])
    dz, z = dense.get("zeroshot"), run.zeroshot
    common = sorted(set(z["tasks"]) & set(dz["tasks"])) if z and dz else []
    if common:
        a, b = _mean_acc(z, common), _mean_acc(dz, common)
        rows.append([f"zero-shot mean accuracy ({', '.join(common)})", f"{a:.3f}", f"{b:.3f}",
                     f"{100 * (a - b):+.1f} points"])
    else:
        run_cell = (f"{_mean_acc(z, list(z['tasks'])):.3f} ({', '.join(z['tasks'])})" if z
                    else f"not measured — run `lmcompose zeroshot --model {run.path}`")
        dense_cell = ("measured on other tasks" if dz else
                      f"not measured — run `lmcompose zeroshot --model {base} --dense-for {run.path}`")
        rows.append(["zero-shot mean accuracy", run_cell, dense_cell, ""])
    if run.fidelity:
        rows += [["KL(dense ‖ run), nats per token", f"{run.fidelity['kl_mean']:.4f}", "0 (the reference)", ""],
                 ["top-1 agreement with dense", f"{run.fidelity['top1_agreement']:.4f}", "1 (the reference)", ""]]
    else:
        rows.append(["fidelity to dense (KL, top-1 agreement)",
                     f"not measured — run `lmcompose fidelity --compressed {run.path}`", "the reference", ""])
    return rows


def protocols_note(runs: list[Run]) -> str:
    seen = {protocol_key(r.protocol): r.protocol for r in runs if r.protocol}
    return "Evaluation protocols, in full: " + "; ".join(json.dumps(p) for p in seen.values())


def sections(runs: list[Run], pngs: dict[str, bytes]) -> list[tuple]:
    """The report body as blocks, rendered by both formats: ("h2", text), ("table", header, rows),
    ("note", text), ("figure", name). Figures come right after the table they illustrate."""
    unit, size = byte_unit(max(r.file_bytes for r in runs))
    breakdown = [[r.name] + [f"{r.bytes_by_category[c] / size:,.2f}" for c in CATEGORIES]
                 + [f"{r.file_bytes:,}", "yes" if r.bytes_match else f"NO (report: {r.total_bytes:,})"]
                 for r in runs]
    blocks = []
    for r in runs if len(runs) == 1 else []:  # one run: its dense reference first, so every number has a baseline
        blocks += [("h2", f"{r.name} beside the dense model ({r.base_model})"),
                   ("table", ["measure", r.name, f"dense: {r.base_model}", "change"], dense_rows(r))]
    if len(runs) > 1:
        blocks += [("h2", "Dense references"),
                   ("table", ["run", "dense model", "perplexity", "dense perplexity", "change"],
                    [[r.name, r.base_model, *dense_rows(r)[2][1:]] for r in runs])]
    blocks += [("h2", "Runs"),
              ("table", ["run", "recipe", "bits/weight", "total bytes", "perplexity (protocol)",
                         "mean layer rel. error", "compress s", "peak RSS MiB"], _summary_rows(runs)),
              ("note", protocols_note(runs))]
    zeroshot = _zeroshot_table(runs)
    if zeroshot:
        blocks += [("h2", "Zero-shot accuracy (lm-evaluation-harness)"), zeroshot]
    fidelity = _fidelity_rows(runs)
    if fidelity:
        blocks += [("h2", "Fidelity to the dense model"),
                   ("table", ["run", "dense model", "KL(dense ‖ compressed), nats", "top-1 agreement", "positions",
                              "text"], fidelity)]
    if "pareto" in pngs:
        blocks += [("h2", "Perplexity against size: the Pareto view"), ("figure", "pareto")]
    blocks += [("h2", "Bytes by term type"), ("figure", "bytes"),
               ("table", ["run", *(f"{c} {unit}" for c in CATEGORIES), "sum (bytes)", "= report total"], breakdown)]
    if "errors" in pngs:
        blocks += [("h2", "Per-layer relative error"), ("figure", "errors")]
    blocks += [("h2", "Provenance"),
               ("table", ["run", "model", "recipe hash", "calibration", "environment", "directory"],
                _provenance_rows(runs))]
    return blocks


def figures(runs: list[Run]) -> dict[str, bytes]:
    """name -> PNG bytes of every figure there is something to draw for."""
    drawn = {"pareto": pareto_figure(runs), "errors": heatmap_figure(runs), "bytes": bytes_figure(runs)}
    return {name: png(fig) for name, fig in drawn.items() if fig is not None}


def to_markdown(runs: list[Run], title: str, pngs: dict[str, bytes]) -> str:
    lines = [f"# {title}", ""] + [f"> {c}\n" for c in caveats(runs)]
    for kind, *body in sections(runs, pngs):
        if kind == "h2":
            lines += [f"## {body[0]}", ""]
        elif kind == "table":
            header, rows = body
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        elif kind == "note":
            lines += [body[0], ""]
        else:
            lines += [f"![{body[0]}](figures/{body[0]}.png)", "", f"*{CAPTIONS[body[0]]}*", ""]
    return "\n".join(lines)


CSS = """
body{font:15px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
  background:#fafafa;margin:0}
main{max-width:1240px;margin:0 auto;padding:24px 32px 48px;background:#fff;box-shadow:0 0 12px #0001}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 16px}
.caveat{background:#fff4d6;border-left:4px solid #e0a800;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;width:100%;font-size:13px;margin:6px 0 4px}
th,td{border:1px solid #ddd;padding:5px 8px;vertical-align:top} th{background:#f0f2f5;text-align:left}
tr:nth-child(even) td{background:#fafbfc}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:8px 0 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
code{font-size:12px;background:#f3f3f3;padding:1px 3px;border-radius:3px} .note{font-size:13px;color:#444}
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        numeric = NUMERIC.fullmatch(text) is not None
        return f"<td class=\"n\">{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(runs: list[Run], title: str, pngs: dict[str, bytes]) -> str:
    """One self-contained page: inline CSS, figures as base64 PNG, no external reference."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"sub\">{n_runs(len(runs))} · generated by <code>lmcompose report</code></p>"]
    parts += [f"<div class=\"caveat\">{html.escape(c)}</div>" for c in caveats(runs)]
    for kind, *body in sections(runs, pngs):
        if kind == "h2":
            parts.append(f"<h2>{html.escape(body[0])}</h2>")
        elif kind == "table":
            parts.append(_html_table(*body))
        elif kind == "note":
            parts.append(f"<p class=\"note\">{html.escape(body[0])}</p>")
        else:
            src = "data:image/png;base64," + base64.b64encode(pngs[body[0]]).decode("ascii")
            parts.append(f"<figure><img alt=\"{body[0]}\" src=\"{src}\"><figcaption>"
                         f"{html.escape(CAPTIONS[body[0]])}</figcaption></figure>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(runs: list[Run], out: str | Path, title: str = "lmcompose report", overwrite: bool = False) -> Path:
    """Write report.md, figures/*.png and report.html into `out`; the directory appears whole or not at all."""
    pngs = figures(runs)
    with atomic_dir(out, overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a report is meant to be shared
        (tmp / "figures").mkdir()
        for name, data in pngs.items():
            (tmp / "figures" / f"{name}.png").write_bytes(data)
        (tmp / "report.md").write_text(to_markdown(runs, title, pngs))
        (tmp / "report.html").write_text(to_html(runs, title, pngs))
    return Path(out)
