"""Reports people would rather look at than read: `lmcompose report RUN_DIR [RUN_DIR ...] --out DIR`.

A run directory is what ``lmcompose compress --out DIR`` writes (``report.json``, ``lmcompose.json``,
``model.safetensors``, or shards and their ``model.safetensors.index.json`` with ``--stream``). From several
of them this package writes ``report.md`` with PNG figures beside it in ``figures/`` and one self-contained
``report.html`` (figures as base64 PNG, CSS inline, no external URL):

1. perplexity against total bytes and against bits/weight, the Pareto front highlighted, one row of
   panels per evaluation protocol (runs measured differently are never drawn on one plot);
2. per-layer relative error heatmaps (rows = decoder block, columns = Linear kind, log colour scale);
3. bytes by term type (dense, sparse values, sparse index, low-rank factors, scales/zeros/perm, other
   tensors), read from the saved file's tensor table, so the bars sum exactly to the run's total bytes.

Example::

    from lmcompose.reporting import load_runs, write_report
    write_report(load_runs(["runs/a", "runs/b"]), "reports/ab", title="a vs b")
"""

from .render import to_html, to_markdown, write_report
from .runs import CATEGORIES, Run, byte_breakdown, load_run, load_runs

__all__ = ["CATEGORIES", "Run", "byte_breakdown", "load_run", "load_runs", "to_html", "to_markdown", "write_report"]
