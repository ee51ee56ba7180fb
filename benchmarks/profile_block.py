"""Where a sequential compression run spends its time, phase by phase (issue 21 item 4).

Runs `lmcompose.compress` on the first `--blocks` decoder blocks of SmolLM2-135M (fp32; or a random-weight
model of its shapes with ``--random``) over `--n` × `--seqlen` calibration windows, and splits the wall
time into: capture (embeddings + masks, once), observe (the dense block's forward with the statistics
hooks), of which Gram (the `StatsAccumulator.update` calls), solve (the technique itself, e.g.
`gptq_quantize`), check + error (invariant check, dense reconstruction, relative error), propagate (the
compressed block's forward) and other. Each phase is timed with `perf_counter` around the functions the
pipeline calls, so the split is exact up to the wrappers' own cost.

    OMP_NUM_THREADS=2 python benchmarks/profile_block.py --blocks 4            # GPTQ w4 g64 act-order+static
    python benchmarks/profile_block.py --method sparsegpt --blocks 4 --json out.json
    py-spy record -o prof.json --format speedscope -- python benchmarks/profile_block.py --blocks 2

The windows are `/tmp/peers_data/c4-n128-s512-seed0.safetensors` when present (the ones the peer runs
use; `benchmarks/peers/make_windows.py`), else random token ids (timing does not depend on the text).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

WINDOWS = Path("/tmp/peers_data/c4-n128-s512-seed0.safetensors")


class Clock:
    """Seconds per phase; nested phases are subtracted from their parent (exclusive time)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._stack = []

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, inner = self._stack.pop()
            dt = time.perf_counter() - t0
            self.seconds[name] += dt - inner
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][1] += dt

    def wrap(self, owner, attr, name):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            with self.phase(name):
                return fn(*a, **k)
        setattr(owner, attr, timed)


def model_and_windows(args):
    from lmcompose.models.load import load_model
    if args.random:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          num_hidden_layers=args.blocks, vocab_size=49152, max_position_embeddings=2048,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
    else:
        model, _ = load_model("smollm2-135m", dtype="fp32", device="cpu")
        model.model.layers = model.model.layers[:args.blocks]
        model.config.num_hidden_layers = args.blocks
    if WINDOWS.exists() and args.seqlen <= 512:
        from safetensors.torch import load_file
        windows = next(iter(load_file(str(WINDOWS)).values()))[:args.n, :args.seqlen]
    else:
        windows = torch.randint(0, model.config.vocab_size, (args.n, args.seqlen),
                                generator=torch.Generator().manual_seed(0))
    return model, windows


def recipe(args):
    if args.method == "gptq":
        step = {"gptq": {"bits": 4, "group_size": 64, "act_order": True, "static_groups": True}}
    elif args.method == "sparsegpt":
        step = {"sparsegpt": {"sparsity": 0.5}}
    else:
        step = {args.method: {}}
    return {"steps": [step], "float_dtype": "fp32", "calibration": {"batch_size": args.batch_size}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--method", default="gptq")
    p.add_argument("--compute-dtype", default="auto")
    p.add_argument("--random", action="store_true", help="random weights of SmolLM2-135M's shapes")
    p.add_argument("--json", help="append the split as one JSON line to this file")
    p.add_argument("--label", default="")
    p.add_argument("--digest", action="store_true", help="print a sha256 of the compressed blocks' tensors")
    p.add_argument("--save", help="torch.save the compressed Linears' dense weights to this file (to compare runs)")
    args = p.parse_args()

    from lmcompose import api
    from lmcompose.core import stats as stats_mod
    from lmcompose.pipeline import sequential
    from lmcompose.techniques import apply as apply_mod

    model, windows = model_and_windows(args)
    clock = Clock()
    clock.wrap(sequential, "capture_inputs", "capture")
    clock.wrap(sequential, "observe", "observe")
    clock.wrap(sequential, "run_block", "propagate")
    clock.wrap(stats_mod.StatsAccumulator, "update", "gram")
    clock.wrap(apply_mod, "check_step", "check+error")
    clock.wrap(apply_mod, "relative_error", "check+error")
    for technique in ("quant.gptq:gptq_quantize", "prune.sparsegpt:sparsegpt_prune"):
        mod, fn = technique.split(":")
        try:
            module = __import__(f"lmcompose.techniques.{mod}", fromlist=[fn])
            clock.wrap(module, fn, "solve")
        except (ImportError, AttributeError):
            pass
    clock.wrap(apply_mod, "apply_steps", "apply (rest)")
    if hasattr(apply_mod, "apply_stacked"):
        clock.wrap(apply_mod, "apply_stacked", "apply (rest)")
    t0 = time.perf_counter()
    report = api.compress(model, recipe(args), windows, compute_dtype=args.compute_dtype)
    wall = time.perf_counter() - t0
    split = dict(clock.seconds)
    split["other"] = wall - sum(split.values())
    row = {"label": args.label, "method": args.method, "blocks": args.blocks, "windows": list(windows.shape),
           "batch_size": args.batch_size, "threads": torch.get_num_threads(),
           "compute_dtype": report.environment.get("compute_dtype"), "wall_s": round(wall, 2),
           "split_s": {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
           "calls": dict(clock.calls),
           "mean_rel_error": sum(l.steps[-1]["rel_error"] for l in report.layers if l.steps) / max(
               1, sum(1 for l in report.layers if l.steps))}
    if args.digest:
        import hashlib
        h = hashlib.sha256()
        from lmcompose.runtime.linear import CompressedLinear
        for name, module in sorted(model.named_modules()):
            if isinstance(module, CompressedLinear):  # its tensors are not in state_dict()
                h.update(name.encode())
                h.update(module.to_dense(torch.float32).detach().contiguous().numpy().tobytes())
        row["sha256"] = h.hexdigest()[:16]
    if args.save:
        from lmcompose.runtime.linear import CompressedLinear
        torch.save({n: m.to_dense(torch.float32) for n, m in model.named_modules()
                    if isinstance(m, CompressedLinear)}, args.save)
    print(f"wall {wall:.1f} s ({args.method}, {args.blocks} blocks, {tuple(windows.shape)}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, {row['compute_dtype']})")
    for k, v in row["split_s"].items():
        print(f"  {k:14s} {v:8.2f} s  {100 * v / wall:5.1f}%  ({clock.calls.get(k, 0)} calls)")
    print(f"  mean rel. error {row['mean_rel_error']:.6e}" + (f"  sha256 {row['sha256']}" if args.digest else ""))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
