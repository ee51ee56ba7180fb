"""``lmcompose recipe check|explain`` and ``lmcompose techniques``: what a recipe does, before any weights load."""

from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table

from . import checks
from .common import DEFAULT_MODEL, console, mib, print_totals


def plan_table(result, title: str) -> Table:
    """Planned bytes per Linear role (e.g. self_attn.q_proj), summed over blocks."""
    table = Table(title=escape(title))
    for col in ("Linear", "count", "structure", "bits/weight", "bytes"):
        table.add_column(col, justify="right" if col in ("count", "bits/weight", "bytes") else "left")
    roles: dict[str, list] = {}
    for name in result.compressed:
        role = ".".join(p for p in name.split(".") if not p.isdigit()).split(".", 2)[-1]
        roles.setdefault(role, []).append(result.specs[name])
    for role, specs in roles.items():
        nbytes = sum(s.nbytes() for s in specs)
        weights = sum(s.out_features * s.in_features for s in specs)
        table.add_row(escape(role), str(len(specs)), escape(specs[0].describe()), f"{8 * nbytes / weights:.3f}",
                      mib(nbytes))
    return table


def print_recovery(recipe) -> None:
    rec = recipe.recover
    if rec.steps:
        loss = "causal-LM" if rec.loss == "lm" else (
            f"KL-to-dense ({'top-' + str(rec.top_k) + ' cached' if rec.teacher == 'cached' else 'online'} teacher)")
        names = {"lowrank": "float low-rank factors", "sparse": "float sparse values", "scales": "quantization scales"}
        what = " and ".join(names[p] for p in rec.parts)
        held = f", {rec.heldout} window(s) held out" if rec.heldout else ""
        pool = (f" (from {rec.windows} windows: the {recipe.calibration.n} calibration windows and "
                f"{rec.windows - recipe.calibration.n} more)") if rec.windows else ""
        console.print(f"then recover: {rec.steps} {loss} steps of {rec.batch_size} calibration window(s){pool}, "
                      f"lr {rec.lr:g}, training the {what}{held} (bytes, masks and codes unchanged)")


def check_calibration(recipe, data_dir: str | None, resolve: bool = False) -> None:
    """The recipe's calibration source must be readable, before any weights load: a local file that exists, or a
    named source (its name was checked with the recipe) whose file is in an explicit `data_dir`. With `resolve`
    (compress), a named source must also be found in $LMCOMPOSE_DATA_DIR, the data shipped with lmcompose or on a
    reachable hub."""
    cal = recipe.calibration
    if cal.none:
        return
    checks.data_file(data_dir, cal.source, cal.split)
    if resolve:
        cal.resolve(data_dir)


def check_on_model(recipe, model: str, trust_remote_code: bool):
    from ..models.load import model_linear_shapes

    checks.model_exists(model)
    shapes, other = model_linear_shapes(model, trust_remote_code=trust_remote_code, float_dtype=recipe.float_dtype)
    return recipe.check(shapes, other_bytes=other)


def cmd_recipe_check(args) -> int:
    from ..api import as_recipe

    recipe = as_recipe(args.recipe)
    check_calibration(recipe, args.data_dir)
    result = check_on_model(recipe, args.model, args.trust_remote_code)
    console.print(plan_table(result, f"{args.recipe} on {args.model} (recipe {recipe.hash()})"))
    print_recovery(recipe)
    print_totals({k: (mib(v) if k.endswith("bytes") else f"{v:.4f}" if isinstance(v, float) else v)
                   for k, v in result.to_dict().items()})
    return 0


def cmd_recipe_explain(args) -> int:
    from ..api import as_recipe
    from ..models.load import model_linear_shapes
    from ..rules import RULES, explain

    recipe = as_recipe(args.recipe)
    check_calibration(recipe, args.data_dir)
    checks.model_exists(args.model)
    shapes, _ = model_linear_shapes(args.model, args.trust_remote_code, recipe.float_dtype)
    steps = explain(recipe, shapes)
    table = Table(title=escape(f"{args.recipe} on {args.model}: what each step does"))
    for col in ("#", "step", "Linears", "in", "out", "bytes after", "bits/w", "of fp16", "rules"):
        table.add_column(col, justify="left" if col in ("step", "in", "out", "rules") else "right")
    for s in steps:
        params = ", ".join(f"{k}={v}" for k, v in s.params.items())
        table.add_row(str(s.index), escape(f"{s.name}({params})"), str(s.targets),
                      escape("\n".join(s.structure_in)), escape("\n".join(s.structure_out)), mib(s.linear_bytes),
                      f"{s.bits_per_weight:.3f}", f"{s.ratio_of_fp16:.3f}", escape(", ".join(s.applies)))
    console.print(table)
    print_recovery(recipe)
    used = sorted({r for s in steps for r in s.applies})
    for rid in used:
        rule = RULES[rid]
        console.print(f"[bold]{escape(rid)}[/] ({escape(rule.kind)}) {escape(rule.statement)}. "
                      f"[dim]Source: {escape(rule.source)}[/]")
    warnings = [w for s in steps for w in s.warnings]
    for w in warnings:
        console.print(f"[bold yellow]warning[/] step {w.step}: " + escape(f"{w.message} (contradicts {w.rule.id}: "
                                                                          f"{w.rule.statement}; {w.rule.source})"))
    if not warnings:
        console.print("no rule is contradicted")
    return 0


def cmd_techniques(args) -> int:
    from ..techniques.registry import describe_techniques

    for tech in describe_techniques():
        table = Table(title=escape(f"{tech['name']}  ({tech['family']}): {tech['summary']}"), title_justify="left")
        for col in ("parameter", "default", "description"):
            table.add_column(col)
        for p in tech["params"]:
            table.add_row(escape(p["name"]), escape(json.dumps(p["default"])), escape(p["description"]))
        console.print(table)
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("recipe", help="recipe tools")
    rsub = r.add_subparsers(dest="recipe_command", required=True)
    rc = rsub.add_parser("check", help="type-check and cost a recipe on a model's shapes, loading no weights")
    rx = rsub.add_parser("explain", help="per step: types in and out, bytes, and the rules that apply or are "
                                          "contradicted (loads no weights)")
    for sp, func in ((rc, cmd_recipe_check), (rx, cmd_recipe_explain)):
        sp.add_argument("recipe")
        sp.add_argument("--model", default=DEFAULT_MODEL)
        sp.add_argument("--trust-remote-code", action="store_true")
        sp.add_argument("--data-dir", type=checks.data_dir, default=None,
                        help="where the calibration source is looked for (else $LMCOMPOSE_DATA_DIR, then "
                             "the data shipped with lmcompose, then the hub)")
        sp.set_defaults(func=func)
    t = sub.add_parser("techniques", help="list registered techniques with their parameters")
    t.set_defaults(func=cmd_techniques)

