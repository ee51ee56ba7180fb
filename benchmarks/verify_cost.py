"""Seconds that verification adds to loading a run directory, and what checking the GGUF cache costs.

Make the run directory first (SmolLM2-135M, RTN 4-bit g64), then time it on one thread:

    printf 'steps:\n  - rtn: {bits: 4, group_size: 64}\n' > /tmp/rtn.yaml
    LMCOMPOSE_DATA_DIR=../shared/data lmcompose compress --model smollm2-135m --calib-n 4 --recipe /tmp/rtn.yaml \\
        --out /tmp/rd --eval none
    OMP_NUM_THREADS=1 python benchmarks/verify_cost.py /tmp/rd

Prints the median wall and CPU seconds of ``load_compressed`` with and without ``verify`` (interleaved), of
the checksum pass and of the consistency checks alone, and of the three levels of the cache's manifest check.
Results: BENCHMARKS.md, "Verifying run directories and the model cache (issue 19)".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from safetensors.torch import load_file

from lmcompose.core.io import check_manifest
from lmcompose.models.checkpoint import load_compressed
from lmcompose.models.integrity import check_layer_tensors, verify_checksums
from lmcompose.models.load import _gguf_cache_dir, load_model, resolve_model


def median_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--model", default="smollm2-135m", help="whose dequantized GGUF cache to check")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = args.run_dir
    load_compressed(run)  # imports and page cache
    wall, cpu = {True: [], False: []}, {True: [], False: []}
    for _ in range(args.reps):
        for verify in (True, False):
            w, c = time.perf_counter(), time.process_time()
            load_compressed(run, verify=verify)
            wall[verify].append(time.perf_counter() - w)
            cpu[verify].append(time.process_time() - c)
    for v in (True, False):
        print(f"load_compressed(verify={v}): wall {statistics.median(wall[v]):.3f} s, "
              f"cpu {statistics.median(cpu[v]):.3f} s")
    with open(f"{run}/lmcompose.json") as f:
        meta = json.load(f)
    state = load_file(f"{run}/model.safetensors")
    mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    print(f"checksums alone: {median_of(lambda: verify_checksums(run, meta, state), args.reps):.3f} s "
          f"({mb:.0f} MB, {len(state)} tensors)")
    consistency = median_of(lambda: [check_layer_tensors(run, n, m, state) for n, m in meta["layers"].items()],
                            args.reps)
    print(f"consistency checks alone: {consistency:.3f} s")
    load_model(args.model)  # makes (or adopts) the cache
    cache = _gguf_cache_dir(resolve_model(args.model))
    for level in ("sizes", "changed", "all"):
        seconds = median_of(lambda level=level: check_manifest(cache, level), 3)
        print(f"cache manifest check {level!r}: {seconds:.3f} s")


if __name__ == "__main__":
    main()
