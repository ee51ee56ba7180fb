"""``lmcompose report`` (markdown + HTML over run directories) and ``lmcompose export`` (other engines)."""

from __future__ import annotations

from rich.markup import escape

from . import checks
from .common import console


def cmd_report(args) -> int:
    """Reads each run's report.json, lmcompose.json and the tensor table in the safetensors header: no weights
    are loaded, so there are no checksums to verify (hence no ``--no-verify``; `export` has one)."""
    from ..reporting.render import caveats, write_report
    from ..reporting.runs import load_runs

    for run in args.runs:
        checks.existing(run, "run directory")
    checks.output(args.out, "--out", args.overwrite)
    runs = load_runs(args.runs)
    out = write_report(runs, args.out, args.title, overwrite=args.overwrite)
    for c in caveats(runs):
        console.print(f"[yellow]{escape(c)}[/]")
    console.print(f"wrote {out}/report.html, {out}/report.md and {out}/figures/ ({len(runs)} runs)", markup=False)
    return 0


def cmd_export(args) -> int:
    from ..models.checkpoint import load_compressed
    from ..models.export.compressed_tensors import export_compressed_tensors
    from ..models.export.dense import export_dense
    from ..models.export.gguf import export_gguf

    checks.existing(args.run_dir, "run directory")
    checks.output(args.out, "--out", args.overwrite, directory=args.format != "gguf")
    model, tokenizer, meta = load_compressed(args.run_dir, verify=not args.no_verify)
    if args.no_tokenizer:
        tokenizer = None
    if args.format == "dense":
        out = export_dense(model, args.out, tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    elif args.format == "compressed-tensors":
        out = export_compressed_tensors(model, args.out, tokenizer, float_dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = export_gguf(model, args.out, tokenizer, allow_requant=args.allow_requant, float_dtype=args.dtype,
                          overwrite=args.overwrite)
    console.print(f"wrote {args.format} export of {args.run_dir} ({meta.get('base_model') or 'model'}) to {out}",
                  markup=False)
    return 0


def add_parser(sub) -> None:
    from ..models.export import FORMATS

    p = sub.add_parser("report", help="markdown + self-contained HTML report with figures from run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `lmcompose compress --out`")
    p.add_argument("--out", required=True, help="output directory for report.html, report.md, figures/")
    p.add_argument("--title", default="lmcompose report")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="write a compressed checkpoint for other engines: merged dense HF, "
                                      "compressed-tensors (vLLM) or GGUF (llama.cpp)")
    e.add_argument("run_dir", help="an lmcompose checkpoint directory (from `lmcompose compress`)")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, help="output directory (dense, compressed-tensors) or .gguf file")
    e.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the float tensors written (GGUF: fp16 or fp32)")
    e.add_argument("--allow-requant", action="store_true",
                   help="GGUF: write Linears whose grid has no GGML type as F16 dense instead of refusing")
    e.add_argument("--no-tokenizer", action="store_true", help="write the weights without the tokenizer")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the checksums of the run directory (see eval --help); consistency checks still run")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)
