"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state).

Each function takes runs and returns a :class:`matplotlib.figure.Figure` (or None when there is nothing
to draw); :func:`png` turns one into PNG bytes, which the renderer writes to a file and embeds in HTML.
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..core.pareto import pareto_front
from .runs import CATEGORIES, Run, n_runs, protocol_key, protocol_label

COLORS = dict(zip(CATEGORIES, ("#4878d0", "#ee854a", "#d65f5f", "#6acc64", "#956cb4", "#b0b0b0")))


def byte_unit(largest: float) -> tuple[str, int]:
    """The binary unit that shows `largest` bytes as a number between 1 and 1024, and its size."""
    for i, name in enumerate(("B", "KiB", "MiB", "GiB")):
        if largest < 1024 ** (i + 1) or name == "GiB":
            return name, 1024**i
    raise AssertionError("unreachable")


def png(fig: Figure, dpi: int = 110) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _wrap(text: str, width: int = 34) -> str:
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def protocol_groups(runs: list[Run]) -> list[list[Run]]:
    """Evaluated runs grouped by comparable protocol, in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.ppl is not None:
            groups.setdefault(protocol_key(r.protocol), []).append(r)
    return list(groups.values())


def _pareto_panel(ax, runs: list[Run], xs: list[float], xlabel: str) -> None:
    ys = [r.ppl for r in runs]
    front = set(pareto_front(zip(xs, ys)))
    others = [i for i in range(len(runs)) if i not in front]
    if others:
        ax.scatter([xs[i] for i in others], [ys[i] for i in others], s=28, color="#8c8c8c", zorder=2,
                   label="dominated")
    order = sorted(front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "-o", color="#c0392b", ms=6, lw=1.4, zorder=3,
            drawstyle="steps-post", label="Pareto front")
    mid = (min(xs) + max(xs)) / 2
    for i, r in enumerate(runs):
        right = xs[i] > mid and len(set(xs)) > 1  # labels point inwards so they stay inside the panel
        on_front = i in front  # front labels above, dominated ones below: runs of equal size stay legible
        ax.annotate(_wrap(r.label, 28), (xs[i], ys[i]), xytext=(-5 if right else 5, 4 if on_front else -5),
                    textcoords="offset points", ha="right" if right else "left",
                    va="bottom" if on_front else "top", fontsize=7, color="#c0392b" if on_front else "#444444",
                    zorder=4)
    if max(ys) / min(ys) > 3:  # plain numbers on a log axis: 20, 50, 100 rather than 2×10¹
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 4, 5, 7)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)


def pareto_figure(runs: list[Run]) -> Figure | None:
    """Perplexity against total bytes (left) and bits/weight (right); one row per evaluation protocol."""
    groups = protocol_groups(runs)
    if not groups:
        return None
    unit, size = byte_unit(max(r.total_bytes for g in groups for r in g))
    fig = Figure(figsize=(12, 4.9 * len(groups)), layout="constrained")
    rows = fig.subfigures(len(groups), 1, squeeze=False)[:, 0]
    for sub, group in zip(rows, groups):
        left, right = sub.subplots(1, 2)
        _pareto_panel(left, group, [r.total_bytes / size for r in group], f"total stored bytes ({unit})")
        _pareto_panel(right, group, [r.bits_per_weight for r in group], "bits/weight of compressed Linears")
        left.set_title("perplexity vs size", fontsize=10)
        right.set_title("perplexity vs bits/weight", fontsize=10)
        left.legend(fontsize=8, loc="upper right")
        sub.suptitle(f"protocol {protocol_label(group[0].protocol)} ({n_runs(len(group))})", fontsize=11,
                     fontweight="bold" if len(groups) > 1 else "normal")
    return fig


def split_layer_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, ``self_attn.q_proj``); no block index -> (None, name)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return int(p), ".".join(parts[i + 1:])
    return None, name


def error_grid(errors: dict[str, float], blocks: list, kinds: list[str]) -> np.ndarray:
    """[len(blocks), len(kinds)] relative errors; NaN where a Linear was not compressed."""
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for name, err in errors.items():
        block, kind = split_layer_name(name)
        grid[blocks.index(block if block is not None else "other"), kinds.index(kind)] = err
    return grid


def heatmap_figure(runs: list[Run], max_cols: int = 4) -> Figure | None:
    """Per-layer relative output error, one panel per run, rows = block, columns = Linear kind."""
    runs = [r for r in runs if r.layer_errors]
    if not runs:
        return None
    kinds, block_ids = [], set()
    for r in runs:
        for name in r.layer_errors:
            block, kind = split_layer_name(name)
            if kind not in kinds:
                kinds.append(kind)  # first appearance = model order (q, k, v, o, gate, up, down)
            block_ids.add(block)
    blocks = sorted(b for b in block_ids if b is not None) + (["other"] if None in block_ids else [])
    short = [k.rsplit(".", 1)[-1] for k in kinds]
    short = short if len(set(short)) == len(short) else kinds
    grids = [error_grid(r.layer_errors, blocks, kinds) for r in runs]
    positive = np.concatenate([g[np.isfinite(g) & (g > 0)] for g in grids])
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    ncols = min(len(runs), max_cols)
    nrows = math.ceil(len(runs) / ncols)
    panel_h = 0.17 * len(blocks) + 2.0
    fig = Figure(figsize=(3.0 * ncols + 1.2, panel_h * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, r, grid in zip(axes.flat, runs, grids):
        shown = np.where(grid > 0, grid, np.nan)  # a lossless layer has no place on a log scale
        image = ax.imshow(shown, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_facecolor("#e8e8e8")  # not compressed / lossless
        ax.set_title(_wrap(r.label, 30), fontsize=8)
        ax.set_xticks(range(len(kinds)), short, rotation=60, fontsize=7, ha="right", rotation_mode="anchor")
        step = max(1, len(blocks) // 15)
        ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
        ax.set_ylabel("block", fontsize=8)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    if image is not None and norm is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="relative output error (log)")
    return fig


def bytes_figure(runs: list[Run]) -> Figure:
    """Stacked horizontal bars: every run's stored bytes by category; each bar sums to its total."""
    fig = Figure(figsize=(12, 0.55 * len(runs) + 1.9), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(runs))[::-1]
    unit, size = byte_unit(max(r.file_bytes for r in runs))
    left = np.zeros(len(runs))
    for cat in CATEGORIES:
        vals = np.array([r.bytes_by_category.get(cat, 0) / size for r in runs])
        if vals.any():
            ax.barh(y, vals, left=left, color=COLORS[cat], label=cat, height=0.62)
        left += vals
    for yi, total in zip(y, left):
        ax.text(total, yi, f"  {total:,.1f} {unit}", va="center", fontsize=8)
    ax.set_yticks(y, [_wrap(r.label, 44) for r in runs], fontsize=8)
    ax.set_xlabel(f"stored bytes ({unit})")
    ax.set_xlim(0, left.max() * 1.15)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(ncols=len(CATEGORIES), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return fig
