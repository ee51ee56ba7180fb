"""``lmcompose analyze``: how two techniques interact (A, B, A→B, B→A and a joint method)."""

from __future__ import annotations

from pathlib import Path

from ..eval.perplexity import PROTOCOLS
from . import checks
from .common import console, model_options, progress


def _step_arg(text: str | None, flag: str):
    """The step `flag` gives as YAML text, validated as a recipe step (before anything loads)."""
    from ..core.messages import shown
    from ..core.yamlsafe import parse_yaml
    from ..recipe import build_step

    if text is None:
        return None
    step = parse_yaml(text, flag)
    if not isinstance(step, dict) or len(step) != 1:
        raise ValueError(f"{flag}={shown(text)} must be one step, e.g. \"wanda: {{sparsity: 0.5}}\"")
    try:
        build_step(step)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
    return step


def cmd_analyze(args) -> int:
    from ..analysis.orthogonality import analyze, to_markdown, write
    from ..eval.perplexity import get_protocol
    from ..models.checkpoint import META_FILE

    a, b, joint = _step_arg(args.a, "--a"), _step_arg(args.b, "--b"), _step_arg(args.joint, "--joint")
    overrides = {k: v for k, v in (("max_windows", args.max_windows), ("max_tokens", args.max_tokens)) if v}
    protocol = get_protocol(args.protocol, **overrides)
    calibration = {"n": args.calib_n, "seqlen": args.calib_seqlen, "seed": args.seed}
    out = checks.output(args.out, "--out", overwrite=None)
    checks.data_file(args.data_dir, "c4", "validation", resolve=True)
    checks.data_file(args.data_dir, protocol.dataset, protocol.split, resolve=True)
    checks.model_exists(args.model)
    if (Path(args.model).expanduser() / META_FILE).is_file():
        raise ValueError(f"--model {args.model!r} is an lmcompose run directory; analyze compresses a dense model: "
                         "pass the dense model it was made from (its base_model in lmcompose.json)")
    with progress() as prog:
        task = prog.add_task("analyze (variants)", total=5 if joint else 4)
        an = analyze(args.model, a, b, joint, calibration=calibration, protocol=protocol, data_dir=args.data_dir,
                     dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                     verify=not args.no_verify,
                     on_variant=lambda name, steps: prog.update(task, advance=1, description=f"analyze: {name}"))
    write(an, out)
    console.print(to_markdown(an), markup=False)
    console.print(f"wrote {out}/analysis.json, analysis.md, analysis.png", markup=False)
    return 0


def add_parser(sub) -> None:
    an = sub.add_parser("analyze", help="orthogonality of two techniques: A, B, A→B, B→A and a joint method")
    model_options(an, model_help="the dense model: short name (smollm2-135m, gemma3-270m), hub id, local "
                                 "Hugging Face directory or .gguf file (not an lmcompose run directory)",
                  verify_help="skip the checksums of a .gguf model's cached dequantized copy (its sizes are still "
                              "checked)")
    an.add_argument("--a", required=True, help='first step as YAML, e.g. "wanda: {sparsity: 0.5}"')
    an.add_argument("--b", required=True, help='second step, e.g. "gptq: {bits: 4, group_size: 64}"')
    an.add_argument("--joint", default=None, help="optional joint method doing both at once")
    an.add_argument("--out", required=True, help="directory for analysis.json/.md/.png")
    an.add_argument("--protocol", default="quick", choices=list(PROTOCOLS))
    an.add_argument("--max-windows", type=checks.count(), default=None)
    an.add_argument("--max-tokens", type=checks.count(2), default=None)
    an.add_argument("--calib-n", type=checks.count(), default=128)
    an.add_argument("--calib-seqlen", type=checks.count(8), default=512)
    an.add_argument("--seed", type=checks.seed, default=0)
    an.set_defaults(func=cmd_analyze)

