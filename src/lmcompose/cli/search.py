"""``lmcompose search``: recipes (order, techniques, knobs) searched under a byte budget."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from . import checks
from .common import DEFAULT_MODEL, err_console, progress, verify_option


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="search recipes (order, techniques, knobs) under a byte budget")
    from ..search.study import LEVELS, SAMPLERS, StudySettings

    s.add_argument("--model", default=DEFAULT_MODEL)
    b = s.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget", type=checks.number(0, 1, low_open=True),
                   help="fraction of the compressed Linears' fp16 bytes, e.g. 0.5")
    b.add_argument("--bits-per-weight", type=checks.number(0, 16, low_open=True),
                   help="bits per weight of the compressed Linears, e.g. 4.2")
    s.add_argument("--trials", type=checks.count(), default=100, help="finished trials, all workers together")
    s.add_argument("--out", required=True, help="directory of the study and its results (the same --out resumes "
                                                  "a killed search with the same arguments)")
    s.add_argument("--workers", type=checks.count(1, 1024), default=1,
                   help="local worker processes (or Ray tasks in flight)")
    s.add_argument("--backend", default="local", choices=["local", "ray"])
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    s.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///<out>/study.db)")
    s.add_argument("--study-name", default="lmcompose")
    s.add_argument("--space", default=None, help="search space YAML (default: lmcompose.search.space.DEFAULT_SPACE)")
    s.add_argument("--sampler", default="auto", choices=list(SAMPLERS))
    s.add_argument("--front", action="store_true", help="two objectives (bytes, score): NSGA-II front")
    s.add_argument("--level", default=StudySettings.level, choices=list(LEVELS),
                   help="what each trial scores: independent (default: held-out perplexity of the model holding "
                        "the independently compressed layers), proxy (their weighted layer error, cheaper, ranks "
                        "worse: BENCHMARKS.md), quick (the real pipeline, then held-out perplexity)")
    s.add_argument("--finalists", type=checks.count(0), default=10, help="best trials measured by quick perplexity")
    s.add_argument("--full-finalists", type=checks.count(0), default=0,
                   help="of those, how many get the full protocol")
    s.add_argument("--calib-n", type=checks.count(), default=32)
    s.add_argument("--calib-seqlen", type=checks.count(8), default=512)
    s.add_argument("--heldout-n", type=checks.count(0), default=8,
                   help="held-out calibration windows for quick perplexity")
    s.add_argument("--seed", type=checks.seed, default=0)
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the dense weights in memory (the techniques read them)")
    s.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the forwards (statistics, candidates, evaluation); auto = bf16 where faster")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--data-dir", type=checks.data_dir, default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    verify_option(s, "skip the checksums of a .gguf model's cached dequantized copy (its sizes are still checked)")
    s.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from ..data import calibration_windows
    from ..models.load import load_model, model_linear_shapes
    from ..pipeline.dense_stats import DenseStats
    from ..search.objective import Evaluator
    from ..search.ray_runner import run_ray
    from ..search.results import (
        completed,
        evaluate_finalists,
        to_markdown,
        write_results,
    )
    from ..search.space import Budget, SearchSpace, default_space
    from ..search.study import (
        EvaluatorSpec,
        Problem,
        StudySettings,
        check_resume,
        load_dense,
        run_local,
        start_workers,
    )

    # Every argument is checked before anything is loaded, and a resumed study must be the same search.
    if args.heldout_n < 1 and (args.level != "proxy" or args.finalists > 0):
        raise ValueError(f"--heldout-n={args.heldout_n}: level {args.level!r} and --finalists={args.finalists} "
                         "score held-out perplexity; give --heldout-n >= 1, or --level proxy --finalists 0")
    if args.full_finalists > args.finalists:
        raise ValueError(f"--full-finalists={args.full_finalists} is more than --finalists={args.finalists}; allowed: "
                         "at most --finalists")
    out = checks.output(args.out, "--out", overwrite=None)
    budget = Budget(ratio=args.budget) if args.budget is not None else Budget(bits_per_weight=args.bits_per_weight)
    calibration = {"n": args.calib_n, "seqlen": args.calib_seqlen, "seed": args.seed}
    if args.space:
        space = SearchSpace.load(args.space)
        space = space.model_copy(update={"calibration": space.calibration or calibration})
    else:
        space = default_space(budget, calibration=calibration)
    checks.data_file(args.data_dir, "c4", "validation")
    checks.model_exists(args.model)
    model_id = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    identity = {"model": model_id, "budget": budget.describe(), "space": space.fingerprint(),
                "calibration": {**calibration, "heldout_n": args.heldout_n}, "level": args.level,
                "front": args.front}
    settings = StudySettings(storage=args.storage or f"sqlite:///{(out / 'study.db').resolve()}",
                             study_name=args.study_name, sampler=args.sampler, seed=args.seed, level=args.level,
                             front=args.front, identity=identity)
    settings.check_space(space)
    check_resume(settings)
    shapes, _ = model_linear_shapes(args.model, args.trust_remote_code)
    problem = Problem.make(space, shapes, budget, args.sampler)
    if problem.grid is not None:
        err_console.print(f"grid: {len(problem.grid)} recipes admitted, {len(problem.cut)} cut before any work")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code, verify=not args.no_verify)
    windows = calibration_windows(tokenizer, n=args.calib_n + args.heldout_n, seqlen=args.calib_seqlen,
                                  seed=args.seed, data_dir=args.data_dir)
    calib, heldout = windows[:args.calib_n], windows[args.calib_n:]
    factory = functools.partial(load_dense, args.model, args.dtype, args.device, args.trust_remote_code,
                                not args.no_verify)
    spec = EvaluatorSpec(factory, calib, heldout, str(out / "cache"), args.device, name=args.model,
                         compute_dtype=args.compute_dtype)
    evaluator = Evaluator(model, DenseStats.load_or_compute(model, calib, spec.cache_dir,
                                                            compute_dtype=args.compute_dtype),
                          calib, heldout, compute_dtype=args.compute_dtype)
    total = min(args.trials, len(problem.grid)) if problem.grid is not None else args.trials
    with progress() as prog:
        task = prog.add_task("search", total=total)

        def show(study, _trial=None):
            rows = completed(study)
            best = min((t.values[-1] for t in rows), default=float("nan"))
            prog.update(task, completed=len(study.get_trials(deepcopy=False, states=_done())),
                        description=f"search (best {best:.4g})")

        if args.backend == "ray":
            study = run_ray(problem, spec, settings, total, args.workers, args.ray_address, on_trial=show)
        else:
            procs = start_workers(args.workers - 1, spec, problem, settings, total)
            study = run_local(problem, evaluator, settings, total, callbacks=[show])
            for p in procs:
                p.join()
    correlations = evaluate_finalists(study, evaluator, args.finalists, args.level,
                                      functools.partial(full_ppl, args, tokenizer), args.full_finalists)
    summary = write_results(study, budget, out, {"correlations": correlations,
                                                  "wall_seconds": time.perf_counter() - t0,
                                                  "cut_before_work": len(problem.cut)})
    err_console.print(to_markdown(summary, budget), markup=False)
    err_console.print(f"rank correlations: {json.dumps(correlations)}", markup=False)
    err_console.print(f"wrote {out}/front.json, front.md, front.png, best.yaml, trials.json, summary.json",
                      markup=False)
    return 0


def full_ppl(args, tokenizer, model) -> float:
    """Level 3: the full protocol (WikiText-2 test, seqlen 2048) of a compressed finalist."""
    from ..eval.perplexity import perplexity

    return perplexity(model, tokenizer, "full", data_dir=args.data_dir).ppl


def _done():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)

