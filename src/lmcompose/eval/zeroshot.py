"""Zero-shot accuracy through lm-evaluation-harness, with the tasks read from local files.

lm-evaluation-harness (``pip install lmcompose[eval]``, package ``lm-eval``) is the tool whose numbers the
compression papers report, so we hand it our model rather than re-implementing its scoring: an in-memory
model (whose Linears may be `CompressedLinear`) is wrapped with ``lm_eval.models.huggingface.HFLM
(pretrained=model, tokenizer=tokenizer, batch_size=...)``; a saved lmcompose checkpoint is loaded with
`load_compressed` first. A model bigger than memory (``blocks=``, ``lmcompose zeroshot --stream``) is run one
decoder block at a time, with lm-eval's own batches (`eval.streamed.StreamedCalls`). Every task is a multiple-choice or loglikelihood task, scored by comparing
summed log-likelihoods of the continuations (``acc``) and, where the official task has it, the same
divided by each choice's length in characters (``acc_norm``); no text is generated.

Each task is recorded with a config hash: sha256 of its config (callables by qualified name) and of the
bytes of its data files, so two reports compare the same prompts on the same examples.
"""

from __future__ import annotations

import logging
import os
import time

from .tasks import DEFAULT_TASKS, task_config

log = logging.getLogger(__name__)


def _summarise(results: dict, names: list[str]) -> dict:
    out = {}
    for name in names:
        row = results["results"][name]
        metrics = {}
        for key, value in row.items():
            if "," not in key or value == "N/A":
                continue
            metric = key.split(",")[0]
            metrics[metric] = float(value) if value is not None else None
        metrics["n"] = int(results.get("n-samples", {}).get(name, {}).get("effective", 0))
        out[name] = metrics
    return out


def _lm(model, tokenizer, batch_size: int, calls=None):
    """lm-eval's HFLM around `model`; with `calls` (an `eval.streamed.StreamedCalls`), one whose model calls it
    answers, each log-likelihood request kind run twice (recorded, then replayed block by block)."""
    from lm_eval.models.huggingface import HFLM

    if calls is None:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    class StreamedHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            return calls(inps)

        def _twice(self, score, requests, disable_tqdm):
            calls.record()
            score(requests, disable_tqdm=True)
            calls.replay()
            return score(requests, disable_tqdm=disable_tqdm)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._twice(super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._twice(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise ValueError("a streamed model (one block in memory at a time) scores log-likelihoods only; a task "
                             "that generates text needs the model in memory (run without --stream)")

    return StreamedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def zeroshot(model, tokenizer=None, tasks=DEFAULT_TASKS, data_dir=None, limit: int | float | None = None,
             batch_size: int = 8, num_fewshot: int = 0, bootstrap_iters: int = 1000, device=None,
             blocks=None, progress=None) -> dict:
    """Zero-shot accuracy of `model` on local-file tasks through lm-evaluation-harness.

    Args:
        model: a transformers causal LM (its Linears may be `CompressedLinear`), or the path of an
            lmcompose checkpoint directory (loaded with `load_compressed` on `device`, default cpu).
        tokenizer: the model's tokenizer (taken from the checkpoint when `model` is a path).
        tasks: built-in names (`DEFAULT_TASKS`, aliases `ALIASES`), spec file paths, spec dicts or
            `LocalTaskSpec` objects.
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``) for relative task files.
        limit: examples per task (the first ones, as lm-eval's ``--limit``); None for all.
        batch_size: lm-eval's loglikelihood batch size.
        num_fewshot: few-shot examples per prompt (0 is the protocol of the compression papers; a task
            whose only split is the evaluated one draws few-shot examples from it, as lm-eval does).
        bootstrap_iters: resamples for bootstrapped stderrs (LAMBADA perplexity); accuracy stderrs are
            closed-form.
        device: where a checkpoint given by path is loaded (default cpu); an in-memory model stays where it is;
            a streamed model's loaded tensors, blocks and hidden states go there (default: where they are).
        blocks: for a model bigger than memory, its block loader: `model` then comes from
            `models.stream.open_for_streaming` (decoder blocks on the meta device) and every model call of
            lm-eval is answered one block at a time (`eval.streamed.StreamedCalls`); the results equal those of
            the model in memory.
        progress: with `blocks`, an optional ``callable(done, total)`` counting block passes (total None).

    Returns:
        ``{"tasks": {task: {metric: value, metric_stderr: value, "n": examples}}, "lm_eval_version",
        "task_hashes": {task: hash}, "limit", "num_fewshot", "batch_size", "seconds"}``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("tasks=[] is not allowed: give at least one task")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: must be >= 1")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} is not allowed: must be >= 0")
    if blocks is not None and isinstance(model, (str, os.PathLike)):
        raise ValueError("blocks= needs the model opened by models.stream.open_for_streaming, not a path")
    if isinstance(model, (str, os.PathLike)):
        from ..models.checkpoint import load_compressed

        model, saved_tok, _ = load_compressed(model, device=device or "cpu")
        tokenizer = tokenizer or saved_tok
    if tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer")
    configs, hashes = [], {}
    for t in tasks:
        config, digest = task_config(t, data_dir)
        if config["task"] in hashes:
            raise ValueError(f"task {config['task']!r} is given twice")
        configs.append(config)
        hashes[config["task"]] = digest
    t0 = time.perf_counter()
    calls = None
    if blocks is not None:
        from .streamed import StreamedCalls

        calls = StreamedCalls(model, blocks, device, progress=progress)
    lm = _lm(model, tokenizer, batch_size, calls)
    results = lm_eval.simple_evaluate(model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False))
    summary = {"tasks": _summarise(results, list(hashes)), "lm_eval_version": lm_eval.__version__,
               "task_hashes": hashes, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
               "seconds": time.perf_counter() - t0}
    log.info("zero-shot %s in %.1fs", {k: v.get("acc") for k, v in summary["tasks"].items()}, summary["seconds"])
    return summary
