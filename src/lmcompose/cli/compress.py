"""``lmcompose compress``: plan, compress, save, evaluate, and print what was done."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..core.dtypes import CHOICES as DTYPE_CHOICES
from ..eval.perplexity import PROTOCOLS
from . import checks
from .common import console, model_options, print_totals, progress
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
    from ..models.checkpoint import save_compressed
    from ..models.export.dense import export_dense
    from ..models.load import load_any
    from ..models.rundir import REPORT_FILE, update_metadata

    # Every argument is checked before anything is loaded: the recipe and its calibration source, the outputs,
    # the evaluation protocol and its data, then the plan on the model's shapes (no weights).
    recipe = recipe_from_args(args)
    check_calibration(recipe, args.data_dir, resolve=True)
    out = checks.output(args.out or f"runs/{Path(args.model).name}-{recipe.hash()}", "--out", args.overwrite)
    if args.export_dense:
        checks.output(args.export_dense, "--export-dense", args.overwrite)
    # What a killed earlier save of these targets left (hidden temporaries beside them) goes now, not only when
    # this run reaches its own save: a run that fails or is stopped before saving still cleans up.
    for target in (out, args.export_dense):
        if target:
            remove_stale_temporaries(Path(target).expanduser())
    if args.eval != "none":
        from ..eval.perplexity import get_protocol

        protocol = get_protocol(args.eval, **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
        checks.data_file(args.data_dir, protocol.dataset, protocol.split, resolve=True)
    checks.model_exists(args.model)
    planned = check_on_model(recipe, args.model, args.trust_remote_code)
    console.print(plan_table(planned, f"plan: recipe {recipe.hash()} on {args.model}"))
    print_recovery(recipe)
    t0 = time.perf_counter()
    model, tokenizer = load_any(args.model, args.dtype, args.device, args.trust_remote_code,
                               verify=not args.no_verify)
    cal = recipe.calibration
    windows = calibration_windows(tokenizer, source=cal.source, split=cal.split, n=cal.n, seqlen=cal.seqlen,
                                  seed=cal.seed, data_dir=args.data_dir, force=args.force_calibration)
    with progress() as prog:
        task = prog.add_task("compress (blocks)", total=None)
        report = compress(model, recipe, windows, model_name=args.model, compute_dtype=args.compute_dtype,
                          on_block=lambda done, total: prog.update(task, completed=done, total=total))
    # Save before evaluating: evaluation may cast the model to a faster dtype (compute.cast_for_eval),
    # which must not touch what is saved. The evaluation is then added to the saved metadata.
    save_compressed(model, out, tokenizer, float_dtype=recipe.float_dtype, recipe=recipe.to_dict(),
                    report=report.to_dict(), base_model=args.model, overwrite=args.overwrite)
    write_text_atomically(out / REPORT_FILE, report.to_json())
    if args.export_dense:
        export_dense(model, args.export_dense, tokenizer, overwrite=args.overwrite)
    if args.eval != "none":
        from ..core.dtypes import cast_for_eval
        from ..eval.perplexity import perplexity

        cast_for_eval(model, args.compute_dtype)
        with progress() as prog:
            task = prog.add_task(f"perplexity ({args.eval})", total=None)
            ppl = perplexity(model, tokenizer, protocol, data_dir=args.data_dir,
                             progress=lambda d, t: prog.update(task, completed=d, total=t))
        report.evaluation = ppl.to_dict()
        update_metadata(out, report=report.to_dict(), protocol=ppl.protocol)
        write_text_atomically(out / REPORT_FILE, report.to_json())
    console.print(report_table(report))
    summary = report.summary()
    if report.evaluation:
        summary["perplexity"] = round(report.evaluation["ppl"], 4)
        summary["protocol"] = json.dumps(report.evaluation["protocol"])
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
    summary["saved"] = str(out)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    print_totals(summary)
    return 0


def report_table(report) -> Table:
    table = Table(title=f"per-Linear results (recipe {report.recipe_hash})")
    for col in ("Linear", "structure", "bits/weight", "rel. error", "seconds"):
        table.add_column(col, justify="left" if col in ("Linear", "structure") else "right")
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
    c.add_argument("--eval", default="quick", choices=[*PROTOCOLS, "none"],
                   help="perplexity protocol after compression: quick, full or none")
    c.add_argument("--max-tokens", type=checks.count(2), default=None)
    c.add_argument("--calib-source", default=None)
    c.add_argument("--calib-n", type=checks.count(), default=None)
    c.add_argument("--calib-seqlen", type=checks.count(8), default=None)
    c.add_argument("--seed", type=checks.seed, default=None)
    c.add_argument("--force-calibration", action="store_true", help="allow calibrating on the evaluation file")
    c.add_argument("--export-dense", default=None, help="also write a merged dense HF checkpoint here")
    c.set_defaults(func=cmd_compress)

