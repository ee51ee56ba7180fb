"""Zero-shot tasks from local files: the six standard tasks and your own, as lm-evaluation-harness configs.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.yamlsafe import load_file
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
    data = load_file(path, "task spec")  # plain YAML/JSON, each key once, with size and depth limits
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


# Where a missing built-in task file comes from (the package ships only WikiText-2 test and the C4 sample).
TASK_FILES_HINT = ("the zero-shot task files are not shipped with lmcompose: put them in a data directory laid out "
                   "like ../shared/data (boolq/dev.jsonl, rte/val.jsonl, piqa/valid.jsonl + valid-labels.lst, "
                   "winogrande/dev.jsonl, openbookqa/test.jsonl, lambada/lambada_test.jsonl; where to get each: "
                   "docs/methods/data.md, 'Zero-shot task files') and pass --data-dir or set LMCOMPOSE_DATA_DIR")


def _resolve(path: str, data_dir) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        root = data_root(data_dir)
        if root is None:
            raise FileNotFoundError(f"task file {path!r} is relative but no data directory is set; "
                                    f"{TASK_FILES_HINT}")
        p = root / p
    if not p.is_file():
        raise FileNotFoundError(f"task file {str(p)!r} does not exist"
                                + (f"; {TASK_FILES_HINT}" if not Path(path).expanduser().is_absolute() else ""))
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
