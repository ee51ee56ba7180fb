"""`lmcompose report`: runs made by the real CLI on a tiny model, rendered to markdown and self-contained HTML."""

import base64
import json
import random
import re
import shutil

import pytest

from lmcompose.algebra.spec import SparseSpec
from lmcompose.cli import main
from lmcompose.models.checkpoint import file_tensor_bytes, load_compressed
from lmcompose.cli import build_parser
from lmcompose.core.pareto import pareto_front
from lmcompose.reporting import load_runs
from lmcompose.reporting.figures import pareto_figure
from lmcompose.reporting.runs import step_label

RECIPES = {
    "sparse-quant": "steps:\n  - wanda: {pattern: '2:4'}\n  - gptq: {bits: 4, group_size: 32, target: sparse}\n",
    "lowrank-quant": "steps:\n  - svd: {ratio: 0.6}\n  - rtn: {bits: 4, group_size: 32}\n",
    "rtn8": "steps:\n  - rtn: {bits: 8, group_size: 32}\n",
}


@pytest.fixture(scope="module")
def runs(setup):  # the tiny model and data of conftest.setup
    root, model_dir, data, _ = setup
    dirs = []
    for name, steps in RECIPES.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text("calibration: {n: 4, seqlen: 32, batch_size: 2}\n" + steps)
        out = root / "runs" / name
        # rtn8 is evaluated on fewer tokens: a different protocol, which the report must call out.
        extra = ["--max-tokens", "2000"] if name == "rtn8" else []
        assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                     "--data-dir", str(data), "--eval", "quick", *extra]) == 0
        dirs.append(out)
    return root, dirs


def report_cli(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def test_byte_breakdown_is_exact_and_matches_the_algebra(runs):
    _, dirs = runs
    loaded = {r.name: r for r in load_runs(dirs)}
    for r in loaded.values():
        assert sum(r.bytes_by_category.values()) == r.total_bytes == file_tensor_bytes(r.path / "model.safetensors")
        assert r.bytes_by_category["other tensors"] == r.total_bytes - r.report["linear_bytes"]  # no biases
    sq, lr, q8 = loaded["sparse-quant"], loaded["lowrank-quant"], loaded["rtn8"]
    assert sq.bytes_by_category["sparse values"] > 0 and sq.bytes_by_category["dense"] == 0
    assert lr.bytes_by_category["low-rank factors"] > 0 and lr.bytes_by_category["sparse index"] == 0
    assert q8.bytes_by_category["dense"] > 0 and q8.bytes_by_category["low-rank factors"] == 0
    assert all(r.bytes_by_category["scales/zeros/perm"] > 0 for r in loaded.values())
    # the index bytes are those the algebra charges for the sparse terms' index (N:M metadata)
    model, _, _ = load_compressed(sq.path)
    index = sum(t.index_nbytes() for m in model.modules() if hasattr(m, "spec") and callable(m.spec)
                for t in m.spec().terms if isinstance(t, SparseSpec))
    assert index == sq.bytes_by_category["sparse index"] > 0


def test_html_is_self_contained_and_embeds_every_figure(runs):
    root, dirs = runs
    out = root / "report"
    assert report_cli(["report", *map(str, dirs), "--out", str(out), "--title", "tiny <runs>"]) == 0
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    pngs = sorted((out / "figures").glob("*.png"))
    assert [p.stem for p in pngs] == ["bytes", "errors", "pareto"]
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(p.read_bytes() for p in pngs)
    assert "<title>tiny &lt;runs&gt;</title>" in page
    # the protocol stands beside every perplexity, and the differing protocol is called out
    ppl_cells = re.findall(r"<td>(\d+\.\d+ \([^<]*)</td>", page)
    assert len(ppl_cells) == 3 and all("quick: wikitext2/test, seqlen 512" in c for c in ppl_cells)
    assert sum("≤2000 tokens" in c for c in ppl_cells) == 1
    assert "2 different protocols" in page
    md = (out / "report.md").read_text()
    assert all(f"](figures/{p.name})" in md for p in pngs) and "2 different protocols" in md
    # runs under two protocols never share a Pareto plot: one row of two panels per protocol
    assert len(pareto_figure(load_runs(dirs)).axes) == 4
    # the output directory is written whole; an existing one needs --overwrite
    with pytest.raises(FileExistsError, match="exists"):
        report_cli(["report", str(dirs[0]), "--out", str(out)])
    assert report_cli(["report", str(dirs[0]), "--out", str(out), "--overwrite"]) == 0
    assert len(re.findall(r"data:image/png;base64,", (out / "report.html").read_text())) == 3


def test_bad_directory_is_named(runs, tmp_path):
    _, dirs = runs
    missing = tmp_path / "no-such-run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_runs([dirs[0], missing])
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    (empty / "report.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + ".*lmcompose.json, model.safetensors"):
        load_runs([empty])
    with pytest.raises(ValueError, match="at least one RUN_DIR"):
        load_runs([])


def test_pareto_front_on_synthetic_points():
    pts = [(1, 10), (2, 5), (3, 6), (2, 5), (4, 1), (5, 1), (0.5, 12), (6, 0.5)]
    # (3, 6) is beaten by (2, 5); (5, 1) by (4, 1); the duplicate (2, 5) pair both stay
    assert pareto_front(pts) == [0, 1, 3, 4, 6, 7]
    rng = random.Random(0)
    pts = [(rng.random(), rng.random()) for _ in range(200)]
    front = pareto_front(pts)
    # along the front, as size grows, perplexity strictly falls; every other point is dominated by it
    ordered = sorted(pts[i] for i in front)
    assert all(a[1] > b[1] for a, b in zip(ordered, ordered[1:]))
    assert all(any(pts[j][0] <= x and pts[j][1] <= y for j in front)
               for i, (x, y) in enumerate(pts) if i not in front)


def test_step_labels_are_short_and_show_what_differs_from_defaults():
    assert step_label({"gptq": {"bits": 4, "group_size": 64, "act_order": True, "percdamp": 0.01,
                                "include": ["*"], "exclude": []}}) == "gptq w4 g64 act_order=True"
    assert step_label({"wanda": {"sparsity": 0.5, "pattern": "unstructured"}}) == "wanda 50% unstructured"
    assert (step_label({"svdllm": {"ratio": 0.8, "exclude": ["*.down_proj"]}})
            == "svdllm ratio 0.8 exclude=[*.down_proj]")


def test_zeroshot_and_fidelity_of_a_run_are_recorded_and_reported(runs, tmp_path, monkeypatch):
    root, dirs = runs
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    shutil.copytree(dirs[0], run)
    data = root / "data"
    rows = [{"q": f"w{i} w{i + 1}", "a": f"w{i + 2}", "b": f"w{i + 3} w{i + 4}", "c": f"w{i + 5}", "label": i % 3}
            for i in range(4)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.json").write_text(json.dumps({"task": "mc", "file": str(tmp_path / "mc.jsonl"),
                                                  "doc_to_text": "{{q}}", "doc_to_choice": "{{[a, b, c]}}",
                                                  "doc_to_target": "label"}))
    assert main(["zeroshot", "--model", str(run), "--tasks", str(tmp_path / "mc.json"), "--limit", "4",
                 "--batch-size", "2", "--dtype", "fp32"]) == 0
    assert main(["fidelity", "--compressed", str(run), "--dense", str(root / "model"), "--data-dir", str(data),
                 "--seqlen", "32", "--max-windows", "2", "--dtype", "fp32"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["zeroshot"]["tasks"]["mc"]["n"] == 4 and 0 <= report["zeroshot"]["tasks"]["mc"]["acc"] <= 1
    assert report["fidelity"]["n_tokens"] == 2 * 32 and report["fidelity"]["kl_mean"] > 0
    assert report["evaluation"]["ppl"] > 0  # the perplexity recorded by compress is kept
    assert report_cli(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    acc = report["zeroshot"]["tasks"]["mc"]["acc"]
    assert "Zero-shot accuracy" in page and f"{acc:.3f}" in page
    assert "Fidelity to the dense model" in page and f"{report['fidelity']['kl_mean']:.4f}" in page
    # a directory that is not a run (a plain model) is evaluated but nothing is written into it
    before = sorted(p.name for p in (root / "model").iterdir())
    assert main(["zeroshot", "--model", str(root / "model"), "--tasks", str(tmp_path / "mc.json"), "--limit", "2",
                 "--dtype", "fp32"]) == 0
    assert sorted(p.name for p in (root / "model").iterdir()) == before
