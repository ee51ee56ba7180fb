"""Benchmark rows for BENCHMARKS.md: quality at equal bytes, compression time, peak memory.

Each row runs the real CLI in a fresh process (so peak RSS is that row's own), saves the compressed
checkpoint, checks the report's byte count against the saved file, and appends one JSON line to
``benchmarks/results/<table>.jsonl``. ``render.py`` turns those files into BENCHMARKS.md.

    python benchmarks/bench.py --table foundation                # every row of one table
    python benchmarks/bench.py --table foundation --only dense   # some rows
    python benchmarks/bench.py --list
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
C4 = {"source": "c4", "n": 128, "seqlen": 512, "seed": 0, "batch_size": 8}


def step(name, **params):
    return {name: params}


RECOVER = {"steps": 128, "lr": 1e-4, "batch_size": 1}  # one pass over the 128 calibration windows


def rows_foundation(model="smollm2-135m"):
    return {
        "dense": None,
        "magnitude 50%": [step("magnitude", sparsity=0.5)],
        "magnitude 2:4": [step("magnitude", pattern="2:4")],
        "rtn w4 g64": [step("rtn", bits=4, group_size=64)],
    }


def rows_techniques():
    rows = {"dense": None}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for s in (0.3, 0.5, 0.6):
            rows[f"{method} {int(s * 100)}%"] = [step(method, sparsity=s)]
        rows[f"{method} 2:4"] = [step(method, pattern="2:4")]
    for method in ("rtn", "gptq"):
        for b in (8, 4, 3):
            rows[f"{method} w{b} g64"] = [step(method, bits=b, group_size=64)]
    for method in ("svd", "asvd", "svdllm"):
        for cut in (0.1, 0.2, 0.3):
            rows[f"{method} -{int(cut * 100)}% bytes"] = [step(method, ratio=round(1 - cut, 2))]
    return rows


def rows_joint():
    """Issue 4: joint methods against single ones at equal bytes (in the order they are worth running)."""
    g64 = {"bits": 4, "group_size": 64}
    rows = {"dense": None}

    def kept(methods, fraction):  # fraction of fp16 bytes kept, all storage counted
        for method in methods:
            rows[f"{method} {int(fraction * 100)}% bytes"] = [step(method, ratio=fraction)]

    kept(("wanda", "sparsegpt", "svdllm", "sslc"), 0.5)
    # SSLC's optional recovery: U, V fitted to the full layer objective tr(ΔW H ΔWᵀ) with S frozen
    rows["sslc 50% bytes + factor fit"] = [step("sslc", ratio=0.5, finetune_steps=200)]
    # ... and the recipe-level recovery: U, V fine-tuned on the causal-LM loss over the calibration windows
    for method in ("sslc", "svdllm"):
        rows[f"{method} 50% bytes + LM recovery"] = {"steps": [step(method, ratio=0.5)], "recover": RECOVER}
    # the same recovery for the pruner, on its kept values inside the fixed mask: the fair comparison
    rows["sparsegpt 50% bytes + LM recovery"] = {"steps": [step("sparsegpt", ratio=0.5)],
                                                 "recover": {**RECOVER, "train": "lowrank+sparse"}}
    # 50% sparsity + 4 bits, three ways (and S→Q with Wanda's mask, to separate the mask from jointness)
    rows["S→Q sparsegpt 50% → gptq w4"] = [step("sparsegpt", sparsity=0.5), step("gptq", **g64)]
    rows["S→Q wanda 50% → gptq w4"] = [step("wanda", sparsity=0.5), step("gptq", **g64)]
    rows["Q→S gptq w4 → wanda 50%"] = [step("gptq", **g64), step("wanda", sparsity=0.5)]
    rows["joint sparsegpt 50% + w4"] = [step("sparsegpt", sparsity=0.5, **g64)]
    # about 4.3 and 3.3 bits per weight (the bytes of GPTQ w4 g64 and w3 g64): low rank + quantization
    for bpw, ratio, gptq_bits, qer_bits in (("4.3", 0.27, 4, 3), ("3.3", 0.206, 3, 2)):
        rows[f"gptq w{gptq_bits} g64"] = [step("gptq", bits=gptq_bits, group_size=64)]
        rows[f"qera w{qer_bits} g64 + rank ({bpw} bpw)"] = [step("qera", bits=qer_bits, group_size=64, ratio=ratio)]
        # the same residual term on GPTQ codes instead of RTN ones
        rows[f"qera gptq w{qer_bits} g64 + rank ({bpw} bpw)"] = [step("qera", bits=qer_bits, group_size=64, ratio=ratio,
                                                                    quantizer="gptq")]
        rows[f"dam w4 g64 ({bpw} bpw)"] = [step("dam", bits=4, group_size=64, ratio=ratio)]
        rows[f"L→Q w4 g64 ({bpw} bpw)"] = [step("dam", bits=4, group_size=64, ratio=ratio, mode="l_then_q")]
        # stores more than the dense fp16 bytes (16.2 bits per weight: the SVD of the codes replaces them), so
        # the recipe must say allow_growth
        rows[f"Q→L w4 g64 ({bpw} bpw, analysis)"] = {"steps": [step("dam", bits=4, group_size=64, ratio=ratio,
                                                                    mode="q_then_l")], "allow_growth": True}
        # the same orders on the whitened (SVD-LLM) decomposition, which survives truncation far better
        rows[f"L→Q svdllm w4 g64 ({bpw} bpw)"] = [step("dam", bits=4, group_size=64, ratio=ratio, mode="l_then_q",
                                                      decomposition="svdllm")]
        rows[f"dam svdllm w4 g64 ({bpw} bpw)"] = [step("dam", bits=4, group_size=64, ratio=ratio,
                                                      decomposition="svdllm")]
    # the triple S + L + Q, at decreasing sizes
    for fraction in (0.8, 0.7, 0.6):
        rows[f"triple sslc {int(fraction * 100)}% → gptq w4"] = [step("sslc", ratio=fraction), step("gptq", **g64)]
    kept(("wanda", "sparsegpt", "svdllm", "sslc"), 0.6)
    rows["sslc 2:4 + rank 60% bytes"] = [step("sslc", pattern="2:4", ratio=0.6)]  # against sparsegpt 2:4 (54.7%)
    kept(("oats",), 0.5)  # 80 full SVDs per Linear: the slowest rows last
    kept(("oats",), 0.6)
    return rows


def rows_search():
    """Issue 6: hand-written baselines at the search budgets (50% of fp16 bytes, 4.2 and 3.2 bits/weight)."""
    g128 = {"group_size": 128}
    return {
        "dense": None,
        # ≤ 50% of fp16 bytes (8 bits per weight)
        "gptq w7 g64 (≤50%)": [step("gptq", bits=7, group_size=64)],
        "sparsegpt 20% → gptq w8 g128 (≤50%)": [step("sparsegpt", sparsity=0.2), step("gptq", bits=8, **g128)],
        # ≤ 4.2 bits per weight
        "gptq w4 g128 (≤4.2)": [step("gptq", bits=4, **g128)],
        "gptq w4 g128 act-order (≤4.2)": [step("gptq", bits=4, act_order=True, **g128)],
        "sparsegpt 25% → gptq w4 g128 (≤4.2)": [step("sparsegpt", sparsity=0.25), step("gptq", bits=4, **g128)],
        "svdllm 90% → gptq w4 g128 (≤4.2)": [step("svdllm", ratio=0.9), step("gptq", bits=4, **g128)],
        # ≤ 3.2 bits per weight
        "gptq w3 g128 (≤3.2)": [step("gptq", bits=3, **g128)],
        "gptq w3 g128 act-order (≤3.2)": [step("gptq", bits=3, act_order=True, **g128)],
        "sparsegpt 50% → gptq w4 g128 (≤3.2)": [step("sparsegpt", sparsity=0.5), step("gptq", bits=4, **g128)],
        "joint sparsegpt 50% + w4 g128 (≤3.2)": [step("sparsegpt", sparsity=0.5, bits=4, **g128)],
    }


def rows_quality():
    """Issue 18: at about 4.2, 3.2 and 2.3 bits per weight, the best single technique (GPTQ with act-order and
    static groups) and the same quantizer with each new piece switched on (rotation, AWQ, block-wise
    reconstruction, distillation), then together. Group 128 at 4 and 3 bits (4.16 and 3.16 bits/weight), 64 at
    2 bits (2.28), the peers' W3/W2 group size 64 beside them (3.30 and 2.28)."""
    rotate = step("rotate", per_head=True)
    reconstruct = step("reconstruct", train="scales+rounding", steps=50, eval_every=25)
    distill = {"steps": 128, "lr": 1e-5, "batch_size": 1, "train": "scales", "loss": "kl", "heldout": 8}
    rows = {"dense": None}
    for bits, group in ((3, 128), (2, 64), (4, 128), (3, 64)):
        tag = f"w{bits} g{group}"
        grid = {"bits": bits, "group_size": group}
        gptq = step("gptq", act_order=True, static_groups=True, **grid)
        rows[f"gptq {tag}"] = [gptq]
        rows[f"rotate → gptq {tag}"] = [rotate, gptq]
        rows[f"awq → gptq {tag}"] = [step("awq", **grid), gptq]
        rows[f"gptq {tag} → reconstruct"] = [gptq, reconstruct]
        rows[f"rotate → gptq {tag} → reconstruct"] = [rotate, gptq, reconstruct]
        rows[f"rotate → gptq {tag} → reconstruct + distill"] = {"steps": [rotate, gptq, reconstruct],
                                                                "recover": distill}
    return rows


# Rows measured on the full protocol too (issue 3: the 50% and 4-bit rows; issue 4: the headline rows).
HEADLINE = {"dense", "magnitude 50%", "wanda 50%", "sparsegpt 50%", "rtn w4 g64", "gptq w4 g64",
            "wanda 50% bytes", "sparsegpt 50% bytes", "sslc 50% bytes", "svdllm 50% bytes", "joint sparsegpt 50% + w4",
            "S→Q sparsegpt 50% → gptq w4", "dam w4 g64 (4.3 bpw)"}

TABLES = {"foundation": rows_foundation, "techniques": rows_techniques, "joint": rows_joint,
          "search": rows_search, "quality": rows_quality}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def full_eval(model: str, out: Path, env: dict) -> dict:
    """The full protocol (WikiText-2 test, seqlen 2048) of a saved checkpoint or a dense model."""
    dest = Path(str(out) + ".full.json")
    cmd = [sys.executable, "-m", "lmcompose.cli", "eval", "--model", model, "--protocol", "full", "--json", str(dest)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:])
        return {"full_error": proc.stderr[-500:]}
    res = json.loads(dest.read_text())
    return {"ppl_full": res["ppl"], "protocol_full": res["protocol"], "full_seconds": round(res["seconds"], 1),
            "command_full": " ".join(["lmcompose", *cmd[3:]])}


def run_row(table, name, steps, model, protocol, out_root, extra, calib, with_full=False):
    """`steps`: None (the dense model), a list of steps, or a recipe mapping with `steps` (and e.g. `recover`)."""
    # Rows of another model than the default go to a folder of their own (a row name is not unique across models).
    root = out_root if model == "smollm2-135m" else out_root / Path(model).name
    out = root / f"{table}-{name.replace(' ', '_').replace('%', 'pct').replace(':', '-')}"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    if steps is None:
        cmd = [sys.executable, "-m", "lmcompose.cli", "eval", "--model", model, "--protocol", protocol,
               "--json", str(out) + ".json", *extra]
    else:
        recipe = {"calibration": calib, **(steps if isinstance(steps, dict) else {"steps": steps})}
        rfile = Path(tempfile.mkstemp(suffix=".yaml")[1])
        rfile.write_text(yaml.safe_dump(recipe))
        cmd = [sys.executable, "-m", "lmcompose.cli", "compress", "--model", model, "--recipe", str(rfile),
               "--out", str(out), "--overwrite", "--eval", protocol, *extra]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return {"row": name, "error": proc.stderr[-500:]}
    full = full_eval(model if steps is None else str(out), out, env) if with_full else {}
    row = {"table": table, "row": name, "model": model, "protocol_name": protocol,
           "command": " ".join(["lmcompose", *cmd[3:]]), "machine": machine(),
           "date": dt.date.today().isoformat(), "process_seconds": round(time.perf_counter() - t0, 1)}
    if steps is None:
        res = json.loads(Path(str(out) + ".json").read_text())
        row.update(ppl=res["ppl"], protocol=res["protocol"], bits_per_weight=16.0, recipe=None, **full)
        row.update(dense_bytes(model))
        return row
    from lmcompose.models.checkpoint import file_tensor_bytes

    rep = json.loads((out / "report.json").read_text())
    file_bytes = file_tensor_bytes(out)  # the run directory: model.safetensors, or shards (--stream)
    row.update(ppl=rep["evaluation"].get("ppl"), protocol=rep["evaluation"].get("protocol"),
               bits_per_weight=rep["summary"]["bits_per_weight"], ratio=rep["summary"]["ratio_of_fp16"],
               total_bytes=rep["total_bytes"], file_tensor_bytes=file_bytes,
               bytes_match=abs(file_bytes - rep["total_bytes"]) <= 0.01 * file_bytes,
               compress_seconds=round(rep["wall_seconds"], 1),
               seconds_per_block=rep["summary"]["seconds_per_block"],
               peak_rss_mib=rep["summary"]["peak_rss_mib"], mean_rel_error=rep["summary"]["mean_rel_error"],
               knobs=[{k: v for k, v in s.items() if k not in ("rel_error", "seconds")}
                      for s in rep["layers"][0]["steps"]],
               recipe=recipe, compute_dtype=rep.get("environment", {}).get("compute_dtype"), **full)
    if rep.get("recovery"):
        row["recovery"] = rep["recovery"]
    if rep.get("transforms"):
        row["transforms"] = rep["transforms"]
    row["step_seconds"] = step_seconds(rep)
    return row


def step_seconds(rep: dict) -> dict:
    """Seconds each step of a run spent, summed over the Linears; a block step's time (`block_seconds`, the
    same on every Linear of the block) once per block."""
    out, blocks = {}, set()
    for layer in rep["layers"]:
        block = layer["name"].rsplit(".", 2)[0]
        for s in layer.get("steps", []):
            name = s.get("technique", "?")
            if "block_seconds" in s:
                if (name, block) in blocks:
                    continue
                blocks.add((name, block))
            out[name] = out.get(name, 0.0) + s.get("block_seconds", s.get("seconds", 0.0))
    return {k: round(v, 1) for k, v in out.items()}


def dense_bytes(model):
    from lmcompose.models.load import model_linear_shapes

    shapes, other = model_linear_shapes(model, float_dtype="fp16")
    linear = sum(2 * o * i for o, i in shapes.values())
    return {"total_bytes": linear + other, "ratio": 1.0}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--table", choices=sorted(TABLES), default="foundation")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--protocol", default="quick")
    p.add_argument("--only", nargs="*", help="row names to run (default all)")
    p.add_argument("--tag", default="", help="suffix for the results file (e.g. full)")
    p.add_argument("--out-root", default=str(Path(tempfile.gettempdir()) / "lmcompose-bench"))
    p.add_argument("--calib-n", type=int, default=128, help="calibration windows of 512 C4 tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    p.add_argument("--full", nargs="*", default=None,
                   help="also evaluate these rows (none given: the table's headline rows) on the full protocol")
    p.add_argument("--list", action="store_true")
    p.add_argument("extra", nargs="*", help="extra CLI args after --")
    args = p.parse_args(argv)
    rows = TABLES[args.table]()
    if args.list:
        print("\n".join(rows))
        return 0
    RESULTS.mkdir(exist_ok=True)
    Path(args.out_root).mkdir(parents=True, exist_ok=True)
    model_tag = args.model.replace("/", "_")
    if args.max_tokens:
        args.extra = [*args.extra, "--max-tokens", str(args.max_tokens)]
        args.tag = f"-t{args.max_tokens}{args.tag}"
    dest = RESULTS / f"{args.table}-{model_tag}-{args.protocol}-c4x{args.calib_n}{args.tag}.jsonl"
    for name, steps in rows.items():
        if args.only and name not in args.only:
            continue
        with_full = args.full is not None and name in (args.full or HEADLINE)
        row = run_row(args.table, name, steps, args.model, args.protocol, Path(args.out_root), args.extra,
                      {**C4, "n": args.calib_n}, with_full)
        with dest.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("row", "ppl", "ppl_full", "bits_per_weight", "compress_seconds",
                                                  "peak_rss_mib", "bytes_match", "error")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
