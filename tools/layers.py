"""The package's layers, read from its imports: a check and a diagram (docs/LAYERS.md).

Every module of ``src/lmcompose`` belongs to one layer (`LAYERS`, bottom first). A module may import
modules of its own layer or of the layers below it, never above; and the imports between packages must
not form a circle. Imports inside function bodies count like the others: a circle hidden in a function is
still a circle.

    python tools/layers.py            # print violations (exit 1 if any)
    python tools/layers.py --write    # also regenerate docs/LAYERS.md

``tests/test_layers.py`` runs `violations()` so that a module importing a layer above it fails the suite.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "lmcompose"

# Bottom first. A name is a package (everything under it) or a top-level module.
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("core", ("core",), "errors, float dtypes, input statistics, linear-algebra helpers, atomic writes"),
    ("algebra", ("algebra", "data"), "terms, quantized tensors, specs and bytes; text and token windows"),
    ("runtime", ("runtime",), "CompressedLinear and the kernels its forward runs"),
    ("techniques", ("techniques",), "one file per technique: config, pure math, apply"),
    ("recipes", ("recipe", "rules", "presets"), "recipes, their checking and costing, composition rules"),
    ("pipeline", ("pipeline", "training"), "the sequential loop, block discovery, statistics passes, recovery"),
    ("api", ("api", ""), "compress(model, recipe, windows) -> Report"),
    ("models", ("models",), "loading, saving, exporting models and run directories"),
    ("evaluation", ("eval",), "perplexity, zero-shot, fidelity, speed"),
    ("studies", ("analysis", "search", "reporting"), "orthogonality studies, the search, reports"),
    ("cli", ("cli",), "the command line: the only place that prints or parses arguments"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group_of(module: str) -> str:
    """The package or top-level module a module belongs to ("" for the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    group = group_of(module)
    for i, (_, groups, _) in enumerate(LAYERS):
        if group in groups:
            return i
    raise KeyError(f"{module}: {group!r} is in no layer of tools/layers.py; add it to LAYERS")


def imports(path: Path, module: str) -> set[str]:
    """Modules of the package that `module` imports (relative imports resolved; ``from . import x``
    counts as importing the submodule x when it is one)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = base[:len(base) - node.level + 1] + ([node.module] if node.module else [])
                target = ".".join(target)
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = (SRC / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (SRC / Path(*sub.split("."))).is_dir()
                out.add(sub if is_module else target)
    return out


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        mod = module_name(path)
        edges[mod] = {m for m in imports(path, mod) if m != mod}
    return edges


def _cycles(nodes: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in nodes.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(nodes):
        if v not in index:
            visit(v)
    return out


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports between groups (packages or top-level modules), the package's __init__ left out."""
    out = defaultdict(set)
    for mod, targets in edges.items():
        a = group_of(mod)
        for t in targets:
            b = group_of(t)
            if a and b and a != b:
                out[a].add(b)
    return out


def violations() -> list[str]:
    """Every import that runs upward, and every circle between packages or between modules."""
    edges = graph()
    out = []
    for mod, targets in sorted(edges.items()):
        for t in sorted(targets):
            if t.split(".")[0] != PACKAGE:
                continue
            if layer_of(t) > layer_of(mod):
                out.append(f"{mod} (layer {LAYERS[layer_of(mod)][0]}) imports {t} (layer {LAYERS[layer_of(t)][0]}, above)")
    out += [f"packages import each other in a circle: {' <-> '.join(c)}" for c in _cycles(package_graph(edges))]
    module_edges = {m: {t for t in ts if t in edges} for m, ts in edges.items()}
    # a package's __init__ importing its own submodules is not a circle with them
    for m, ts in module_edges.items():
        module_edges[m] = {t for t in ts if not t.startswith(m + ".")}
    out += [f"modules import each other in a circle: {' <-> '.join(c)}" for c in _cycles(module_edges)]
    return out


def diagram() -> str:
    edges = graph()
    pkg = package_graph(edges)
    counts = defaultdict(int)
    for mod in edges:
        counts[group_of(mod) or PACKAGE] += 1
    lines = ["# The layers of lmcompose", "",
             "Generated by `python tools/layers.py --write` from the imports of `src/lmcompose` (do not edit by "
             "hand). Each layer may import only the layers below it; `tests/test_layers.py` fails on an import "
             "that runs upward or on a circle.", "", "```"]
    for i in reversed(range(len(LAYERS))):
        name, groups, what = LAYERS[i]
        present = [g or PACKAGE for g in groups if (g or PACKAGE) in counts]
        lines.append(f"{i:>2} {name:<11} {', '.join(f'{g}/' if (SRC / PACKAGE / g).is_dir() and g else g for g in present):<34} {what}")
        for g in groups:
            deps = sorted(pkg.get(g, ()), key=lambda d: (-layer_of(f'{PACKAGE}.{d}'), d))
            if deps and g:
                lines.append(f"{'':>15}{g} -> {', '.join(deps)}")
    lines += ["```", "", "Modules per package: " + ", ".join(f"{g} {n}" for g, n in sorted(counts.items())), ""]
    return "\n".join(lines)


def main(argv) -> int:
    found = violations()
    for v in found:
        print(v)
    if "--write" in argv:
        (ROOT / "docs" / "LAYERS.md").write_text(diagram())
        print("wrote docs/LAYERS.md")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
