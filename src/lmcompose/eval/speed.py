"""`lmcompose bench-speed`: prefill and decode throughput and peak memory, dense vs compressed.

Every model (the dense baseline, then the compressed one under each inference policy of
`lmcompose.runtime.inference`) is measured in a fresh process, so that peak RSS belongs to it alone:
prefill tokens/s, decode tokens/s (greedy, KV cache, batch 1) and memory, each timing the median of
`repeats` runs after `warmup` runs. Thread count and CPU affinity are recorded with the numbers.

Method notes: docs/methods/inference.md

Example::

    lmcompose bench-speed --model runs/smollm2-rtn4 --dense smollm2-135m --prompt-len 256 --new-tokens 64
        --dtype bf16 --device cpu --policy auto dense --json speed.json
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import resource
import time
from pathlib import Path

import torch

from ..runtime.inference import (
    InferencePolicy,
    held_nbytes,
    measure_csr_threshold,
    median_seconds,
    prepare_inference,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _decode_seconds(model, prompt: torch.Tensor, new_tokens: int, device) -> float:
    """Seconds for `new_tokens` greedy steps with the KV cache (the prefill that builds it is not timed)."""
    out = model(input_ids=prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def bench_model(model, prompt_len: int = 256, new_tokens: int = 64, batch_sizes=(1, 8), repeats: int = 5,
                warmup: int = 1, seed: int = 0) -> dict:
    """Prefill tokens/s per batch size, batch-1 decode tokens/s, and CUDA peak memory of a loaded model."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = {}
    with torch.inference_mode():
        for b in batch_sizes:
            ids = torch.randint(vocab, (b, prompt_len), generator=gen).to(device)
            seconds = median_seconds(lambda: model(input_ids=ids, use_cache=False), repeats, warmup, device)
            prefill[str(b)] = b * prompt_len / seconds
    prompt = torch.randint(vocab, (1, prompt_len), generator=gen).to(device)
    for _ in range(warmup):
        _decode_seconds(model, prompt, min(new_tokens, 4), device)
    decode = sorted(_decode_seconds(model, prompt, new_tokens, device) for _ in range(repeats))[repeats // 2]
    out = {"prefill_tok_s": prefill, "decode_tok_s": new_tokens / decode}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def _cpu_name() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: no name recorded
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_one(job: dict) -> dict:
    """Load one model, set its inference paths, benchmark it. `job` is plain data (it crosses processes)."""
    from ..models.load import load_any

    t0 = time.perf_counter()
    model, _ = load_any(job["model"], job["dtype"], job["device"], job.get("trust_remote_code", False),
                        verify=job.get("verify", True))
    load_seconds = time.perf_counter() - t0
    policy = job.get("policy")
    modes: dict[str, int] = {}
    if policy is not None:
        for mode in prepare_inference(model, InferencePolicy(**policy)).values():
            modes[mode] = modes.get(mode, 0) + 1
    rss_loaded = _rss_bytes()
    result = bench_model(model, job["prompt_len"], job["new_tokens"], tuple(job["batch_sizes"]), job["repeats"],
                         job["warmup"], job.get("seed", 0))
    return {"label": job["label"], "model": job["model"], "policy": policy, "paths": modes,
            "load_seconds": load_seconds, **result, "rss_after_load_bytes": rss_loaded,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "held_bytes": held_nbytes(model)}


def _child(job, queue):
    try:
        queue.put(("ok", run_one(job)))
    except Exception as err:  # reported to the parent, which raises it
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(job: dict) -> dict:
    """`run_one` in a fresh spawned process, so that peak RSS is this model's alone."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"benchmark process for {job['label']} exited with code {proc.exitcode} "
                                   "before reporting (a script that calls bench_speed needs an "
                                   "`if __name__ == '__main__':` guard)") from None
    proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmark of {job['label']} failed: {payload}")
    return payload


def policy_presets() -> dict[str, dict]:
    """Named inference policies for the command line: the structure-using default, the old forward
    (everything cached dense, low rank factored), and the least-memory one."""
    return {"auto": {}, "dense": {"quant": "dense", "sparse": "dense", "lowrank": "factored"},
            "dequant": {"quant": "dequant"}, "kernel": {"quant": "kernel", "sparse": "csr"}}


def bench_speed(model: str, dense: str | None = None, policies=("auto", "dense"), prompt_len: int = 256,
                new_tokens: int = 64, batch_sizes=(1, 8), dtype: str = "fp32", device: str = "cpu",
                repeats: int = 5, warmup: int = 1, isolate: bool = True, trust_remote_code: bool = False,
                verify: bool = True) -> dict:
    """Benchmark the dense model (if given) and `model` under each named policy (see `policy_presets`).
    `verify`: check the checksums of run directories and cached GGUF copies as they load (CLI: ``--no-verify``)."""
    from ..models.checkpoint import META_FILE, read_metadata

    if prompt_len < 1 or new_tokens < 1 or repeats < 1 or warmup < 0 or not batch_sizes:
        raise ValueError(f"prompt_len={prompt_len}, new_tokens={new_tokens}, repeats={repeats} must be >= 1, "
                         f"warmup={warmup} >= 0 and batch_sizes={batch_sizes} non-empty")
    presets = policy_presets()
    unknown = [p for p in policies if p not in presets]
    if unknown:
        raise ValueError(f"policies={unknown} are not allowed; allowed: {sorted(presets)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is present")
    meta_path = Path(model) / META_FILE
    if dense is None and meta_path.is_file():
        dense = read_metadata(model).get("base_model")  # a damaged lmcompose.json: CheckpointError
    common = {"dtype": dtype, "device": device, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup,
              "trust_remote_code": trust_remote_code, "verify": verify}
    jobs = [] if dense is None else [{**common, "label": "dense", "model": dense, "policy": None}]
    jobs += [{**common, "label": f"compressed/{p}", "model": model, "policy": presets[p]} for p in policies]
    runs = [(run_isolated if isolate else run_one)(job) for job in jobs]
    if dense is not None:
        base = runs[0]
        for run in runs:
            run["speedup_vs_dense"] = {
                "prefill": {b: run["prefill_tok_s"][b] / base["prefill_tok_s"][b] for b in run["prefill_tok_s"]},
                "decode": run["decode_tok_s"] / base["decode_tok_s"]}
    env = {"torch": torch.__version__, "cpu": _cpu_name(), "threads": torch.get_num_threads(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None}
    if device == "cpu":
        env["csr_measurement"] = measure_csr_threshold(repeats=10)
    return {"config": common | {"model": model, "dense": dense, "policies": list(policies)}, "environment": env,
            "runs": runs}
