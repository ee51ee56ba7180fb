"""``lmcompose generate RUN --prompt "..."``: what a compressed model writes, beside its dense model's answer.

The dense answer comes by default when the run records its base model (every run of ``lmcompose compress``
does): reading both is the quickest check of what compression cost. ``--dense NAME`` names another reference,
``--no-dense`` skips it (half the time). All arguments, the model names included, are checked before a model
loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.text import Text

from ..core.dtypes import CHOICES as DTYPE_CHOICES
from ..core.messages import with_hint
from . import checks
from .common import DTYPE_HELP, console, verify_option

MAX_NEW_TOKENS = 4096


def dense_reference(args) -> str | None:
    """The dense model to answer beside `args.model`: ``--dense``, else the run's recorded base model, else none."""
    from ..models.checkpoint import META_FILE

    if args.no_dense:
        return None
    if args.dense:
        checks.model_exists(args.dense, "--dense")
        return args.dense
    meta_path = Path(args.model).expanduser() / META_FILE
    if not meta_path.is_file():
        return None  # a plain model: nothing to compare with unless --dense names it
    try:
        base = json.loads(meta_path.read_text()).get("base_model") or None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON ({err})") from None
    if base is not None:
        try:
            checks.model_exists(base, "the run's base_model")
        except FileNotFoundError as err:
            raise with_hint(err, "pass --dense NAME to name the dense model, or --no-dense") from None
    return base


def cmd_generate(args) -> int:
    from ..core.dtypes import eval_dtype
    from ..eval.generate import generate_text
    from ..models.load import load_any

    if not args.prompt.strip():
        raise ValueError("--prompt is empty; allowed: any non-empty text")
    if args.no_dense and args.dense:
        raise ValueError("give --dense NAME or --no-dense, not both")
    checks.model_exists(args.model, "RUN")
    dense = dense_reference(args)
    dtype = eval_dtype(args.dtype, args.device)
    answers = []
    for name in [args.model] + ([dense] if dense else []):
        model, tokenizer = load_any(name, dtype, args.device, args.trust_remote_code, verify=not args.no_verify)
        answers.append((name, generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                                            chat_template=not args.no_chat_template)))
        del model
    console.print(Text.assemble(("prompt: ", "bold"), args.prompt), soft_wrap=True)
    for i, (name, a) in enumerate(answers):
        how = f"{len(a.token_ids)} tokens in {a.seconds:.1f} s, greedy{', chat template' if a.chat_template else ''}"
        console.print(Text.assemble(("\ndense answer" if i else "\nanswer", "bold"), f" of {name} ", (f"({how})", "dim")),
                      soft_wrap=True)
        console.print(Text(a.text or "(no text)"), soft_wrap=True)
    if dense is None and not args.no_dense:
        console.print("(no dense answer: this is not an lmcompose run directory; --dense NAME adds one)", markup=False)
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="greedy answer of a run (or any model) to a prompt, beside the dense model's")
    g.add_argument("model", metavar="RUN", help="an lmcompose run directory, or any model `--model` takes elsewhere")
    g.add_argument("--prompt", required=True, help="the text to answer (a user turn of the chat template)")
    g.add_argument("--max-new-tokens", type=checks.count(1, MAX_NEW_TOKENS), default=64)
    g.add_argument("--no-chat-template", action="store_true",
                   help="give the prompt as plain text even when the tokenizer has a chat template")
    g.add_argument("--dense", default=None, help="the dense model to answer beside it (default: the run's base model)")
    g.add_argument("--no-dense", action="store_true", help="only the run's answer (no dense model is loaded)")
    g.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help=DTYPE_HELP)
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    g.add_argument("--trust-remote-code", action="store_true")
    verify_option(g, "skip the checksums of a run directory (see eval --help)")
    g.set_defaults(func=cmd_generate)
