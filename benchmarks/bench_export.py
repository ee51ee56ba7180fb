"""Export benchmark rows for BENCHMARKS.md: compositions leave lmcompose and load back elsewhere.

Each row compresses the model with one recipe (in this process), measures its quick-protocol perplexity,
then exports it to compressed-tensors and to GGUF, loads each export back with transformers (the
compressed-tensors loader; the GGUF loader with ``gguf_file=``), and records per format: the file bytes, the
bytes the Linears take in the file beside our bytes, the largest logit difference against our model on a
few evaluation windows, and the re-loaded model's quick-protocol perplexity beside ours. One JSON line per
(row, format) goes to ``benchmarks/export/export-<model>.jsonl``; ``render.py`` turns it into the
``export-<model>`` table of BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py                        # every row, SmolLM2-135M
    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --only "gptq w4 g64"   # one row
    python benchmarks/bench_export.py --list
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the benchmarks folder: its machine description)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "export"

GPTQ = {"bits": 4, "group_size": 64, "symmetric": True, "act_order": True, "static_groups": True}
ROWS = {
    "gptq w4 g64": [{"gptq": GPTQ}],
    "sparsegpt 2:4 + gptq w4 g64": [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": GPTQ}],
    "wanda 50% + rtn w8 g64": [{"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 8, "group_size": 64, "symmetric": True}}],
    # sensitivity allocation of GPTQ's bytes: 2- to 8-bit Linears at the bytes of ~4-bit codes
    "gptq mixed bits (sensitivity, 25% of fp16 bytes) g64": [
        {"gptq": {"ratio": 0.25, "allocation": "sensitivity", "group_size": 64, "symmetric": True,
                  "act_order": True, "static_groups": True}}],
}
FORMATS = ("compressed-tensors", "gguf")


def machine() -> str:
    return (f"{bench.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"torch threads={torch.get_num_threads()}")


@torch.no_grad()
def max_logit_diff(a, b, windows: torch.Tensor) -> float:
    out = 0.0
    for w in windows:
        la = a(input_ids=w[None], use_cache=False).logits.float()
        lb = b(input_ids=w[None], use_cache=False).logits.float()
        out = max(out, float((la - lb).abs().max()))
    return out


def reload(fmt: str, path: Path):
    from transformers import AutoModelForCausalLM

    if fmt == "gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # the default load: each config group's scheme on its targets (dequantize=True would decode every Linear
    # with the first group's scheme in transformers 5.25, wrong for mixed bits); symmetric grids only
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_row(name, steps, model_name, protocol, calib_n, work: Path, out_file: Path) -> None:
    from lmcompose import Recipe, compress
    from lmcompose.data.calibration import calibration_windows, eval_tokens
    from lmcompose.eval.perplexity import perplexity, windows_of
    from lmcompose.models.export.compressed_tensors import export_compressed_tensors
    from lmcompose.models.export.gguf import export_gguf
    from lmcompose.models.load import load_model

    model, tok = load_model(model_name)
    recipe = {"calibration": {"source": "c4", "n": calib_n, "seqlen": 512, "seed": 0, "batch_size": 8}, "steps": steps}
    t0 = time.time()
    calib = calibration_windows(tok, "c4", n=calib_n, seqlen=512, seed=0)
    compress(model, Recipe.from_dict(recipe), calib, model_name=model_name)
    compress_s = time.time() - t0
    ppl_ours = perplexity(model, tok, protocol).ppl
    probe = windows_of(eval_tokens(tok), protocol)[:2]
    base = {"row": name, "model": model_name, "recipe": recipe, "protocol": protocol.model_dump(),
            "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "compress_seconds": round(compress_s, 1), "ppl_ours": ppl_ours,
            "command": " ".join(["python", "benchmarks/bench_export.py", "--only", json.dumps(name)])}
    for fmt in FORMATS:
        row = dict(base, format=fmt)
        try:
            t0 = time.time()
            if fmt == "gguf":
                summary = export_gguf(model, work / f"{name}.gguf".replace(" ", "_").replace("/", "-"), tok,
                                      overwrite=True)
            else:
                summary = export_compressed_tensors(model, work / name.replace(" ", "_").replace("/", "-"), tok,
                                                    overwrite=True)
            row["export_seconds"] = round(time.time() - t0, 1)
            back = reload(fmt, summary.path)
            row.update(file_bytes=summary.file_bytes, linear_file_bytes=summary.layer_file_bytes,
                       linear_our_bytes=summary.our_bytes,
                       stored={k: v["linears"] for k, v in summary.by_stored().items()}, notes=summary.notes,
                       logits_max_diff=max_logit_diff(model, back, probe),
                       ppl_reloaded=perplexity(back, tok, protocol).ppl)
            del back
        except Exception as err:  # noqa: BLE001 - a failed export is a row of the table, with its reason
            row["error"] = f"{type(err).__name__}: {err}"
        print(json.dumps({k: row.get(k) for k in ("row", "format", "ppl_ours", "ppl_reloaded", "logits_max_diff",
                                                   "file_bytes", "linear_our_bytes", "error")}), flush=True)
        with out_file.open("a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--only", action="append", help="row name (repeatable); default: every row")
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=None, help="override the quick protocol's window count")
    p.add_argument("--out-jsonl", type=Path, default=None,
                   help="results file (default benchmarks/export/export-<model>.jsonl, what render.py reads)")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, steps in ROWS.items():
            print(f"{name}: {json.dumps(steps)}")
        return 0
    from lmcompose.eval.perplexity import get_protocol

    unknown = [r for r in args.only or [] if r not in ROWS]
    if unknown:
        print(f"unknown rows {unknown}; rows: {list(ROWS)}", file=sys.stderr)
        return 2
    protocol = get_protocol("quick", **({"max_windows": args.max_windows} if args.max_windows else {}))
    out_file = args.out_jsonl or RESULTS / f"export-{Path(args.model).name}.jsonl"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        for name in args.only or list(ROWS):
            run_row(name, ROWS[name], args.model, protocol, args.calib_n, Path(tmp), out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
