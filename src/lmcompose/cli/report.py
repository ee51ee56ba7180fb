"""``lmcompose report`` (markdown + HTML over run directories) and ``lmcompose export`` (other engines)."""

from __future__ import annotations

from rich.markup import escape

from . import checks
from .common import console, verify_option


def cmd_report(args) -> int:
    """Reads each run's report.json, lmcompose.json and the tensor table in the safetensors header: no weights
    are loaded, so there are no checksums to verify (hence no ``--no-verify``; `export` has one)."""
    from ..reporting.render import caveats, write_report
    from ..reporting.runs import load_runs, n_runs

    for run in args.runs:
        checks.existing(run, "run directory")
    checks.output(args.out, "--out", args.overwrite)
    runs = load_runs(args.runs)
    out = write_report(runs, args.out, args.title, overwrite=args.overwrite)
    for c in caveats(runs):
        console.print(f"[yellow]{escape(c)}[/]")
    console.print(f"wrote {out}/report.html, {out}/report.md and {out}/figures/ ({n_runs(len(runs))})", markup=False)
    return 0


def print_format_table() -> None:
    """``export --list``: which result structures each format carries (data: models.export.format_table)."""
    from rich.table import Table

    from ..models.export import FORMATS, format_table

    table = Table(title="what each export format carries")
    table.add_column("structure", no_wrap=True)
    for fmt in FORMATS:
        table.add_column(fmt, no_wrap=True)
    rows = format_table()
    for row in rows:
        table.add_row(*(escape(row[k]) for k in ("structure", *FORMATS)))
    console.print(table)
    for row in rows:
        console.print(f"{row['structure']}: {row['what']}", markup=False)
    console.print("exact: the stored values, bit for bit; as zeros: a sparse pattern written as explicit zeros "
                  "in the dense grid (our bytes and the file's differ); merged: folded into a float weight; "
                  "requant: re-quantized with --allow-requant; no: refused, naming the Linear (--merge-dense "
                  "writes it as a merged float weight)", markup=False)


def print_export_summary(summary, verbose: bool = False) -> None:
    from rich.table import Table

    from .common import mib

    table = Table(title=f"{summary.format} export: bytes per storage type")
    for col in ("stored as", "Linears", "ours", "in the file"):
        table.add_column(col, no_wrap=True)
    for stored, t in summary.by_stored().items():
        table.add_row(escape(stored), str(t["linears"]), mib(t["our_bytes"]), mib(t["file_bytes"]))
    table.add_row("all Linears", str(len(summary.layers)), mib(summary.our_bytes), mib(summary.layer_file_bytes))
    console.print(table)
    if verbose:  # one line per Linear: names are long, a table would wrap them
        for name, r in summary.layers.items():
            console.print(f"{name}: {r['structure']} -> {r['stored']}, ours {r['our_bytes']:,} B, "
                          f"file {r['file_bytes']:,} B", markup=False, soft_wrap=True)
    for note in summary.notes:
        console.print(f"[yellow]{escape(note)}[/]")
    console.print(f"file size: {mib(summary.file_bytes)}", markup=False)


def cmd_export(args) -> int:
    if args.list:
        print_format_table()
        return 0
    if args.run_dir is None or args.format is None or args.out is None:
        missing = [flag for flag, v in (("RUN_DIR", args.run_dir), ("--format", args.format), ("--out", args.out))
                   if v is None]
        raise ValueError(f"export needs {', '.join(missing)} (or --list to print which structures each format "
                         "carries)")
    from ..models.checkpoint import load_compressed
    from ..models.export.compressed_tensors import export_compressed_tensors
    from ..models.export.dense import export_dense
    from ..models.export.gguf import export_gguf

    checks.existing(args.run_dir, "run directory")
    checks.output(args.out, "--out", args.overwrite, directory=args.format != "gguf")
    model, tokenizer, meta = load_compressed(args.run_dir, verify=not args.no_verify)
    if args.no_tokenizer:
        tokenizer = None
    summary = None
    if args.format == "dense":
        out = export_dense(model, args.out, tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    elif args.format == "compressed-tensors":
        summary = export_compressed_tensors(model, args.out, tokenizer, float_dtype=args.dtype,
                                            overwrite=args.overwrite, merge_dense=args.merge_dense)
    else:
        summary = export_gguf(model, args.out, tokenizer, allow_requant=args.allow_requant, float_dtype=args.dtype,
                              overwrite=args.overwrite, merge_dense=args.merge_dense)
    if summary is not None:
        print_export_summary(summary, args.verbose)
        out = summary.path
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
    e.add_argument("run_dir", nargs="?", help="an lmcompose checkpoint directory (from `lmcompose compress`)")
    e.add_argument("--format", choices=FORMATS)
    e.add_argument("--out", help="output directory (dense, compressed-tensors) or .gguf file")
    e.add_argument("--list", action="store_true", help="print which result structures each format carries, and exit")
    e.add_argument("--merge-dense", action="store_true",
                   help="compressed-tensors, GGUF: write Linears whose structure the format cannot carry (low rank, "
                        "an input scale or rotation, a sum of terms) as merged float weights instead of refusing")
    e.add_argument("--verbose", action="store_true", help="print the per-Linear bytes table")
    e.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the float tensors written (GGUF: fp16 or fp32)")
    e.add_argument("--allow-requant", action="store_true",
                   help="GGUF: re-quantize Linears whose grid has no exact GGML type to the nearest type "
                        "instead of refusing")
    e.add_argument("--no-tokenizer", action="store_true", help="write the weights without the tokenizer")
    verify_option(e, "skip the checksums of the run directory (see eval --help); consistency checks still run")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)
