"""Peak memory and time of SVD-LLM's whitened factorization of one Llama-2-7B ``down_proj`` (4096 × 11008),
random weights and a Gram of random activations, in a fresh process.

The Gram is built from fewer tokens than its width (``--tokens``, default 2048 < 11008), as 16 calibration
windows of 512 tokens give at 7B width: it is singular, so the default ``eig_shift`` regularization takes its
eigenvalue path, the expensive one. What is printed: RSS before the factorization (weight, Gram), the peak
during it, the difference, the seconds, and checksums of the factors (equal across code versions that must
give the same result).

    OMP_NUM_THREADS=1 python benchmarks/whitening_memory.py
    OMP_NUM_THREADS=1 python benchmarks/whitening_memory.py --tokens 16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=11008)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens behind the Gram")
    ap.add_argument("--rank", type=int, default=1500)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lmcompose.core.stats import Stats
    from lmcompose.techniques.lowrank.svdllm import SVDLLM

    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.in_features)
    gram = x.T @ x / args.tokens
    del x
    w = torch.randn(args.out_features, args.in_features) * 0.02
    scale = gram.diagonal().sqrt()
    stats = Stats(args.tokens, gram, scale, scale)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    a, b, info = SVDLLM(ratio=0.5).factorize(w, stats, args.rank)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"shape": [args.out_features, args.in_features], "tokens": args.tokens, "rank": args.rank,
           "rss_before_gib": before / 2**30, "peak_rss_gib": peak / 2**30, "added_gib": (peak - before) / 2**30,
           "seconds": seconds, "threads": torch.get_num_threads(), "info": info,
           "checksums": [float(a.double().sum()), float(b.double().sum())]}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
