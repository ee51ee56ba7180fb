"""Zero-shot through lm-evaluation-harness on local files: brute-force scoring, official prompts, real data."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_llama

from lmcompose.eval import tasks as zs_tasks
from lmcompose.eval import zeroshot as zs

lm_eval = pytest.importorskip("lm_eval")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the checkout
OFFICIAL = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml", "piqa": "piqa/piqa.yaml",
            "winogrande": "winogrande/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
            "lambada_openai": "lambada/lambada_openai.yaml"}
WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "tree", "stone"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def official_yaml(name: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / OFFICIAL[name]).read_text(), Loader=Loader)


@torch.no_grad()
def loglik(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log p(continuation | context) and whether every continuation token is the greedy one."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1:-1].double(), -1)
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def mc_rows(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda: WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]  # noqa: E731
    rows = [{"q": f"{pick()} {pick()} {pick()}", "a": pick(), "b": pick() + " " + pick(), "c": pick()}
            for _ in range(n)]
    return rows, [int(torch.randint(3, (1,), generator=g)) for _ in range(n)]


def test_multiple_choice_accuracy_equals_brute_force_loglikelihoods(tmp_path, offline, tiny_tokenizer):
    rows, labels = mc_rows()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc-labels.lst").write_text("".join(f"{y}\n" for y in labels))
    spec = {"task": "tiny_mc", "file": "mc.jsonl", "labels_file": "mc-labels.lst", "split": "test",
            "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "{{[a, b, c]}}", "doc_to_target": "label"}
    model = tiny_llama()
    result = zs.zeroshot(model, tiny_tokenizer, tasks=[spec], data_dir=tmp_path, batch_size=4)
    acc = acc_norm = 0
    for row, y in zip(rows, labels):
        choices = [row["a"], row["b"], row["c"]]
        scores = [loglik(model, tiny_tokenizer, f"Q: {row['q']}\nA:", " " + c)[0] for c in choices]
        acc += max(range(3), key=lambda i: scores[i]) == y
        acc_norm += max(range(3), key=lambda i: scores[i] / len(choices[i])) == y  # per character
    got = result["tasks"]["tiny_mc"]
    assert got["n"] == len(rows)
    assert got["acc"] == pytest.approx(acc / len(rows)) and got["acc_norm"] == pytest.approx(acc_norm / len(rows))
    assert 0 < acc < len(rows)  # the comparison is not vacuous
    assert result["lm_eval_version"] == lm_eval.__version__ and len(result["task_hashes"]["tiny_mc"]) == 16


def test_lambada_style_task_equals_greedy_last_word_check(tmp_path, offline, tiny_tokenizer):
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=g)) for _ in range(10)]
    (tmp_path / "lam.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = tmp_path / "lam.yaml"
    spec.write_text(yaml.safe_dump({"task": "tiny_lambada", "file": str(tmp_path / "lam.jsonl"), "split": "test",
                                    "output_type": "loglikelihood"}))
    model = tiny_llama(seed=1)
    result = zs.zeroshot(model, tiny_tokenizer, tasks=[str(spec)], batch_size=3)["tasks"]["tiny_lambada"]
    scored = [loglik(model, tiny_tokenizer, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in texts]
    assert result["acc"] == pytest.approx(sum(greedy for _, greedy in scored) / len(texts))
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / len(texts)), rel=1e-5)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_builtin_prompts_are_the_official_ones(name):
    official, spec = official_yaml(name), zs_tasks.builtin_spec(name)
    if name == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as pw

        assert (spec.doc_to_text, spec.doc_to_choice, spec.doc_to_target) == (pw.doc_to_text, pw.doc_to_choice,
                                                                             pw.doc_to_target)
        assert official["doc_to_text"] == "!function preprocess_winogrande.doc_to_text"
    else:
        data = SHARED if SHARED.is_dir() else Path(os.environ.get("LMCOMPOSE_DATA_DIR", SHARED))
        if not (data / spec.file).is_file():
            pytest.skip(f"{spec.file} is not under {data} (the task files stay outside the package)")
        config, _ = zs_tasks.task_config(spec, data)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert config.get(key) == official.get(key), key
    assert [m if isinstance(m, str) else m["metric"] for m in spec.metrics] == \
        [m["metric"] for m in official["metric_list"]]
    assert spec.split == ("test" if official.get("test_split") else "validation")
    assert spec.version == official["metadata"]["version"]


EXPECTED = {  # from ../shared/data/README.md: rows and the number of examples whose gold index is 1
    "boolq": (3270, 2033), "rte": (277, 131), "piqa": (1838, 928), "winogrande": (1267, 639),
    "openbookqa": (500, None), "lambada_openai": (5153, None)}


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data beside the checkout")
def test_six_local_tasks_resolve_and_run_offline(offline, tiny_tokenizer):
    from lm_eval.tasks import TaskManager

    configs = {name: zs_tasks.task_config(name, SHARED)[0] for name in zs.DEFAULT_TASKS}
    tasks = TaskManager(include_defaults=False).load(list(configs.values()))["tasks"]
    for name, (rows, ones) in EXPECTED.items():
        docs = list(tasks[name].eval_docs)
        assert len(docs) == rows, name
        if ones is not None:  # winogrande has several contexts and one continuation: gold is doc_to_text
            gold = tasks[name].doc_to_text if name == "winogrande" else tasks[name].doc_to_target
            assert sum(gold(d) == 1 for d in docs) == ones, name
    obqa = tasks["openbookqa"]
    assert all(len(obqa.doc_to_choice(d)) == 4 and 0 <= obqa.doc_to_target(d) < 4 for d in obqa.eval_docs)
    result = zs.zeroshot(tiny_llama(), tiny_tokenizer, tasks=",".join(zs.DEFAULT_TASKS), data_dir=SHARED,
                         limit=2, batch_size=2)
    assert set(result["tasks"]) == set(zs.DEFAULT_TASKS)
    for name, metrics in result["tasks"].items():
        assert metrics["n"] == 2 and 0 <= metrics["acc"] <= 1 and "acc_stderr" in metrics, name
    assert math.isfinite(result["tasks"]["lambada_openai"]["perplexity"])


def test_bad_specs_name_the_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"t": "a"}\n{"t": "b"}\n')
    with pytest.raises(ValueError, match="colour"):
        zs_tasks.task_config({"task": "x", "file": "x.jsonl", "colour": 1}, tmp_path)
    with pytest.raises(ValueError, match="convert='nope'"):
        zs_tasks.task_config({"task": "x", "file": "x.jsonl", "convert": "nope", "doc_to_text": "t",
                        "doc_to_choice": ["a"], "doc_to_target": 0}, tmp_path)
    with pytest.raises(ValueError, match="doc_to_choice"):
        zs_tasks.task_config({"task": "x", "file": "x.jsonl", "doc_to_text": "t", "doc_to_target": 0}, tmp_path)
    with pytest.raises(ValueError, match="task='hellaswag'"):
        zs_tasks.builtin_spec("hellaswag")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        zs_tasks.task_config({"task": "x", "file": "missing.jsonl"}, tmp_path)
    (tmp_path / "x.txt").write_text("a\n")
    with pytest.raises(ValueError, match="suffix '.txt'"):
        zs_tasks.task_config({"task": "x", "file": "x.txt"}, tmp_path)


def test_labels_file_must_match_the_rows(tmp_path, offline, tiny_tokenizer):
    (tmp_path / "x.jsonl").write_text('{"t": "a"}\n{"t": "b"}\n')
    (tmp_path / "y.lst").write_text("0\n")
    spec = {"task": "x", "file": "x.jsonl", "labels_file": "y.lst", "doc_to_text": "{{t}}",
            "doc_to_choice": ["a", "b"], "doc_to_target": "label"}
    with pytest.raises(ValueError, match="1 lines but x.jsonl has 2 rows"):
        zs.zeroshot(tiny_llama(), tiny_tokenizer, tasks=[spec], data_dir=tmp_path)


def test_cli_writes_json_for_a_model_directory(tmp_path, offline, tiny_tokenizer):
    rows, labels = mc_rows(n=4)
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps({**r, "label": y}) + "\n" for r, y in zip(rows, labels)))
    (tmp_path / "mc.json").write_text(json.dumps({"task": "mc", "file": "mc.jsonl", "doc_to_text": "{{q}}",
                                                  "doc_to_choice": "{{[a, b, c]}}", "doc_to_target": "label"}))
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model_dir)
    from lmcompose.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["zeroshot", "--model", str(model_dir), "--tasks", str(tmp_path / "mc.json"),
                              "--data-dir", str(tmp_path), "--limit", "3", "--batch-size", "2",
                              "--json", str(tmp_path / "out.json")])
    assert args.func(args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["tasks"]["mc"]["n"] == 3 and out["limit"] == 3 and out["model"] == str(model_dir)
