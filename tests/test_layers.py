"""The package's structure: layers point down, no circles, only the CLI prints or parses arguments."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import layers  # noqa: E402


def test_no_import_runs_upward_and_no_circle():
    assert layers.violations() == []


def test_an_upward_import_or_a_circle_is_reported(monkeypatch):
    real = layers.graph()
    fake = {k: set(v) for k, v in real.items()}
    fake["lmcompose.core.errors"].add("lmcompose.cli")                 # bottom layer importing the top
    fake["lmcompose.models.load"].add("lmcompose.eval.perplexity")     # models -> eval -> models: a circle
    monkeypatch.setattr(layers, "graph", lambda: fake)
    found = layers.violations()
    assert any("lmcompose.core.errors" in v and "lmcompose.cli" in v for v in found)
    assert any("circle" in v and "eval" in v and "models" in v for v in found)


def test_every_module_is_in_a_layer():
    for module in layers.graph():
        layers.layer_of(module)  # KeyError names a module that no layer holds


def test_the_diagram_in_docs_is_current():
    assert (ROOT / "docs" / "LAYERS.md").read_text() == layers.diagram(), \
        "docs/LAYERS.md is stale: run python tools/layers.py --write"


def _outside_cli():
    for path in sorted((ROOT / "src" / "lmcompose").rglob("*.py")):
        if "cli" not in path.relative_to(ROOT / "src" / "lmcompose").parts:
            yield path, ast.parse(path.read_text())


def test_only_the_cli_prints_or_parses_arguments():
    offenders = []
    for path, tree in _outside_cli():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.name}:{node.lineno} print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] == "argparse" or n.startswith("rich.console") or n == "Console"
                       for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports {names}")
    assert offenders == []
