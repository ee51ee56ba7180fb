"""Peak memory and time per step of `reconstruct` on one Llama-2-7B-shaped block (hidden 4096, intermediate
11008, 32 heads), random weights: a 1-layer LlamaForCausalLM through the whole pipeline (`compress`).

Each mode runs in a fresh process, so its peak RSS (ru_maxrss) is its own: ``rtn`` alone (the baseline), then
``rtn`` followed by ``reconstruct``. The difference is what reconstruction adds; the target is that the whole
process stays under 8 GB.

    OMP_NUM_THREADS=1 python benchmarks/reconstruct_memory.py                  # both modes, a table
    OMP_NUM_THREADS=1 python benchmarks/reconstruct_memory.py --seqlen 2048 --windows 4 --steps 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def build(vocab: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy of the 7B-wide block on the way
    try:
        return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def run(args) -> dict:
    from lmcompose import Recipe, compress
    from lmcompose.core.memory import peak_rss_bytes

    model = build(args.vocab, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    windows = torch.randint(0, args.vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(1))
    steps = [{"rtn": {"bits": args.bits, "group_size": args.group_size}}]
    if args.mode == "reconstruct":
        steps.append({"reconstruct": {"train": args.train, "steps": args.steps, "batch_size": args.batch_size,
                                      "eval_every": args.steps}})
    recipe = Recipe.from_dict({"calibration": {"batch_size": args.calib_batch}, "steps": steps})
    rss_model = peak_rss_bytes()
    t0 = time.perf_counter()
    report = compress(model, recipe, windows)
    out = {"mode": args.mode, "peak_rss_gb": peak_rss_bytes() / 1e9, "rss_after_model_gb": rss_model / 1e9,
           "seconds": time.perf_counter() - t0, "compute_dtype": report.environment["compute_dtype"],
           "threads": torch.get_num_threads()}
    if args.mode == "reconstruct":
        info = report.layers[0].steps[-1]
        out.update({k: info[k] for k in ("loss_before", "loss_after", "loss_best", "seconds_per_step",
                                          "block_seconds")})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["rtn", "reconstruct"], help="run one mode in this process (internal)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4, help="calibration windows")
    p.add_argument("--calib-batch", type=int, default=1, help="windows per pipeline forward")
    p.add_argument("--batch-size", type=int, default=1, help="reconstruct: windows per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--train", default="rounding+scales")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the model's weights")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run(args)))
        return
    rows = []
    for mode in ("rtn", "reconstruct"):
        cmd = [sys.executable, __file__, "--mode", mode] + sys.argv[1:]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"one 4096/11008 block, {args.windows} windows x {args.seqlen} tokens, {args.dtype} weights, "
          f"compute {rows[0]['compute_dtype']}, {rows[0]['threads']} thread(s); reconstruct train={args.train} "
          f"steps={args.steps} batch_size={args.batch_size}")
    for r in rows:
        extra = "" if r["mode"] == "rtn" else (f", {r['seconds_per_step']:.1f} s/step, block loss "
                                               f"{r['loss_before']:.4g} -> {r['loss_best']:.4g}")
        print(f"  {r['mode']:12s} peak RSS {r['peak_rss_gb']:.2f} GB (after building the model "
              f"{r['rss_after_model_gb']:.2f} GB), {r['seconds']:.0f} s{extra}")
    print(f"  reconstruct adds {rows[1]['peak_rss_gb'] - rows[0]['peak_rss_gb']:.2f} GB of peak RSS")


if __name__ == "__main__":
    main()
