"""The `lmcompose` command line: the only place that prints.

    lmcompose compress [--model smollm2-135m] [--recipe R.yaml | --preset NAME] [--out DIR] [--eval quick]
    lmcompose eval --model NAME|PATH|CHECKPOINT --protocol quick
    lmcompose recipe check R.yaml --model NAME
    lmcompose recipe explain R.yaml --model NAME
    lmcompose techniques
    lmcompose zeroshot --model NAME|CHECKPOINT --tasks boolq,rte,piqa,winogrande,openbookqa,lambada --limit 100
    lmcompose fidelity --compressed CHECKPOINT [--dense NAME]
    lmcompose search --model NAME --budget 0.5 | --bits-per-weight 4.2 --trials N --out DIR
    lmcompose report RUN_DIR [RUN_DIR ...] --out DIR
    lmcompose bench-speed --model RUN_DIR [--dense NAME] --prompt-len 256 --new-tokens 64
    lmcompose export RUN_DIR --format dense|compressed-tensors|gguf --out PATH
    lmcompose analyze --a "wanda: {sparsity: 0.5}" --b "gptq: {bits: 4, group_size: 64}" --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m"


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=False)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _recipe(args):
    from .api import as_recipe
    from .presets import DEFAULT_PRESET, get_preset

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


def _plan_table(result, title: str) -> Table:
    """Planned bytes per Linear role (e.g. self_attn.q_proj), summed over blocks."""
    table = Table(title=title)
    for col in ("Linear", "count", "structure", "bits/weight", "bytes"):
        table.add_column(col, justify="right" if col in ("count", "bits/weight", "bytes") else "left")
    roles: dict[str, list] = {}
    for name in result.compressed:
        role = ".".join(p for p in name.split(".") if not p.isdigit()).split(".", 2)[-1]
        roles.setdefault(role, []).append(result.specs[name])
    for role, specs in roles.items():
        nbytes = sum(s.nbytes() for s in specs)
        weights = sum(s.out_features * s.in_features for s in specs)
        table.add_row(role, str(len(specs)), escape(specs[0].describe()), f"{8 * nbytes / weights:.3f}", _mib(nbytes))
    return table


def _print_recovery(recipe) -> None:
    rec = recipe.recover
    if rec.steps:
        console.print(f"then recover: {rec.steps} causal-LM steps of {rec.batch_size} calibration window(s), "
                      f"lr {rec.lr:g}, training the float {rec.train.replace('+', ' and ')} tensors "
                      "(bytes, masks and codes unchanged)")


def _print_totals(rows: dict) -> None:
    table = Table(show_header=False)
    for k, v in rows.items():
        table.add_row(k, str(v))
    console.print(table)


def cmd_techniques(args) -> int:
    from .registry import describe_techniques

    for tech in describe_techniques():
        table = Table(title=f"{tech['name']}  ({tech['family']}): {tech['summary']}", title_justify="left")
        for col in ("parameter", "default", "description"):
            table.add_column(col)
        for p in tech["params"]:
            table.add_row(p["name"], json.dumps(p["default"]), p["description"])
        console.print(table)
    return 0


def _check(recipe, model: str, trust_remote_code: bool):
    from .models.load import model_linear_shapes

    shapes, other = model_linear_shapes(model, trust_remote_code=trust_remote_code, float_dtype=recipe.float_dtype)
    return recipe.check(shapes, other_bytes=other)


def cmd_recipe_check(args) -> int:
    from .api import as_recipe

    recipe = as_recipe(args.recipe)
    result = _check(recipe, args.model, args.trust_remote_code)
    console.print(_plan_table(result, f"{args.recipe} on {args.model} (recipe {recipe.hash()})"))
    _print_recovery(recipe)
    _print_totals({k: (_mib(v) if k.endswith("bytes") else f"{v:.4f}" if isinstance(v, float) else v)
                   for k, v in result.to_dict().items()})
    return 0


def cmd_recipe_explain(args) -> int:
    from .api import as_recipe
    from .models.load import model_linear_shapes
    from .rules import RULES, explain

    recipe = as_recipe(args.recipe)
    shapes, _ = model_linear_shapes(args.model, args.trust_remote_code, recipe.float_dtype)
    steps = explain(recipe, shapes)
    table = Table(title=f"{args.recipe} on {args.model}: what each step does")
    for col in ("#", "step", "Linears", "in", "out", "bytes after", "bits/w", "of fp16", "rules"):
        table.add_column(col, justify="left" if col in ("step", "in", "out", "rules") else "right")
    for s in steps:
        params = ", ".join(f"{k}={v}" for k, v in s.params.items())
        table.add_row(str(s.index), f"{s.name}({params})", str(s.targets),
                      escape("\n".join(s.structure_in)), escape("\n".join(s.structure_out)), _mib(s.linear_bytes),
                      f"{s.bits_per_weight:.3f}", f"{s.ratio_of_fp16:.3f}", ", ".join(s.applies))
    console.print(table)
    _print_recovery(recipe)
    used = sorted({r for s in steps for r in s.applies})
    for rid in used:
        rule = RULES[rid]
        console.print(f"[bold]{rid}[/] ({rule.kind}) {rule.statement}. [dim]Source: {rule.source}[/]")
    warnings = [w for s in steps for w in s.warnings]
    for w in warnings:
        console.print(f"[bold yellow]warning[/] step {w.step}: {w.message} "
                      f"(contradicts {w.rule.id}: {w.rule.statement}; {w.rule.source})")
    if not warnings:
        console.print("no rule is contradicted")
    return 0


def cmd_eval(args) -> int:
    from .eval.perplexity import get_protocol, perplexity

    overrides = {k: v for k, v in {"seqlen": args.seqlen, "batch_size": args.batch_size,
                                   "max_tokens": args.max_tokens}.items() if v is not None}
    protocol = get_protocol(args.protocol, **overrides)
    model, tokenizer = _load_any(args.model, _eval_dtype(args.dtype, args.device), args.device, args.trust_remote_code)
    with _progress() as prog:
        task = prog.add_task("perplexity", total=None)
        result = perplexity(model, tokenizer, protocol, data_dir=args.data_dir,
                            progress=lambda done, total: prog.update(task, completed=done, total=total))
    _print_totals({"model": args.model, "perplexity": f"{result.ppl:.4f}", "tokens": result.n_tokens,
                   "windows": result.n_windows, "seconds": f"{result.seconds:.1f}",
                   "protocol": json.dumps(result.protocol)})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, **result.to_dict()}, indent=2))
    return 0


def _eval_dtype(dtype: str, device: str) -> str:
    """The dtype to load a model in for evaluation: `dtype`, with ``auto`` resolved for `device`."""
    from . import compute

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return compute.resolve(dtype, device)


def _load_any(name: str, dtype: str, device: str, trust_remote_code: bool):
    from .models.checkpoint import META_FILE, load_compressed
    from .models.load import load_model

    if (Path(name) / META_FILE).is_file():
        model, tokenizer, _ = load_compressed(name, dtype=dtype, device=device if device != "auto" else "cpu")
        return model, tokenizer
    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def cmd_compress(args) -> int:
    from .api import compress
    from .data import calibration_windows
    from .models.checkpoint import REPORT_FILE, export_dense, save_compressed, update_metadata, write_text_atomically

    recipe = _recipe(args)  # validated before anything is loaded
    planned = _check(recipe, args.model, args.trust_remote_code)
    out = Path(args.out or f"runs/{Path(args.model).name}-{recipe.hash()}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"output directory {str(out)!r} exists; pass --overwrite to replace it")
    console.print(_plan_table(planned, f"plan: recipe {recipe.hash()} on {args.model}"))
    _print_recovery(recipe)
    t0 = time.perf_counter()
    model, tokenizer = _load_any(args.model, args.dtype, args.device, args.trust_remote_code)
    cal = recipe.calibration
    windows = calibration_windows(tokenizer, source=cal.source, split=cal.split, n=cal.n, seqlen=cal.seqlen,
                                  seed=cal.seed, data_dir=args.data_dir, force=args.force_calibration)
    with _progress() as prog:
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
        from .compute import cast_for_eval
        from .eval.perplexity import get_protocol, perplexity

        protocol = get_protocol(args.eval, **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
        cast_for_eval(model, args.compute_dtype)
        with _progress() as prog:
            task = prog.add_task(f"perplexity ({args.eval})", total=None)
            ppl = perplexity(model, tokenizer, protocol, data_dir=args.data_dir,
                             progress=lambda d, t: prog.update(task, completed=d, total=t))
        report.evaluation = ppl.to_dict()
        update_metadata(out, report=report.to_dict(), protocol=ppl.protocol)
        write_text_atomically(out / REPORT_FILE, report.to_json())
    console.print(_report_table(report))
    summary = report.summary()
    if report.evaluation:
        summary["perplexity"] = round(report.evaluation["ppl"], 4)
        summary["protocol"] = json.dumps(report.evaluation["protocol"])
    if report.recovery:
        rec = report.recovery
        summary["recovery_loss"] = (f"{rec['loss_before']:.4f} -> {rec['loss_after']:.4f} on {rec['probe_windows']} "
                                    f"calibration windows ({rec['steps']} steps)")
    summary["saved"] = str(out)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    _print_totals(summary)
    return 0


def _step_arg(text: str | None, flag: str):
    import yaml

    if text is None:
        return None
    try:
        step = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{flag}={text!r} is not YAML: {err}") from None
    if not isinstance(step, dict) or len(step) != 1:
        raise ValueError(f"{flag}={text!r} must be one step, e.g. \"wanda: {{sparsity: 0.5}}\"")
    return step


def cmd_analyze(args) -> int:
    from .analysis.orthogonality import analyze, to_markdown, write
    from .eval.perplexity import get_protocol

    a, b, joint = _step_arg(args.a, "--a"), _step_arg(args.b, "--b"), _step_arg(args.joint, "--joint")
    overrides = {k: v for k, v in (("max_windows", args.max_windows), ("max_tokens", args.max_tokens)) if v}
    protocol = get_protocol(args.protocol, **overrides)
    calibration = {"n": args.calib_n, "seqlen": args.calib_seqlen, "seed": args.seed}
    out = Path(args.out)
    with _progress() as prog:
        task = prog.add_task("analyze (variants)", total=5 if joint else 4)
        an = analyze(args.model, a, b, joint, calibration=calibration, protocol=protocol, data_dir=args.data_dir,
                     dtype=args.dtype, device=args.device,
                     on_variant=lambda name, steps: prog.update(task, advance=1, description=f"analyze: {name}"))
    write(an, out)
    console.print(to_markdown(an))
    console.print(f"wrote {out}/analysis.json, analysis.md, analysis.png")
    return 0


def _report_table(report) -> Table:
    table = Table(title=f"per-Linear results (recipe {report.recipe_hash})")
    for col in ("Linear", "structure", "bits/weight", "rel. error", "seconds"):
        table.add_column(col, justify="left" if col in ("Linear", "structure") else "right")
    for layer in report.layers:
        if not layer.steps:
            table.add_row(layer.name, f"skipped: {layer.skipped}", "", "", "")
            continue
        table.add_row(layer.name, escape(layer.structure), f"{layer.bits_per_weight:.3f}", f"{layer.rel_error:.3e}",
                      f"{sum(s['seconds'] for s in layer.steps):.2f}")
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcompose", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library (INFO)")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, model_help="short name (smollm2-135m, gemma3-270m), hub id, local dir or .gguf",
                   dtype_help=None):
        sp.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
        if dtype_help is None:  # commands that only run forwards: load the model in the compute dtype
            sp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                            help="compute dtype; auto = bf16 where it is measurably faster than fp32 (CPUs with "
                                 "AMX, GPUs), else fp32")
        else:
            sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=dtype_help)
        sp.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
        sp.add_argument("--data-dir", default=None, help="evaluation/calibration data (else $LMCOMPOSE_DATA_DIR)")
        sp.add_argument("--trust-remote-code", action="store_true")

    c = sub.add_parser("compress", help="compress a model with a recipe, evaluate, save")
    model_args(c, dtype_help="dtype of the weights in memory while compressing (the techniques read them)")
    c.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the block forwards and of the evaluation; auto = bf16 where it is measurably "
                        "faster than fp32, else fp32")
    c.add_argument("--recipe", help="recipe file (.yaml/.json)")
    c.add_argument("--preset", help="named recipe (see lmcompose.presets)")
    c.add_argument("--out", help="output directory (default runs/<model>-<recipe hash>)")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--eval", default="quick", help="perplexity protocol after compression: quick, full or none")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--calib-source", default=None)
    c.add_argument("--calib-n", type=int, default=None)
    c.add_argument("--calib-seqlen", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--force-calibration", action="store_true", help="allow calibrating on the evaluation file")
    c.add_argument("--export-dense", default=None, help="also write a merged dense HF checkpoint here")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a model or a compressed checkpoint")
    model_args(e, "short name, hub id, local dir, .gguf, or an lmcompose checkpoint directory")
    e.add_argument("--protocol", default="quick", help="quick (WikiText-2 test, seqlen 512, 64 windows) or full")
    e.add_argument("--seqlen", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--json", default=None, help="also write the result as JSON here")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("recipe", help="recipe tools")
    rsub = r.add_subparsers(dest="recipe_command", required=True)
    rc = rsub.add_parser("check", help="type-check and cost a recipe on a model's shapes, loading no weights")
    rc.add_argument("recipe")
    rc.add_argument("--model", default=DEFAULT_MODEL)
    rc.add_argument("--trust-remote-code", action="store_true")
    rc.set_defaults(func=cmd_recipe_check)

    an = sub.add_parser("analyze", help="orthogonality of two techniques: A, B, A→B, B→A and a joint method")
    model_args(an)
    an.add_argument("--a", required=True, help='first step as YAML, e.g. "wanda: {sparsity: 0.5}"')
    an.add_argument("--b", required=True, help='second step, e.g. "gptq: {bits: 4, group_size: 64}"')
    an.add_argument("--joint", default=None, help="optional joint method doing both at once")
    an.add_argument("--out", required=True, help="directory for analysis.json/.md/.png")
    an.add_argument("--protocol", default="quick")
    an.add_argument("--max-windows", type=int, default=None)
    an.add_argument("--max-tokens", type=int, default=None)
    an.add_argument("--calib-n", type=int, default=128)
    an.add_argument("--calib-seqlen", type=int, default=512)
    an.add_argument("--seed", type=int, default=0)
    an.set_defaults(func=cmd_analyze)

    from . import benchspeed, reporting
    from .eval import fidelity, zeroshot
    from .models import export
    from .search import study
    for module in (reporting, export, zeroshot, fidelity, benchspeed, study):
        module.add_parser(sub)

    rx = rsub.add_parser("explain", help="per step: types in and out, bytes, and the rules that apply or are "
                                          "contradicted (loads no weights)")
    rx.add_argument("recipe")
    rx.add_argument("--model", default=DEFAULT_MODEL)
    rx.add_argument("--trust-remote-code", action="store_true")
    rx.set_defaults(func=cmd_recipe_explain)

    t = sub.add_parser("techniques", help="list registered techniques with their parameters")
    t.set_defaults(func=cmd_techniques)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
