"""Quantize SmolLM2-135M with one peer tool and evaluate it under lmcompose's perplexity protocol.

Runs ONLY in the scratch peer environment (see README.md here): llm-compressor, AutoRound and
compressed-tensors are imported from that environment and are never dependencies of lmcompose. lmcompose
itself is imported from this checkout's ``src/`` (put on ``sys.path`` below), for three things only: the
perplexity protocol (`lmcompose.eval.perplexity.perplexity`), the byte count of a quantized tensor
(`lmcompose.algebra.quant.quantized_nbytes`) and nothing else.

What one run does:

1. loads the dequantized SmolLM2 directory (``--model-dir``) with the peer's transformers, in its own
   dtype (fp32), and the calibration windows lmcompose calibrates on (``make_windows.py``: 128 x 512 C4
   token ids, seed 0; their sha256 is checked);
2. quantizes every Linear inside the decoder blocks (lm_head and embeddings stay dense) with the peer
   method (``--method``: gptq / awq through llm-compressor ``oneshot``, autoround through AutoRound),
   optionally after the peer's own rotation (``--transform``: quip / spinquant, llm-compressor
   modifiers), group size ``--group-size``, asymmetric unless ``--symmetric``;
3. checks the quantization really happened (distinct values per group of the weight the forward uses)
   and counts the bytes the way lmcompose counts its own (codes at ``bits`` bits, one fp16 scale per
   group, a ``bits``-bit zero point per group when asymmetric, plus the peer's online transform
   matrices);
4. casts the in-memory model (fake-quantized weights, the peer's forward and transform hooks left in
   place) to the evaluation dtype (bf16 by default, as lmcompose's benchmark tables) and evaluates
   ``--protocols`` (quick / full) with lmcompose's perplexity function;
5. appends one JSON line to ``--out-jsonl`` (an error line when the peer method fails).

Example (from the repository root, one thread, see run_all.sh for the whole series)::

    OMP_NUM_THREADS=1 /tmp/peers/bin/python benchmarks/peers/run_peer.py --method gptq --bits 3 \\
        --group-size 64 --transform quip --out-jsonl benchmarks/results/peers-smollm2-135m.jsonl \\
        --protocols quick full
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# lmcompose's source: this checkout's src/, or a frozen copy of it (run_all.sh snapshots src/ once so that
# edits made to the working tree during an hours-long series cannot change the protocol half-way).
SRC = Path(os.environ.get("LMCOMPOSE_SRC", str(REPO / "src")))
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench  # noqa: E402  (benchmarks/bench.py: the machine line)
import torch  # noqa: E402

WINDOWS = "/tmp/peers_data/c4-n128-s512-seed0.safetensors"
DATA_DIR = "/work/shared/data"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg: str) -> None:
    print(f"[run_peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lmcompose_source() -> dict:
    import subprocess

    out = {"path": str(SRC)}
    try:
        out["repo_head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                          text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        out["repo_head"] = None
    for rel in ("lmcompose/eval/perplexity.py", "lmcompose/runtime/logits.py", "lmcompose/data/calibration.py",
                "lmcompose/data/text.py", "lmcompose/algebra/quant.py"):
        f = SRC / rel
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else None
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name, mod in [("torch", "torch"), ("transformers", "transformers"), ("llmcompressor", "llmcompressor"),
                      ("auto_round", "auto_round"), ("compressed_tensors", "compressed_tensors"),
                      ("datasets", "datasets")]:
        try:
            out[name] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - a missing peer is recorded, not fatal
            out[name] = f"unavailable: {type(err).__name__}"
    return out


def machine() -> str:
    """The machine line of benchmarks/bench.py, plus the thread settings a peer run was measured under."""
    return (f"{bench.machine()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"torch threads={torch.get_num_threads()}")


def load_windows(path: str, n: int | None) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        ids = f.get_tensor("input_ids")
    digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
    if meta.get("sha256") and meta["sha256"] != digest:
        raise ValueError(f"{path}: sha256 {digest} differs from the recorded {meta['sha256']}")
    info = {"file": path, **meta, "sha256_checked": digest}
    if n is not None and n < ids.shape[0]:
        ids = ids[:n]
        info["used_n"] = n
    return ids, info


def decoder_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """Every nn.Linear inside the decoder blocks (what lmcompose compresses); lm_head excluded."""
    out = []
    for i, block in enumerate(model.model.layers):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out.append((f"model.layers.{i}.{name}", mod))
    return out


# ---------------------------------------------------------------------------------------------- quantize

def quantize_llmcompressor(model, tokenizer, ids, args) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, QuIPModifier, SpinQuantModifier

    weights = None if args.bits is None else QuantizationArgs(num_bits=args.bits, type="int", strategy="group", group_size=args.group_size,
                               symmetric=args.symmetric, dynamic=False)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    recipe, described = [], []
    if args.transform == "quip":
        # QuIP / QuIP#: random Hadamard on the input (v) and output (u) side of every Linear; two of the four
        # rotations are fused into the weights, the other two run online (forward hooks) at inference.
        recipe.append(QuIPModifier(rotations=["v", "u"], transform_type="random-hadamard"))
    elif args.transform == "spinquant":
        # R1 (residual stream) + R2 (per head, v_proj/o_proj) are fused into weights; R4 (down_proj input)
        # is online. "hadamard" is Sylvester-only (power-of-2 sizes): hidden 576 = 9 x 64 and intermediate
        # 1536 = 24 x 64, so the rotation is block-diagonal with 64-wide blocks, as in llm-compressor's own
        # examples/transform/spinquant_example.py (transform_block_size=64).
        recipe.append(SpinQuantModifier(rotations=args.spin_rotations, transform_type="hadamard",
                                        transform_block_size=args.spin_block))
    if args.method == "gptq":
        recipe.append(GPTQModifier(config_groups=groups, ignore=["lm_head"]))  # default actorder ("static")
    elif args.method == "sparsegpt":  # unstructured, as lmcompose's `sparsegpt: {sparsity: S}`
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        recipe.append(SparseGPTModifier(sparsity=args.sparsity, mask_structure="0:0", ignore=["lm_head"]))
    elif args.method == "awq":
        recipe += [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    else:
        raise ValueError(args.method)
    for mod in recipe:
        described.append({"modifier": type(mod).__name__,
                          "args": json.loads(mod.model_dump_json(exclude={"config_groups", "transform_config"},
                                                                 exclude_none=True, round_trip=False))})
    if args.cpu_pin_workaround and not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (IntermediatesCache.pin_memory), which raises
        # "Cannot access accelerator device when none is available" on a CPU-only torch. Pinning only speeds
        # up host-to-device copies; skipping it changes no arithmetic.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=n,
            max_seq_length=seqlen, shuffle_calibration_samples=False)
    return {"recipe": described, "weight_args": None if weights is None else json.loads(weights.model_dump_json())}


def quantize_autoround(model, tokenizer, ids, args) -> tuple[object, dict]:
    from auto_round import AutoRound

    n, seqlen = ids.shape
    dataset = [ids[i:i + 1].clone() for i in range(n)]  # a list of [1, seqlen] token-id tensors
    kw = dict(bits=args.bits, group_size=args.group_size, sym=args.symmetric, iters=args.iters, nsamples=n,
              seqlen=seqlen, dataset=dataset, device_map="cpu")
    if args.lr is not None:
        kw["lr"] = args.lr
    ar = AutoRound(model, tokenizer, **kw)
    ar.quantize()
    qmodel = ar.model
    info = {"autoround_kwargs": {k: v for k, v in kw.items() if k != "dataset"},
            "dataset": f"list of {n} LongTensor[1, {seqlen}] (the lmcompose windows)"}
    for attr in ("amp", "amp_dtype", "batch_size", "lr", "minmax_lr", "enable_minmax_tuning",
                 "enable_quanted_input", "gradient_accumulate_steps", "seed"):
        for holder in (ar, getattr(ar, "model_context", None), getattr(ar, "quantize_config", None)):
            if holder is not None and hasattr(holder, attr):
                info[attr] = str(getattr(holder, attr))
                break
    return qmodel, info


# ----------------------------------------------------------------------------------------------- inspect

def compare_seen(seen: list, ids: torch.Tensor) -> dict:
    """Did the peer feed the model exactly our windows? (rows seen by the input embedding, in order)"""
    if not seen:
        return {"rows_seen": 0, "note": "the embedding's forward was not observed"}
    rows = [r for t in seen for r in t]
    want = {hashlib.sha1(r.numpy().tobytes()).hexdigest(): i for i, r in enumerate(ids)}
    got = [want.get(hashlib.sha1(r.to(torch.int64).numpy().tobytes()).hexdigest(), -1) for r in rows]
    distinct = sorted(set(g for g in got if g >= 0))
    return {"rows_seen": len(rows), "row_length": int(rows[0].numel()), "rows_not_ours": sum(g < 0 for g in got),
            "distinct_windows_seen": len(distinct), "all_windows_seen": len(distinct) == ids.shape[0],
            "first_pass_in_our_order": got[:ids.shape[0]] == list(range(ids.shape[0]))}


def distinct_per_group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group_size, group_size)
    s = g.sort(-1).values
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)


@torch.no_grad()
def effective_weight(mod) -> tuple[torch.Tensor, bool]:
    """The weight the module's forward multiplies by, and whether it is fake-quantized on the fly."""
    scheme = getattr(mod, "quantization_scheme", None)
    if scheme is not None and getattr(scheme, "weights", None) is not None and hasattr(mod, "weight_scale"):
        from compressed_tensors.quantization import fake_quantize

        zp = getattr(mod, "weight_zero_point", None)
        return fake_quantize(mod.weight.data, mod.weight_scale, zp, scheme.weights), True
    return mod.weight.data, False


@torch.no_grad()
def inspect_quantization(model, args) -> dict:
    linears = decoder_linears(model)
    levels = 2 ** args.bits
    max_distinct, over, groups, on_the_fly, stored_diff, n_weights = 0, 0, 0, 0, 0.0, 0
    example = None
    for name, mod in linears:
        w_eff, fly = effective_weight(mod)
        on_the_fly += int(fly)
        if fly:
            stored_diff = max(stored_diff, float((mod.weight.data.float() - w_eff.float()).abs().max()
                                                 / mod.weight.data.float().abs().max()))
        d = distinct_per_group(w_eff, args.group_size)
        max_distinct = max(max_distinct, int(d.max()))
        over += int((d > levels).sum())
        groups += d.numel()
        n_weights += w_eff.numel()
        if example is None:
            example = {"layer": name, "shape": list(w_eff.shape), "distinct_first_groups": d.flatten()[:8].tolist(),
                       "mean_distinct": float(d.float().mean())}
    return {"n_linears": len(linears), "n_weights": n_weights, "groups": groups, "levels": levels,
            "max_distinct_per_group": max_distinct, "groups_over_levels": over,
            "linears_fake_quantized_in_forward": on_the_fly,
            "max_rel_diff_stored_vs_forward_weight": stored_diff, "example": example,
            "really_quantized": over == 0 and groups > 0}


def transforms_of(model) -> dict:
    """The peer's transform modules left in the model (online rotations; fused ones are deleted)."""
    try:
        from compressed_tensors.transform.factory.base import TransformBase
    except ImportError:
        return {"online": [], "unique_matrices": []}
    online, unique = [], {}
    for name, mod in model.named_modules():
        if isinstance(mod, TransformBase):
            w = mod.weight
            loc = str(getattr(mod.args.location, "value", mod.args.location))
            online.append({"module": name, "location": loc, "inverse": bool(mod.args.inverse),
                           "size": int(w.shape[0]), "dtype": str(w.dtype).replace("torch.", "")})
            unique.setdefault(id(w), {"size": int(w.shape[0]), "dtype": str(w.dtype).replace("torch.", ""),
                                      "kind": type(mod).__name__, "uses": 0})
            unique[id(w)]["uses"] += 1
    by_loc: dict = {}
    for o in online:
        key = f"{o['location']}{'(inverse)' if o['inverse'] else ''} size {o['size']}"
        by_loc[key] = by_loc.get(key, 0) + 1
    return {"n_online": len(online), "online_by_location": by_loc, "unique_matrices": list(unique.values())}


def count_bytes(model, args, transforms: dict, scheme_kind: str) -> dict:
    from lmcompose.algebra.quant import QuantSpec, quantized_nbytes

    spec = QuantSpec(bits=args.bits, group_size=args.group_size, symmetric=args.symmetric, scale_dtype="fp16")
    linear_bytes, n_weights, bias_bytes = 0, 0, 0
    for _, mod in decoder_linears(model):
        rows, cols = mod.weight.shape
        linear_bytes += quantized_nbytes(rows, cols, spec)
        n_weights += rows * cols
        if getattr(mod, "bias", None) is not None:
            bias_bytes += mod.bias.numel() * 2
    # Online transforms as the peer's checkpoint keeps them: one full n x n matrix per distinct transform
    # (counted at 2 bytes per entry, like every float tensor here). Lower bound: a random Hadamard is a fixed
    # Hadamard times a random +-1 diagonal (n bits to store); a Sylvester Hadamard is regenerated (0 bytes).
    t_full = sum(m["size"] ** 2 * 2 for m in transforms.get("unique_matrices", []))
    t_min = sum((m["size"] + 7) // 8 for m in transforms.get("unique_matrices", []) if scheme_kind == "random-hadamard")
    total = linear_bytes + bias_bytes + t_full
    return {"spec": spec.to_dict(), "n_weights": n_weights, "linear_bytes": linear_bytes + bias_bytes,
            "transform_bytes": t_full, "transform_bytes_min": t_min, "total_bytes": total,
            "bits_per_weight": 8 * total / n_weights,
            "bits_per_weight_without_transforms": 8 * (linear_bytes + bias_bytes) / n_weights,
            "bits_per_weight_transforms_min": 8 * (linear_bytes + bias_bytes + t_min) / n_weights}


def peer_checkpoint_bytes(model, tokenizer) -> dict:
    """Save with the peer's own compressed format and read the safetensors header back (informative)."""
    from safetensors import safe_open

    tmp = Path(tempfile.mkdtemp(prefix="peer_ckpt_", dir="/tmp/peers_data"))
    try:
        model.save_pretrained(tmp, save_compressed=True)
        cats: dict = {}
        dtypes: dict = {}
        for f in sorted(tmp.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_slice(key)
                    shape = t.get_shape()
                    dt = t.get_dtype()
                    nbytes = int(torch.tensor(shape).prod().item() if shape else 1) * \
                        {"F64": 8, "F32": 4, "I32": 4, "I64": 8, "F16": 2, "BF16": 2, "I8": 1, "U8": 1,
                         "I16": 2, "BOOL": 1}.get(dt, 4)
                    if ".layers." in key and any(p in key for p in ("_proj.", "_proj_")):
                        leaf = key.split(".")[-1]
                        if "_input" in key or "_output" in key:
                            cat = "decoder_transforms"
                        else:
                            cat = f"decoder_linear.{leaf}"
                    elif ".layers." in key:
                        cat = "decoder_other"
                    else:
                        cat = key.split(".")[-2] + "." + key.split(".")[-1] if "." in key else key
                    cats[cat] = cats.get(cat, 0) + nbytes
                    dtypes.setdefault(cat, dt)
        cfg = json.loads((tmp / "config.json").read_text())
        qcfg = cfg.get("quantization_config", {})
        return {"bytes_by_kind": cats, "dtype_by_kind": dtypes,
                "decoder_linear_bytes": sum(v for k, v in cats.items() if k.startswith("decoder_linear")),
                "format": qcfg.get("format"), "quant_method": qcfg.get("quant_method")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, choices=["dense", "gptq", "awq", "autoround", "sparsegpt"])
    ap.add_argument("--sparsity", type=float, default=0.5, help="--method sparsegpt: unstructured sparsity")
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric, as lmcompose)")
    ap.add_argument("--transform", default="none", choices=["none", "quip", "spinquant"])
    ap.add_argument("--spin-rotations", nargs="+", default=["R1", "R2", "R4"])
    ap.add_argument("--spin-block", type=int, default=64)
    ap.add_argument("--cpu-pin-workaround", action="store_true",
                    help="make llm-compressor's activation-cache pin_memory a no-op on CPU-only torch (AWQ)")
    ap.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per block")
    ap.add_argument("--lr", type=float, default=None,
                    help="AutoRound learning rate (default: its own, 1/iters); its 'light' recipe is iters 50, lr 5e-3")
    ap.add_argument("--out-jsonl", required=True)
    ap.add_argument("--protocols", nargs="*", default=["quick", "full"], choices=["quick", "full"])
    ap.add_argument("--eval-dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--model-dir", default=None,
                    help="the model directory (default: the one make_windows.py recorded in the windows' metadata)")
    ap.add_argument("--windows", default=WINDOWS)
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--calib-n", type=int, default=None, help="debug: use only the first N windows")
    ap.add_argument("--max-windows", type=int, default=None, help="debug: evaluate only N windows")
    ap.add_argument("--no-checkpoint-check", action="store_true")
    ap.add_argument("--label", default=None)
    args = ap.parse_args()
    if args.method not in ("dense", "sparsegpt") and args.bits is None:
        ap.error("--bits is required unless --method dense or sparsegpt")
    if args.method in ("autoround", "dense") and args.transform != "none":
        ap.error("--transform applies to the llm-compressor methods (gptq, awq) only")

    if args.model_dir is None:  # the directory lmcompose resolved the model to when it made the windows
        from safetensors import safe_open
        with safe_open(args.windows, framework="pt") as f:
            args.model_dir = f.metadata()["model_dir"]
    from lmcompose.eval.perplexity import get_protocol, perplexity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    row: dict = {
        "label": args.label or "-".join(filter(None, [args.method, f"w{args.bits}" if args.bits else None,
                                                       f"g{args.group_size}" if args.bits else None,
                                                       None if args.transform == "none" else args.transform])),
        "method": args.method, "bits": args.bits, "group_size": args.group_size if args.bits else None,
        "symmetric": args.symmetric if args.bits else None,
        "transforms": None if args.transform == "none" else args.transform,
        "model_dir": args.model_dir, "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                                                     sys.executable, *sys.argv]),
        "versions": versions(), "lmcompose_src": lmcompose_source(),
        "debug": bool(args.calib_n or args.max_windows),
    }
    if args.method == "autoround":
        row["iters"] = args.iters
        row["lr"] = args.lr
    if args.cpu_pin_workaround:
        row["workaround"] = "llmcompressor IntermediatesCache.pin_memory made a no-op (CPU-only torch)"
    t_start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="auto").eval()
        row["load_dtype"] = str(model.dtype).replace("torch.", "")
        if args.method != "dense":
            ids, calib = load_windows(args.windows, args.calib_n)
            row["calibration"] = calib
            seen: list = []
            hook = model.get_input_embeddings().register_forward_pre_hook(
                lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).cpu().clone()))
            t0 = time.perf_counter()
            try:
                if args.method == "autoround":
                    model, row["peer_config"] = quantize_autoround(model, tokenizer, ids, args)
                else:
                    row["peer_config"] = quantize_llmcompressor(model, tokenizer, ids, args)
            finally:
                hook.remove()
            row["quant_seconds"] = round(time.perf_counter() - t0, 1)
            row["calibration_seen"] = compare_seen(seen, ids)
            log(f"calibration ids seen by the embedding: {json.dumps(row['calibration_seen'])}")
            log(f"quantized in {row['quant_seconds']} s")
            model.eval()
            row["quantized_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
            if args.method == "sparsegpt":
                zeros = sum(int((m.weight == 0).sum()) for _, m in decoder_linears(model))
                total = sum(m.weight.numel() for _, m in decoder_linears(model))
                row["verification"] = {"sparsity": zeros / total}
                row["sparsity"] = args.sparsity
                log(f"verification: {json.dumps(row['verification'])}")
        if args.method not in ("dense", "sparsegpt"):
            row["verification"] = inspect_quantization(model, args)
            log(f"verification: {json.dumps(row['verification'])}")
            tr = transforms_of(model)
            row["online_transforms"] = tr
            kind = "random-hadamard" if args.transform == "quip" else ("hadamard" if args.transform else None)
            row["bytes"] = count_bytes(model, args, tr, kind)
            row["bits_per_weight"] = round(row["bytes"]["bits_per_weight"], 4)
            row["linear_bytes"] = row["bytes"]["total_bytes"]
            log(f"bytes: {json.dumps(row['bytes'])}")
        row["peak_rss_mib_after_quant"] = round(peak_rss_mib(), 1)
    except Exception as err:  # noqa: BLE001 - recorded in the jsonl, the series goes on
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()[-6000:]
        row["seconds_until_error"] = round(time.perf_counter() - t_start, 1)
        row["peak_rss_mib"] = round(peak_rss_mib(), 1)
        log(f"FAILED: {row['error']}\n{row['traceback']}")
        append(args.out_jsonl, row)
        return 1

    # Evaluation: the in-memory model, its forward (on-the-fly fake quantization for compressed-tensors
    # modules) and transform hooks left as the peer set them; everything cast to the evaluation dtype.
    try:
        model = model.to(DTYPES[args.eval_dtype])
        row["eval_dtype"] = args.eval_dtype
        if args.method not in ("dense", "autoround", "sparsegpt"):
            row["verification_eval_dtype"] = inspect_quantization(model, args)
        row["ppl"], row["eval_seconds"], row["protocols"] = {}, {}, {}
        for name in args.protocols:
            proto = get_protocol(name, **({"max_windows": args.max_windows} if args.max_windows else {}))
            res = perplexity(model, tokenizer, proto, data_dir=args.data_dir)
            row["ppl"][name] = round(res.ppl, 4)
            row[f"{name}_ppl"] = round(res.ppl, 4)
            row["eval_seconds"][name] = round(res.seconds, 1)
            row["protocols"][name] = {**res.protocol, "n_tokens": res.n_tokens, "n_windows": res.n_windows}
            log(f"{name}: ppl {res.ppl:.4f} over {res.n_tokens} tokens in {res.seconds:.1f} s")
    except Exception as err:  # noqa: BLE001
        row["error"] = f"evaluation: {type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc()[-6000:]
        log(f"FAILED: {row['error']}\n{row['traceback']}")
    if args.method in ("gptq", "awq") and not args.no_checkpoint_check and "error" not in row:
        try:
            row["peer_checkpoint"] = peer_checkpoint_bytes(model, tokenizer)
            log(f"peer checkpoint: {json.dumps(row['peer_checkpoint'])}")
        except Exception as err:  # noqa: BLE001 - informative only
            row["peer_checkpoint"] = {"error": f"{type(err).__name__}: {err}"}
    row["total_seconds"] = round(time.perf_counter() - t_start, 1)
    row["peak_rss_mib"] = round(peak_rss_mib(), 1)
    append(args.out_jsonl, row)
    del model
    gc.collect()
    return 1 if "error" in row else 0


def append(path: str, row: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
