"""``lmcompose compress``: plan, compress, save, evaluate, and print what was done."""

from __future__ import annotations

import json
import shutil
import time
from functools import partial
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..core.dtypes import CHOICES as DTYPE_CHOICES
from ..eval.perplexity import PROTOCOLS
from . import checks
from .common import BlockProgress, console, mib, model_options, print_totals, progress
from .recipe import check_calibration, check_on_model, plan_table, print_recovery


def recipe_from_args(args):
    from ..api import as_recipe
    from ..presets import DEFAULT_PRESET, get_preset

    if args.recipe and args.preset:
        raise ValueError("give --recipe or --preset, not both")
    recipe = as_recipe(args.recipe) if args.recipe else get_preset(args.preset or DEFAULT_PRESET)
    overrides = {k: v for k, v in {"source": args.calib_source, "n": args.calib_n, "seqlen": args.calib_seqlen,
                                   "seed": args.seed}.items() if v is not None}
    if overrides:
        data = recipe.to_dict()
        data["calibration"] = {**data["calibration"], **overrides}
        recipe = type(recipe).from_dict(data)
    return recipe


def cmd_compress(args) -> int:
    from ..api import compress
    from ..core.io import remove_stale_temporaries, write_text_atomically
    from ..data import calibration_windows
    from ..models.checkpoint import save_compressed, save_streamed
    from ..models.export.dense import export_dense
    from ..models.load import load_any
    from ..models.rundir import DENSE_KEY, REPORT_FILE, record_dense_result, update_metadata
    from ..pipeline.resume import check_work_dir, work_dir_for
    from ..reporting.card import write_card

    # Every argument is checked before anything is loaded: the recipe and its calibration source, the outputs,
    # the evaluation protocol and its data, then the plan on the model's shapes (no weights).
    recipe = recipe_from_args(args)
    check_calibration(recipe, args.data_dir, resolve=True)
    if args.stream and args.export_dense:
        raise ValueError("--export-dense needs the whole model in memory; it cannot be combined with --stream")
    out = checks.output(args.out or f"runs/{Path(args.model).name}-{recipe.hash()}", "--out", args.overwrite)
    if args.export_dense:
        checks.output(args.export_dense, "--export-dense", args.overwrite)
    # What a killed earlier save of these targets left (hidden temporaries beside them) goes now, not only when
    # this run reaches its own save: a run that fails or is stopped before saving still cleans up.
    for target in (out, args.export_dense):
        if target:
            remove_stale_temporaries(Path(target).expanduser())
    work_dir = work_dir_for(out)  # OUT.partial: the finished blocks of this run, for --resume
    check_work_dir(work_dir, args.resume, args.overwrite)
    if args.eval != "none":
        from ..eval.perplexity import get_protocol

        protocol = get_protocol(args.eval, **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
        checks.data_file(args.data_dir, protocol.dataset, protocol.split, resolve=True)
    checks.model_exists(args.model)
    planned = check_on_model(recipe, args.model, args.trust_remote_code)
    verbose = args.show_layers or args.verbose
    print_plan(args, recipe, planned, out, protocol if args.eval != "none" else None)
    if verbose:
        console.print(plan_table(planned, f"plan: recipe {recipe.hash()} on {args.model}"))
    print_recovery(recipe)
    t0 = time.perf_counter()
    block_io = None  # --stream: each block is read from disk when it is visited, freed once saved
    if args.stream:
        from ..models.stream import open_streamed

        model, tokenizer, block_io = open_streamed(args.model, args.dtype, args.trust_remote_code)
        if tokenizer is None and not recipe.calibration.none:
            raise ValueError(f"--model {args.model!r} has no tokenizer files (tokenizer.json / tokenizer_config.json) "
                             "to make the calibration windows with")
    else:
        model, tokenizer = load_any(args.model, args.dtype, args.device, args.trust_remote_code,
                                   verify=not args.no_verify)
    cal = recipe.calibration
    windows = None if cal.none else calibration_windows(
        tokenizer, source=cal.source, split=cal.split, n=recipe.window_count, seqlen=cal.seqlen, seed=cal.seed,
        data_dir=args.data_dir, force=args.force_calibration)
    with BlockProgress("compress") as on_block:
        report = compress(model, recipe, windows, model_name=args.model, compute_dtype=args.compute_dtype,
                          on_block=on_block, work_dir=work_dir, resume=args.resume, overwrite_work=args.overwrite,
                          block_io=block_io)
    # Save before evaluating: evaluation may cast the model to a faster dtype (compute.cast_for_eval),
    # which must not touch what is saved. The evaluation is then added to the saved metadata.
    save = save_compressed if block_io is None else partial(save_streamed, work_dir=work_dir)  # shard per block
    save(model, out, tokenizer, float_dtype=recipe.float_dtype, recipe=recipe.to_dict(),
         report=report.to_dict(), base_model=args.model, overwrite=args.overwrite)
    write_text_atomically(out / REPORT_FILE, report.to_json())
    update_metadata(out, made_by=made_by(args))
    shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoint is saved: nothing left to resume
    if args.export_dense:
        export_dense(model, args.export_dense, tokenizer, overwrite=args.overwrite)
    if args.eval != "none":
        from ..core.dtypes import cast_for_eval
        from ..eval.perplexity import perplexity

        if block_io is not None:  # the blocks were freed as they were saved: evaluate the saved checkpoint
            model, _ = load_any(str(out), args.dtype, args.device, verify=False)
        cast_for_eval(model, args.compute_dtype)
        with progress() as prog:
            task = prog.add_task(f"perplexity ({args.eval})", total=None)
            ppl = perplexity(model, tokenizer, protocol, data_dir=args.data_dir,
                             progress=lambda d, t: prog.update(task, completed=d, total=t))
        report.evaluation = ppl.to_dict()
        update_metadata(out, report=report.to_dict(), protocol=ppl.protocol)
        write_text_atomically(out / REPORT_FILE, report.to_json())
        if not (args.no_dense_eval or args.stream):  # --stream: the dense model may not fit in memory
            del model
            dense_ppl = evaluate_dense(args, tokenizer, protocol, ppl.protocol["dtype"])
            record_dense_result(out, args.model, "perplexity", dense_ppl.to_dict())
    card = write_card(out)  # from report.json and lmcompose.json alone: a sharded (--stream) run has one too
    if verbose:
        console.print(report_table(report))
    summary = short_summary(report, json.loads((out / REPORT_FILE).read_text()).get(DENSE_KEY) or {})
    if report.recovery:
        rec = report.recovery
        summary["recovery_loss"] = (f"{rec['loss_before']:.4f} -> {rec['loss_after']:.4f} on {rec['probe_windows']} "
                                    f"calibration windows ({rec['steps']} steps)")
        if "kl_after" in rec:
            summary["recovery_kl"] = f"{rec['kl_before']:.4f} -> {rec['kl_after']:.4f}"
        if rec.get("heldout_windows"):
            a, b = rec["heldout_windows"]
            held = f"{rec['heldout_loss_before']:.4f} -> {rec['heldout_loss_after']:.4f}"
            if "heldout_kl_after" in rec:
                held += f" (KL {rec['heldout_kl_before']:.4f} -> {rec['heldout_kl_after']:.4f})"
            summary["recovery_heldout_loss"] = f"{held} on windows {a}..{b - 1}"
    summary["saved"] = f"{out} (model card {card.name}; the per-Linear table is in it, in report.json and --verbose)"
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    print_totals(summary)
    console.print(f"next: lmcompose generate {out} --prompt \"...\"  ·  lmcompose report {out} --out "
                  f"{out}-report", markup=False, highlight=False, soft_wrap=True)
    return 0


def print_plan(args, recipe, planned, out: Path, protocol) -> None:
    """A few lines before any work: the model, the recipe's steps, the calibration, the planned size (from the
    recipe's costing on the model's shapes, no weights read), the evaluation and where the run goes."""
    from ..reporting.runs import protocol_label, recipe_label

    cal = recipe.calibration
    dense = planned.total_bytes - planned.linear_bytes + planned.linear_dense_bytes
    lines = [f"plan: compress {args.model} with {recipe_label(recipe.to_dict())} (recipe {recipe.hash()})",
             "  calibration: none (the steps read the weights alone; errors are measured on the weights)" if cal.none
             else f"  calibration: {cal.source} ({cal.split}), {cal.n} windows of {cal.seqlen} tokens, seed {cal.seed}",
             f"  estimated size: {planned.bits_per_weight:.3f} bits/weight over {len(planned.compressed)} Linears; "
             f"{mib(planned.total_bytes)} in all (dense with fp16 Linears: {mib(dense)})"]
    if protocol is not None:
        dense_too = "" if args.no_dense_eval else ", then the dense model on the same protocol"
        lines.append(f"  evaluation: perplexity, {protocol_label(protocol.model_dump())}{dense_too}")
    lines.append(f"  output: {out}")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def made_by(args) -> dict:
    """The command line and the lmcompose version that made a run (the model card shows them)."""
    import shlex

    from .. import __version__

    argv = getattr(args, "argv", None)
    return {"command": "lmcompose " + shlex.join(argv) if argv is not None else "lmcompose compress",
            "lmcompose": __version__}


def evaluate_dense(args, tokenizer, protocol, dtype: str):
    """Perplexity of the dense base model under the compressed model's protocol, loaded in the dtype that one
    was evaluated in (the "before" of the summary and the dense reference of the run)."""
    from ..core.memory import release_freed_memory
    from ..eval.perplexity import perplexity
    from ..models.load import load_any

    release_freed_memory()
    dense, _ = load_any(args.model, dtype, args.device, args.trust_remote_code, verify=not args.no_verify)
    with progress() as prog:
        task = prog.add_task(f"dense perplexity ({args.eval})", total=None)
        return perplexity(dense, tokenizer, protocol, data_dir=args.data_dir,
                          progress=lambda d, t: prog.update(task, completed=d, total=t))


def short_summary(report, dense: dict) -> dict:
    """The few numbers a run ends with: bits per weight, bytes, perplexity after (and before, when measured)."""
    dense_bytes = report.total_bytes - report.linear_bytes + report.linear_dense_fp16_bytes
    summary = {"bits/weight": f"{report.bits_per_weight:.3f} in the {sum(1 for l in report.layers if l.steps)} "
                              "compressed Linears (fp16: 16)",
               "bytes": f"{report.total_bytes:,} ({mib(report.total_bytes)}), "
                        f"{report.total_bytes / dense_bytes:.1%} of the dense model's {mib(dense_bytes)}"}
    if report.evaluation:
        from ..reporting.runs import protocol_label

        ppl = report.evaluation["ppl"]
        before = (dense.get("perplexity") or {}).get("ppl")
        summary["perplexity"] = (f"{before:.3f} dense -> {ppl:.3f} compressed ({100 * (ppl / before - 1):+.1f}%)"
                                 if before else f"{ppl:.3f} (dense not measured)")
        summary["protocol"] = protocol_label(report.evaluation["protocol"])
    return summary


def report_table(report) -> Table:
    from ..reporting.runs import uncalibrated

    table = Table(title=f"per-Linear results (recipe {report.recipe_hash})")
    error = "rel. error (weights)" if uncalibrated(report.calibration) else "rel. error"
    for col in ("Linear", "structure", "bits/weight", error, "seconds"):
        table.add_column(col, justify="left" if col in ("Linear", "structure") else "right",
                         overflow="fold" if col == "Linear" else "ellipsis")
    for layer in report.layers:
        if not layer.steps:
            table.add_row(escape(layer.name), escape(f"skipped: {layer.skipped}"), "", "", "")
            continue
        table.add_row(escape(layer.name), escape(layer.structure), f"{layer.bits_per_weight:.3f}",
                      f"{layer.rel_error:.3e}",
                      f"{sum(s['seconds'] for s in layer.steps):.2f}")
    return table


def add_parser(sub) -> None:
    c = sub.add_parser("compress", help="compress a model with a recipe, evaluate, save")
    model_options(c, weights_dtype_help="dtype of the weights in memory while compressing (the techniques read them)")
    c.add_argument("--compute-dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="dtype of the block forwards and of the evaluation; auto = bf16 where it is measurably "
                        "faster than fp32, else fp32")
    c.add_argument("--recipe", help="recipe file (.yaml/.json)")
    c.add_argument("--preset", help="named recipe (see lmcompose.presets)")
    c.add_argument("--out", help="output directory (default runs/<model>-<recipe hash>)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--stream", action="store_true",
                   help="read the model (a local safetensors directory or .gguf) one block at a time and write the "
                        "checkpoint shard by shard: memory holds one block plus the calibration activations. Not "
                        "with whole-model steps (rotations, allocation pre-passes, recover), step-major or "
                        "--export-dense; the evaluation loads the saved checkpoint, and the dense baseline is "
                        "not evaluated")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same --out from its last finished block (kept in "
                        "OUT.partial/ while a run goes on; the result is bit-identical to an uninterrupted run); "
                        "with the same recipe, model, calibration and dtypes only")
    c.add_argument("--eval", default="quick", choices=[*PROTOCOLS, "none"],
                   help="perplexity protocol after compression: quick, full or none")
    c.add_argument("--max-tokens", type=checks.count(2), default=None)
    c.add_argument("--calib-source", default=None, help="replaces the recipe's calibration.source: c4, wikitext2, a "
                   "local .txt/.jsonl/.parquet file, or none (statistic-free steps only; no calibration pass)")
    c.add_argument("--calib-n", type=checks.count(), default=None)
    c.add_argument("--calib-seqlen", type=checks.count(8), default=None)
    c.add_argument("--seed", type=checks.seed, default=None)
    c.add_argument("--force-calibration", action="store_true", help="allow calibrating on the evaluation file")
    c.add_argument("--export-dense", default=None, help="also write a merged dense HF checkpoint here")
    c.add_argument("--no-dense-eval", action="store_true",
                   help="with --eval: skip the dense model's perplexity (the 'before' of the summary and the run's "
                        "dense reference in `lmcompose report`); halves the evaluation time")
    c.add_argument("--verbose", dest="show_layers", action="store_true",
                   help="also print the plan per Linear role and the per-Linear results (always in report.json and "
                        "the run's README.md)")
    c.set_defaults(func=cmd_compress)

