"""One OBS solve (GPTQ w4 g128, SparseGPT 50%) of a given shape on one intra-op thread and on all of them:
the measurement behind `core.linalg.SMALL_SOLVE` (issue 21). Random weights and a random positive Gram;
the solvers' cost does not depend on the values.

    OMP_NUM_THREADS=2 python benchmarks/solver_threads.py --shape 4096 11008 --shape 3072 576
"""

from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

from lmcompose.algebra.quant import QuantSpec
from lmcompose.core.linalg import one_thread
from lmcompose.techniques.prune.sparsegpt import block_keep_counts, sparsegpt_prune
from lmcompose.techniques.quant.gptq import gptq_quantize

# the solvers without their thread policy (`core.linalg.solver_threads`), so that this script sets it
SOLVERS = {
    "gptq w4 g128": lambda w, h: inspect.unwrap(gptq_quantize)(w, h, QuantSpec(bits=4, group_size=128)),
    "sparsegpt 50%": lambda w, h: inspect.unwrap(sparsegpt_prune)(
        w, h, block_keep_counts(w.shape[0], w.shape[1], 128, 0.5)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs=2, type=int, action="append", metavar=("ROWS", "COLS"), required=True)
    p.add_argument("--tokens", type=int, default=2048, help="rows of the random inputs whose Gram is used")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_grad_enabled(False)
    for rows, cols in args.shape:
        w = torch.randn(rows, cols, generator=g)
        x = torch.randn(args.tokens, cols, generator=g)
        h = x.T @ x / args.tokens
        for name, solve in SOLVERS.items():
            row = {"solver": name, "shape": [rows, cols], "threads": threads}
            for label in ("one_thread", "all_threads"):
                t0 = time.perf_counter()
                if label == "one_thread":
                    with one_thread():
                        solve(w, h)
                else:
                    solve(w, h)
                row[f"{label}_s"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
