"""Evaluation commands: ``eval`` (perplexity), ``zeroshot``, ``fidelity`` and ``bench-speed``."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..core.dtypes import CHOICES as DTYPE_CHOICES
from ..eval.perplexity import PROTOCOLS
from ..eval.speed import policy_presets
from ..eval.zeroshot import DEFAULT_TASKS
from . import checks
from .common import (
    DTYPE_HELP,
    console,
    model_options,
    print_totals,
    progress,
    verify_option,
    write_json_output,
)


def mib_number(n: int) -> str:
    return f"{n / 2**20:,.1f}"


DENSE_FOR_HELP = ("the model evaluated is RUN_DIR's dense base model: record the result in RUN_DIR's report.json as "
                  "its dense reference (shown by `lmcompose report` and the run's README.md)")


def check_dense_for(run_dir: str | None, model: str) -> None:
    """``--dense-for RUN_DIR``, before any model loads: a run directory of `lmcompose compress` whose base model
    is `model` (the name it was compressed from)."""
    from ..models.checkpoint import META_FILE
    from ..models.rundir import REPORT_FILE

    if run_dir is None:
        return
    path = checks.existing(run_dir, "--dense-for")
    if not (path / REPORT_FILE).is_file() or not (path / META_FILE).is_file():
        raise FileNotFoundError(f"--dense-for {run_dir!r} is not a run directory of `lmcompose compress` (no "
                                f"{REPORT_FILE} and {META_FILE})")
    base = json.loads((path / META_FILE).read_text()).get("base_model")
    if base and base != model:
        raise ValueError(f"--dense-for {run_dir!r} was compressed from {base!r}, not --model {model!r}; allowed: "
                         f"--model {base}")


def refresh_card(run_dir: str) -> None:
    """Rewrite a run's model card after a result was recorded in its report.json (a directory without
    lmcompose.json, not a run of `lmcompose compress`, gets no card)."""
    from ..models.checkpoint import META_FILE
    from ..reporting.card import write_card

    if (Path(run_dir) / META_FILE).is_file():
        write_card(run_dir)


def record_dense(run_dir: str | None, model: str, key: str, value: dict) -> None:
    from ..models.rundir import record_dense_result
    from ..reporting.card import write_card

    if run_dir is not None:
        record_dense_result(run_dir, model, key, value)
        write_card(run_dir)
        console.print(f"recorded as the dense reference of {run_dir} (shown by `lmcompose report`)", markup=False)


def cmd_eval(args) -> int:
    from ..core.dtypes import eval_dtype
    from ..eval.perplexity import get_protocol, perplexity
    from ..models.load import load_any

    overrides = {k: v for k, v in {"seqlen": args.seqlen, "batch_size": args.batch_size,
                                   "max_tokens": args.max_tokens}.items() if v is not None}
    protocol = get_protocol(args.protocol, **overrides)
    checks.data_file(args.data_dir, protocol.dataset, protocol.split, resolve=True)
    if args.json:
        checks.output(args.json, "--json", overwrite=True, directory=False)
    checks.model_exists(args.model)
    check_dense_for(args.dense_for, args.model)
    dtype = eval_dtype(args.dtype, args.device)
    if args.stream:  # one decoder block in memory at a time: for a model bigger than memory
        from ..eval.streamed import streamed_perplexity
        from ..models.stream import open_for_streaming

        model, tokenizer, blocks = open_for_streaming(args.model, dtype, args.trust_remote_code,
                                                      verify=not args.no_verify)
        device = None if args.device == "auto" else args.device
        run = partial(streamed_perplexity, model, tokenizer, protocol, blocks, device=device)
        label = "perplexity (block passes)"
    else:
        model, tokenizer = load_any(args.model, dtype, args.device, args.trust_remote_code, verify=not args.no_verify)
        run, label = partial(perplexity, model, tokenizer, protocol), "perplexity"
    with progress() as prog:
        task = prog.add_task(label, total=None)
        result = run(data_dir=args.data_dir,
                     progress=lambda done, total: prog.update(task, completed=done, total=total))
    print_totals({"model": args.model, "perplexity": f"{result.ppl:.4f}", "tokens": result.n_tokens,
                   "windows": result.n_windows, "seconds": f"{result.seconds:.1f}",
                   "protocol": json.dumps(result.protocol)})
    write_json_output(args.json, {"model": args.model, **result.to_dict()})
    record_dense(args.dense_for, args.model, "perplexity", result.to_dict())
    return 0


def cmd_zeroshot(args) -> int:
    from rich.table import Table

    from ..core.dtypes import eval_dtype
    from ..eval.tasks import task_config
    from ..eval.zeroshot import zeroshot
    from ..models.load import load_any
    from ..models.rundir import REPORT_FILE, record_result

    checks.model_exists(args.model)
    if args.json:
        checks.output(args.json, "--json", overwrite=True, directory=False)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError(f"--tasks={args.tasks!r}: give at least one task")
    for t in tasks:  # names known, spec files valid, data files present: before the model loads
        task_config(t, args.data_dir)
    check_dense_for(args.dense_for, args.model)
    dtype = eval_dtype(args.dtype, args.device)
    run = partial(zeroshot, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
                  num_fewshot=args.num_fewshot)
    if args.stream:  # one decoder block in memory at a time: for a model bigger than memory
        from ..models.stream import open_for_streaming

        model, tokenizer, blocks = open_for_streaming(args.model, dtype, args.trust_remote_code,
                                                      verify=not args.no_verify)
        with progress() as prog:
            task = prog.add_task("zero-shot (block passes)", total=None)
            result = run(model, tokenizer, device=None if args.device == "auto" else args.device, blocks=blocks,
                         progress=lambda done, total: prog.update(task, completed=done))
    else:
        model, tokenizer = load_any(args.model, dtype, args.device, args.trust_remote_code, verify=not args.no_verify)
        result = run(model, tokenizer)
    table = Table(title=escape(f"zero-shot: {args.model} (lm-eval {result['lm_eval_version']}, limit {args.limit})"))
    for col in ("task", "metric", "value", "stderr", "n", "config hash"):
        table.add_column(col)
    for task, metrics in result["tasks"].items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or metric == "n" or value is None:
                continue
            err = metrics.get(f"{metric}_stderr")
            table.add_row(escape(task), escape(metric), f"{value:.4f}", f"{err:.4f}" if err is not None else "",
                          str(metrics["n"]), result["task_hashes"][task])
    console.print(table)
    if record_result(args.model, "zeroshot", result):
        refresh_card(args.model)
        console.print(f"recorded in {Path(args.model) / REPORT_FILE} (shown by `lmcompose report`)")
    write_json_output(args.json, {"model": args.model, **result})
    record_dense(args.dense_for, args.model, "zeroshot", result)
    return 0


def _limit(value: str) -> int | float:
    number = checks.number(0, 1e9, low_open=True)(value)
    if number >= 1 and not number.is_integer():
        raise argparse.ArgumentTypeError(f"got {value}: allowed: a fraction in (0, 1) or a whole number of examples")
    return int(number) if number >= 1 else number


def cmd_fidelity(args) -> int:
    from ..core.dtypes import eval_dtype
    from ..eval.fidelity import fidelity
    from ..eval.perplexity import get_protocol
    from ..models.checkpoint import META_FILE
    from ..models.load import load_any
    from ..models.rundir import REPORT_FILE, record_result

    checks.existing(args.compressed, "--compressed")
    meta_path = Path(args.compressed) / META_FILE
    dense_name = args.dense
    if dense_name is None:
        if not meta_path.is_file():
            raise ValueError("--dense is required when --compressed is not an lmcompose checkpoint")
        dense_name = json.loads(meta_path.read_text()).get("base_model") or None
        if dense_name is None:
            raise ValueError(f"{args.compressed} records no base_model: pass --dense")
    overrides = {k: v for k, v in {"seqlen": args.seqlen, "batch_size": args.batch_size}.items() if v is not None}
    protocol = get_protocol(args.protocol, **overrides)
    checks.data_file(args.data_dir, protocol.dataset, protocol.split, resolve=True)
    if args.json:
        checks.output(args.json, "--json", overwrite=True, directory=False)
    checks.model_exists(dense_name, "--dense")
    dtype = eval_dtype(args.dtype, args.device)
    if args.stream:  # one decoder block of one model in memory at a time: for models bigger than memory
        from ..eval.streamed import streamed_fidelity
        from ..models.stream import open_for_streaming

        dense, tokenizer, dense_blocks = open_for_streaming(dense_name, dtype, args.trust_remote_code,
                                                            verify=not args.no_verify)
        compressed, _, blocks = open_for_streaming(args.compressed, dtype, args.trust_remote_code,
                                                   verify=not args.no_verify)
        device = None if args.device == "auto" else args.device
        run = partial(streamed_fidelity, dense, dense_blocks, compressed, blocks, tokenizer, protocol, device=device)
        label = "fidelity (block passes)"
    else:
        dense, tokenizer = load_any(dense_name, dtype, args.device, args.trust_remote_code, verify=not args.no_verify)
        compressed, _ = load_any(args.compressed, dtype, args.device, args.trust_remote_code,
                                 verify=not args.no_verify)
        run, label = partial(fidelity, dense, compressed, tokenizer, protocol), "fidelity"
    with progress() as prog:
        task = prog.add_task(label, total=None)
        result = run(data_dir=args.data_dir, max_windows=args.max_windows,
                     progress=lambda done, total: prog.update(task, completed=done, total=total))
    print_totals({"dense": dense_name, "compressed": args.compressed, "KL(dense‖compressed)": f"{result.kl_mean:.6f}",
                   "top-1 agreement": f"{result.top1_agreement:.4f}", "positions": result.n_tokens,
                   "seconds": f"{result.seconds:.1f}", "protocol": json.dumps(result.protocol)})
    summary = {"dense": dense_name, "compressed": args.compressed, **result.to_dict()}
    if record_result(args.compressed, "fidelity", summary):
        refresh_card(args.compressed)
        console.print(f"recorded in {Path(args.compressed) / REPORT_FILE} (shown by `lmcompose report`)")
    write_json_output(args.json, summary)
    return 0


def cmd_bench_speed(args) -> int:
    from ..eval.speed import bench_speed

    checks.existing(args.model, "--model")
    if args.dense is not None:
        checks.model_exists(args.dense, "--dense")
    if args.json:
        checks.output(args.json, "--json", overwrite=True, directory=False)
    result = bench_speed(args.model, args.dense, tuple(args.policy), args.prompt_len, args.new_tokens,
                         tuple(args.batch_sizes), args.dtype, args.device, args.repeats, args.warmup,
                         isolate=not args.no_isolate, trust_remote_code=args.trust_remote_code,
                         verify=not args.no_verify)
    table = Table(title=f"bench-speed ({args.device}, {args.dtype}, {result['environment']['threads']} threads)")
    cols = ["run", "paths"] + [f"prefill b{b} tok/s" for b in args.batch_sizes] + [
        "decode tok/s", "RSS loaded MiB", "peak RSS MiB", "weights held MiB"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("run", "paths") else "right")
    for run in result["runs"]:
        speed = run.get("speedup_vs_dense")
        def cell(value, ratio):
            return f"{value:,.1f}" + (f" ({ratio:.2f}x)" if speed else "")
        row = [escape(run["label"]), escape(", ".join(f"{k}×{v}" for k, v in run["paths"].items()) or "-")]
        row += [cell(run["prefill_tok_s"][str(b)], speed and speed["prefill"][str(b)]) for b in args.batch_sizes]
        row += [cell(run["decode_tok_s"], speed and speed["decode"]), mib_number(run["rss_after_load_bytes"]),
                mib_number(run["peak_rss_bytes"]),
                mib_number(run["held_bytes"]["total"])]
        table.add_row(*row)
    Console(width=max(console.width, 150)).print(table)
    write_json_output(args.json, result)
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a model or a compressed checkpoint")
    model_options(e)
    e.add_argument("--protocol", default="quick", choices=list(PROTOCOLS),
                   help="quick (WikiText-2 test, seqlen 512, 64 windows) or full")
    e.add_argument("--seqlen", type=checks.count(2), default=None)
    e.add_argument("--batch-size", type=checks.count(), default=None)
    e.add_argument("--max-tokens", type=checks.count(2), default=None)
    e.add_argument("--json", default=None, help="also write the result as JSON here")
    e.add_argument("--dense-for", default=None, metavar="RUN_DIR", help=DENSE_FOR_HELP)
    e.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from disk (a local safetensors directory, a .gguf or a "
                        "run directory, sharded or not): for a model bigger than memory; same number as without")
    e.set_defaults(func=cmd_eval)

    z = sub.add_parser("zeroshot", help="zero-shot accuracy through lm-evaluation-harness, tasks from local files")
    model_options(z)
    z.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated built-in task names and/or paths of .yaml/.json task specs")
    z.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    z.add_argument("--batch-size", type=checks.count(), default=8)
    z.add_argument("--num-fewshot", type=checks.count(0, 1000), default=0)
    z.add_argument("--json", default=None, help="also write the result as JSON here")
    z.add_argument("--dense-for", default=None, metavar="RUN_DIR", help=DENSE_FOR_HELP)
    z.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from disk (see eval --help): for a model bigger than "
                        "memory; log-likelihood tasks only, same numbers as without")
    z.set_defaults(func=cmd_zeroshot)

    f = sub.add_parser("fidelity", help="KL(dense ‖ compressed) and top-1 agreement on held-out text")
    f.add_argument("--dense", default=None, help="the reference model (default: the checkpoint's base_model)")
    f.add_argument("--compressed", required=True, help="an lmcompose checkpoint directory (or any model)")
    f.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help=DTYPE_HELP)
    f.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    f.add_argument("--data-dir", type=checks.data_dir, default=None,
                   help="data directory (default $LMCOMPOSE_DATA_DIR, then the data shipped with lmcompose)")
    f.add_argument("--trust-remote-code", action="store_true")
    verify_option(f, "skip the checksums of the checkpoints (see eval --help)")
    f.add_argument("--protocol", default="quick", choices=list(PROTOCOLS),
                   help="quick (WikiText-2 test, seqlen 512) or full")
    f.add_argument("--max-windows", type=checks.count(), default=16)
    f.add_argument("--seqlen", type=checks.count(2), default=None)
    f.add_argument("--batch-size", type=checks.count(), default=None)
    f.add_argument("--json", default=None, help="also write the result as JSON here")
    f.add_argument("--stream", action="store_true",
                   help="read one decoder block of one model at a time from disk (see eval --help): for models "
                        "bigger than memory; same numbers as without")
    f.set_defaults(func=cmd_fidelity)

    b = sub.add_parser("bench-speed", help="prefill/decode tokens/s and peak memory, dense vs compressed")
    b.add_argument("--model", required=True, help="lmcompose checkpoint directory (or any model to time)")
    b.add_argument("--dense", default=None, help="dense baseline (default: the checkpoint's base model)")
    b.add_argument("--policy", nargs="+", default=["auto", "dense"], choices=sorted(policy_presets()),
                   help="inference policies for the compressed model (see lmcompose.runtime.inference)")
    b.add_argument("--prompt-len", type=checks.count(), default=256)
    b.add_argument("--new-tokens", type=checks.count(), default=64)
    b.add_argument("--batch-sizes", type=checks.count(), nargs="+", default=[1, 8], help="prefill batch sizes")
    b.add_argument("--repeats", type=checks.count(), default=5, help="timed runs; the median is reported")
    b.add_argument("--warmup", type=checks.count(0), default=1)
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--no-isolate", action="store_true", help="run in this process (peak RSS then covers all runs)")
    b.add_argument("--trust-remote-code", action="store_true")
    verify_option(b, "skip the checksums of the run directories (compressed and --dense) and of a .gguf's cached "
                     "dequantized copy (see eval --help)")
    b.add_argument("--json", default=None, help="write all numbers here")
    b.set_defaults(func=cmd_bench_speed)

