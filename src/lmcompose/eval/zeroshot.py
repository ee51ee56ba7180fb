"""Zero-shot accuracy through lm-evaluation-harness, with the tasks read from local files.

lm-evaluation-harness (``pip install lmcompose[eval]``, package ``lm-eval``) is the tool whose numbers the
compression papers report, so we hand it our model rather than re-implementing its scoring: an in-memory
model (whose Linears may be `CompressedLinear`) is wrapped with ``lm_eval.models.huggingface.HFLM
(pretrained=model, tokenizer=tokenizer, batch_size=...)``; a saved lmcompose checkpoint is loaded with
`load_compressed` first. Every task is a multiple-choice or loglikelihood task, scored by comparing
summed log-likelihoods of the continuations (``acc``) and, where the official task has it, the same
divided by each choice's length in characters (``acc_norm``); no text is generated.

Offline tasks. The six standard tasks are built from the files of the data directory (layout of
``../shared/data``, see its README) instead of the Hugging Face hub: each becomes an lm-eval config dict
with ``dataset_path: json`` and ``dataset_kwargs: {data_files: <local file>}``, a ``process_docs`` that
turns the local rows into the hub dataset's schema, and the prompt fields copied verbatim from the
official task YAMLs of lm-eval 0.4.x (``lm_eval/tasks/...``; `test_zeroshot.py` checks them against the
installed package):

| task | local file | official YAML | local → hub schema |
|---|---|---|---|
| ``boolq`` | ``boolq/dev.jsonl`` | ``super_glue/boolq/default.yaml`` | ``label = int(answer)`` |
| ``rte`` | ``rte/val.jsonl`` | ``glue/rte/default.yaml`` | premise/hypothesis → sentence1/2, entailment → 0 |
| ``piqa`` | ``piqa/valid.jsonl`` | ``piqa/piqa.yaml`` | ``label`` from ``valid-labels.lst`` |
| ``winogrande`` | ``winogrande/dev.jsonl`` | ``winogrande/default.yaml`` | none (same fields) |
| ``openbookqa`` | ``openbookqa/test.jsonl`` | ``openbookqa/openbookqa.yaml`` | question.stem → question_stem, choices |
| ``lambada_openai`` | ``lambada/lambada_test.jsonl`` | ``lambada/lambada_openai.yaml`` | none |

The splits are the ones lm-eval scores (BoolQ/RTE/PIQA/WinoGrande validation, OpenBookQA and LAMBADA
test), so with ``limit=None`` and ``num_fewshot=0`` the numbers are those of ``lm_eval --tasks ...``.

Your own task from local files. Write a small spec (YAML or JSON) and pass its path as a task name
(``--tasks boolq,my_task.yaml``) or the dict to `zeroshot`; `task_config` turns it into the lm-eval
config. Fields (`LocalTaskSpec`): ``task`` (name), ``file`` (.jsonl/.json/.parquet/.csv, relative to the
data directory or absolute), ``split`` (its split name, default ``validation``), optional ``labels_file``
(one integer per line, added as column ``label_field``), ``rename`` (old → new column names),
``output_type`` (``multiple_choice`` or ``loglikelihood``), ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` (lm-eval's Jinja templates or field names), ``metrics`` and ``extra`` (any other lm-eval
TaskConfig key, e.g. ``target_delimiter``). A ``loglikelihood`` task without templates is LAMBADA-style:
the context is ``text`` without its last word and the target is that word. Example::

    # my_task.yaml: a two-way multiple-choice task
    task: my_piqa
    file: /data/piqa/valid.jsonl
    labels_file: /data/piqa/valid-labels.lst
    output_type: multiple_choice
    doc_to_text: "Question: {{goal}}\\nAnswer:"
    doc_to_choice: "{{[sol1, sol2]}}"
    doc_to_target: label
    metrics: [acc, acc_norm]

    result = zeroshot(model, tokenizer, tasks=["boolq", "rte", "my_task.yaml"], data_dir="../shared/data",
                      limit=100, batch_size=8)
    result["tasks"]["boolq"]  # {"acc": 0.61, "acc_stderr": 0.049, "n": 100}

Each task is recorded with a config hash: sha256 of its config (callables by qualified name) and of the
bytes of its data files, so two reports compare the same prompts on the same examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.text import data_root

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("boolq", "rte", "piqa", "winogrande", "openbookqa", "lambada_openai")
ALIASES = {"lambada": "lambada_openai", "obqa": "openbookqa"}
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"]}
# LAMBADA-style templates (lm_eval/tasks/lambada/lambada_openai.yaml): predict the last word of `text`.
LAMBADA_TEXT = "{{text.split(' ')[:-1]|join(' ')}}"
LAMBADA_TARGET = "{{' '+text.split(' ')[-1]}}"


# Row converters: local file rows → the hub dataset's schema that the official templates expect.
def _boolq_row(row: dict) -> dict:
    return {**row, "label": int(row["answer"])}


def _rte_row(row: dict) -> dict:
    labels = {"entailment": 0, "not_entailment": 1}  # GLUE RTE: 0 = entailment
    if row["label"] not in labels:
        raise ValueError(f"rte: label={row['label']!r} is not allowed; allowed: {sorted(labels)}")
    return {"sentence1": row["premise"], "sentence2": row["hypothesis"], "label": labels[row["label"]],
            "idx": row["idx"]}


def _openbookqa_row(row: dict) -> dict:
    choices = row["question"]["choices"]
    return {"id": row["id"], "question_stem": row["question"]["stem"], "answerKey": row["answerKey"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


CONVERTERS: dict[str, Callable[[dict], dict]] = {"boolq": _boolq_row, "rte": _rte_row,
                                                 "openbookqa": _openbookqa_row}


class LocalTaskSpec(BaseModel):
    """A multiple-choice or loglikelihood task read from one local file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    task: str = Field(min_length=1)
    file: str = Field(min_length=1)
    split: str = "validation"
    labels_file: str | None = None
    label_field: str = "label"
    rename: dict[str, str] = {}
    convert: str | None = None  # a key of CONVERTERS
    output_type: Literal["multiple_choice", "loglikelihood"] = "multiple_choice"
    doc_to_text: str | Callable | None = None
    doc_to_choice: str | list[str] | Callable | None = None
    doc_to_target: str | int | Callable | None = None
    metrics: list[str | dict] | None = None
    version: float = 1.0
    extra: dict[str, Any] = {}


def _spec_error(where: str, err: ValidationError) -> ValueError:
    e = err.errors()[0]
    field = ".".join(str(p) for p in e["loc"]) or "?"
    return ValueError(f"task spec {where}: {field}={e.get('input')!r} is not allowed: {e['msg']}")


def load_task_spec(path: str | os.PathLike) -> LocalTaskSpec:
    """Read a task spec from a ``.yaml``/``.yml``/``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task spec {str(path)!r} does not exist")
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"task spec {str(path)!r} must be a mapping of fields, got {type(data).__name__}")
    try:
        return LocalTaskSpec(**data)
    except ValidationError as err:
        raise _spec_error(repr(str(path)), err) from None


def _winogrande_functions():
    # The official task's prompt functions, imported from the installed lm-eval rather than copied.
    from lm_eval.tasks.winogrande import preprocess_winogrande as pw

    return pw.doc_to_text, pw.doc_to_choice, pw.doc_to_target


def builtin_spec(name: str) -> LocalTaskSpec:
    """The local-file spec of one of the six standard tasks (templates as in lm-eval's task YAMLs)."""
    name = ALIASES.get(name, name)
    if name == "boolq":  # super_glue/boolq/default.yaml
        return LocalTaskSpec(task="boolq", file="boolq/dev.jsonl", convert="boolq",
                             doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
                             doc_to_choice=["no", "yes"], doc_to_target="label", metrics=["acc"], version=2.0)
    if name == "rte":  # glue/rte/default.yaml
        return LocalTaskSpec(task="rte", file="rte/val.jsonl", convert="rte",
                             doc_to_text="{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
                             doc_to_choice=["True", "False"], doc_to_target="label", metrics=["acc"])
    if name == "piqa":  # piqa/piqa.yaml
        return LocalTaskSpec(task="piqa", file="piqa/valid.jsonl", labels_file="piqa/valid-labels.lst",
                             doc_to_text="Question: {{goal}}\nAnswer:", doc_to_choice="{{[sol1, sol2]}}",
                             doc_to_target="label", metrics=["acc", "acc_norm"])
    if name == "winogrande":  # winogrande/default.yaml (!function preprocess_winogrande.*)
        text, choice, target = _winogrande_functions()
        return LocalTaskSpec(task="winogrande", file="winogrande/dev.jsonl", doc_to_text=text,
                             doc_to_choice=choice, doc_to_target=target, metrics=["acc"])
    if name == "openbookqa":  # openbookqa/openbookqa.yaml
        return LocalTaskSpec(task="openbookqa", file="openbookqa/test.jsonl", split="test", convert="openbookqa",
                             doc_to_text="question_stem", doc_to_choice="{{choices.text}}",
                             doc_to_target="{{choices.label.index(answerKey.lstrip())}}",
                             metrics=["acc", "acc_norm"])
    if name == "lambada_openai":  # lambada/lambada_openai.yaml
        return LocalTaskSpec(task="lambada_openai", file="lambada/lambada_test.jsonl", split="test",
                             output_type="loglikelihood", metrics=["perplexity", "acc"])
    raise ValueError(f"task={name!r} is not a built-in task; allowed: {list(DEFAULT_TASKS)} (aliases "
                     f"{ALIASES}), or the path of a .yaml/.json task spec")


def _resolve(path: str, data_dir) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        root = data_root(data_dir)
        if root is None:
            raise FileNotFoundError(f"task file {path!r} is relative but no data directory is set "
                                    "(pass data_dir / --data-dir or set LMCOMPOSE_DATA_DIR)")
        p = root / p
    if not p.is_file():
        raise FileNotFoundError(f"task file {str(p)!r} does not exist")
    return p


def _process_docs(spec: LocalTaskSpec, labels: list[int] | None):
    """lm-eval's ``process_docs``: rename columns, convert rows, attach labels from the labels file."""
    convert = CONVERTERS[spec.convert] if spec.convert else None

    def process(dataset):
        if labels is not None:
            if len(labels) != len(dataset):
                raise ValueError(f"task {spec.task}: labels_file has {len(labels)} lines but {spec.file} has "
                                 f"{len(dataset)} rows")
            dataset = dataset.add_column(spec.label_field, labels)
        if spec.rename:
            dataset = dataset.rename_columns(spec.rename)
        if convert is not None:
            dataset = dataset.map(convert, remove_columns=dataset.column_names)
        return dataset

    return process


def _metric_list(names: list[str | dict]) -> list[dict]:
    out = []
    for m in names:
        if isinstance(m, dict):
            out.append(m)
        elif m == "perplexity":
            out.append({"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False})
        else:
            out.append({"metric": m, "aggregation": "mean", "higher_is_better": True})
    return out


def task_config(spec: LocalTaskSpec | dict | str, data_dir=None) -> tuple[dict, str]:
    """``(lm-eval config dict, config hash)`` for a spec, a spec dict, a spec file or a built-in name."""
    if isinstance(spec, str):
        spec = load_task_spec(spec) if Path(spec).suffix in (".yaml", ".yml", ".json") else builtin_spec(spec)
    elif isinstance(spec, dict):
        try:
            spec = LocalTaskSpec(**spec)
        except ValidationError as err:
            raise _spec_error(repr(spec.get("task", "?")), err) from None
    if spec.convert is not None and spec.convert not in CONVERTERS:
        raise ValueError(f"task {spec.task}: convert={spec.convert!r} is not allowed; allowed: {sorted(CONVERTERS)}")
    path = _resolve(spec.file, data_dir)
    fmt = FORMATS.get(path.suffix)
    if fmt is None:
        raise ValueError(f"task {spec.task}: file {str(path)!r} has suffix {path.suffix!r}; allowed: {sorted(FORMATS)}")
    files = [path]
    labels = None
    if spec.labels_file is not None:
        files.append(_resolve(spec.labels_file, data_dir))
        labels = [int(line) for line in files[-1].read_text().split()]
    text, choice, target = spec.doc_to_text, spec.doc_to_choice, spec.doc_to_target
    if spec.output_type == "loglikelihood" and text is None and target is None:
        text, target = LAMBADA_TEXT, LAMBADA_TARGET
    if text is None or target is None or (spec.output_type == "multiple_choice" and choice is None):
        raise ValueError(f"task {spec.task}: a {spec.output_type} task needs doc_to_text, doc_to_target"
                         f"{' and doc_to_choice' if spec.output_type == 'multiple_choice' else ''}")
    config = {"task": spec.task, "dataset_path": fmt, "dataset_name": None,
              "dataset_kwargs": {"data_files": {spec.split: str(path)}},
              f"{'test' if spec.split == 'test' else 'validation'}_split": spec.split,
              "output_type": spec.output_type, "doc_to_text": text, "doc_to_target": target,
              "process_docs": _process_docs(spec, labels),
              "metric_list": _metric_list(spec.metrics or DEFAULT_METRICS[spec.output_type]),
              "metadata": {"version": spec.version}, **spec.extra}
    if choice is not None:
        config["doc_to_choice"] = choice
    docs = spec.model_dump(include={"split", "label_field", "rename", "convert"})
    return config, _config_hash(config, docs, files)


def _config_hash(config: dict, docs: dict, files: list[Path]) -> str:
    """sha256 of the prompt config, of how rows are processed and of the data bytes (not of paths)."""
    def named(v):
        return f"{v.__module__}.{v.__qualname__}" if callable(v) else str(v)

    keyed = {k: v for k, v in config.items() if k not in ("dataset_kwargs", "process_docs")} | {"docs": docs}
    h = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=named).encode())
    for f in files:
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


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


def zeroshot(model, tokenizer=None, tasks=DEFAULT_TASKS, data_dir=None, limit: int | float | None = None,
             batch_size: int = 8, num_fewshot: int = 0, bootstrap_iters: int = 1000, device=None) -> dict:
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
        device: where a checkpoint given by path is loaded (default cpu); an in-memory model stays where it is.

    Returns:
        ``{"tasks": {task: {metric: value, metric_stderr: value, "n": examples}}, "lm_eval_version",
        "task_hashes": {task: hash}, "limit", "num_fewshot", "batch_size", "seconds"}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise ValueError("tasks=[] is not allowed: give at least one task")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: must be >= 1")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot} is not allowed: must be >= 0")
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
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=configs, num_fewshot=num_fewshot, limit=limit,
                                      bootstrap_iters=bootstrap_iters, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False))
    summary = {"tasks": _summarise(results, list(hashes)), "lm_eval_version": lm_eval.__version__,
               "task_hashes": hashes, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
               "seconds": time.perf_counter() - t0}
    log.info("zero-shot %s in %.1fs", {k: v.get("acc") for k, v in summary["tasks"].items()}, summary["seconds"])
    return summary
