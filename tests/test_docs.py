"""Docstrings point at notes and modules that exist."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lmcompose"


def test_every_method_notes_pointer_exists():
    missing = []
    for path in SRC.rglob("*.py"):
        for ref in re.findall(r"docs/methods/[\w.-]+\.md", path.read_text()):
            if not (ROOT / ref).is_file():
                missing.append(f"{path.relative_to(ROOT)} -> {ref}")
    assert missing == []


def test_dotted_lmcompose_names_in_docstrings_resolve():
    """Every ``lmcompose.x.y`` a docstring or comment names is a module, or an attribute of one."""
    not_code = {"lmcompose.json", "lmcompose.requantized"}  # a run directory's file, a GGUF metadata key
    stale = []
    for path in SRC.rglob("*.py"):
        for name in set(re.findall(r"\blmcompose(?:\.[A-Za-z_]\w*)+", path.read_text())) - not_code:
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    stale.append(f"{path.relative_to(ROOT)}: {name}")
                break
            else:
                stale.append(f"{path.relative_to(ROOT)}: {name}")
    assert stale == []
