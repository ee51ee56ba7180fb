"""The damaged-run-directory table of BENCHMARKS.md ("Trust: generated inputs and damaged run directories").

Builds the damaged directories that ``tests/test_damaged_rundirs.py`` builds (its case table and helpers are
imported: tiny Llamas saved by `save_compressed`, RTN 4-bit g32, and magnitude 50% + RTN for the sparse
cases; each case damages a copy), loads each with ``load_any`` with verification on and off, and prints a
markdown table. Runs in ~15 s on one core, no download:

    OMP_NUM_THREADS=1 python benchmarks/damaged_rundirs.py

Columns: the error type and message with ``verify=True`` (the default; the temporary directory is shown as
``RUN``); "silent wrong load": "no" when the load raised the error the test expects, "YES" when it loaded or
raised anything else; "verify=False": the same error, or, for damage that only the checksums can see,
whether the model that loads computes the intact run's logits (the documented escape hatch, ``--no-verify``).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from helpers import logits, windows
from test_damaged_rundirs import CASES, build_runs

from lmcompose.models.load import load_any


def cell(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= width else text[:width - 1] + "…"
    return text.replace("|", "\\|")


def main() -> int:
    import logging

    logging.disable(logging.WARNING)  # the loader's warnings are not part of the table
    rows, silent = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = build_runs(root / "intact")
        for i, (name, run, damage, error, parts, _) in enumerate(CASES):
            d = root / f"case{i}" / "RUN"
            shutil.copytree(runs[run][0], d)
            damage(d)
            try:
                load_any(str(d))
                kind, message, wrong = "(loaded)", "", True
            except Exception as err:  # noqa: BLE001 - every outcome is a row
                kind, message = type(err).__name__, str(err).replace(str(d), "RUN")
                wrong = not isinstance(err, error) or any(p not in str(err) for p in parts)
            silent += wrong
            try:
                model, _ = load_any(str(d), verify=False)
                same = torch.equal(logits(model, windows()), runs[run][1])
                unverified = f"loads; logits {'equal' if same else 'differ'}"
            except Exception as err:  # noqa: BLE001
                unverified = "same error" if type(err).__name__ == kind else f"{type(err).__name__}"
            rows.append((name, kind, cell(message), "YES" if wrong else "no", unverified))
    print("| case | error type | message (first 120 characters) | silent wrong load | verify=False |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(rows)} damaged directories, {silent} silent wrong loads (verification on)")
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
