"""Distillation and scale training in recovery: KL to the dense teacher (cached top-k or online), E2E-QP
scales with codes fixed, held-out windows, and the chunked KL's memory bound."""

import copy

import pytest
import torch
from helpers import MODELS, logits, windows

from lmcompose import Recipe, compress
from lmcompose.core.errors import IllegalStep
from lmcompose.models.checkpoint import (
    file_tensor_bytes,
    load_compressed,
    save_compressed,
)
from lmcompose.pipeline.blocks import compressed_modules
from lmcompose.recipe import Recovery
from lmcompose.training.distill import (
    CachedTeacher,
    ChunkedLogits,
    OnlineTeacher,
    chunked_kl,
    dense_teacher,
    kl_full,
    kl_topk,
    topk_targets,
)
from lmcompose.training.recover import recover

# SSLC leaves S + L; quantizing only S leaves float factors next to 4-bit sparse values.
SSLC = [{"sslc": {"ratio": 0.5, "iterations": 5}}, {"rtn": {"bits": 4, "group_size": 16, "target": "sparse"}}]
GPTQ = [{"gptq": {"bits": 3, "group_size": 16}}]


def stored(model):
    return {n: m.state(n) for n, m in compressed_modules(model).items()}


def kl_to(dense, model, x) -> float:
    """The exact mean KL(dense ‖ model) over every position of `x`."""
    return float(kl_full(logits(model, x).flatten(0, 1), logits(dense, x).flatten(0, 1)).mean())


def compressed(arch, steps, n=8, seqlen=32, sharpen=1.0, **teacher_options):
    """(dense copy, compressed model, windows, the cached teacher taken before compressing). `sharpen`
    scales the output head: a peaked teacher, like a trained LM's, instead of a random model's flat one."""
    model, x = MODELS[arch](), windows(n, seqlen)
    model.lm_head.weight.data *= sharpen
    dense = copy.deepcopy(model)
    teacher = dense_teacher(model, x, Recovery(steps=1, loss="kl", **teacher_options))
    compress(model, Recipe.from_dict({"steps": steps}), x, compute_dtype="fp32")
    return dense, model, x, teacher


# -- the KL itself ---------------------------------------------------------------------------------------

def test_topk_kl_is_exact_over_the_whole_vocabulary_and_a_lower_bound_below_it():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(20, 50, generator=g) * 3, torch.randn(20, 50, generator=g) * 3
    full = kl_full(student, teacher)
    assert torch.allclose(kl_topk(student, *topk_targets(teacher, 50)), full, atol=1e-5)
    for k in (1, 8, 49):
        coarse = kl_topk(student, *topk_targets(teacher, k))
        assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all()  # coarsening never raises a KL
    assert torch.allclose(kl_topk(teacher, *topk_targets(teacher, 8)), torch.zeros(20), atol=1e-5)


@pytest.mark.parametrize("head_path", [True, False])
@pytest.mark.parametrize("cached", [True, False])
def test_chunked_kl_and_its_gradient_equal_the_unchunked_formula(head_path, cached):
    model, x = MODELS["llama"](), windows(2, 12)
    target = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(3)) * 2
    ids, logp, rest = (t.view(2, 12, -1) for t in topk_targets(target.flatten(0, 1), 16))

    def divergence(s, e, z):
        if cached:
            return kl_topk(z, ids[:, s:e].flatten(0, 1), logp[:, s:e].flatten(0, 1), rest[:, s:e].flatten())
        return kl_full(z, target[:, s:e].flatten(0, 1))

    student = ChunkedLogits(model, "fp32", x[:1])
    assert student.parts is not None
    if not head_path:
        student.parts = None  # the fallback: the model's full logits, compared chunk by chunk
    value = chunked_kl(student, x, divergence, chunk=5, backward=True)
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    whole = divergence(0, 12, model(input_ids=x).logits.flatten(0, 1)).mean()
    whole.backward()
    assert value == pytest.approx(float(whole), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(chunked[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_cached_teacher_on_disk_holds_the_same_targets_as_in_memory_and_cleans_up(tmp_path):
    model, x = MODELS["gemma3"](), windows(5, 16)
    memory = CachedTeacher(model, x, 8, batch_size=2)
    disk = CachedTeacher(model, x, 8, batch_size=2, memory_limit=0, directory=tmp_path)
    assert memory.describe()["teacher_store"] == "memory" and disk.describe()["teacher_store"] == "disk"
    assert memory.nbytes == disk.nbytes == 5 * 16 * (8 * 8 + 4)
    files = sorted(disk.path.iterdir())
    assert len(files) == 5 and all(f.suffix == ".safetensors" for f in files)
    rows = torch.tensor([4, 0, 2])
    for a, b in zip(memory.targets(rows, "cpu"), disk.targets(rows, "cpu")):
        assert torch.equal(a, b)
    ids, logp, rest = memory.targets(torch.tensor([3]), "cpu")
    full = logits(model, x[3:4]).flatten(0, 1)  # the soft-capped logits of the dense model
    assert torch.allclose(logp[0].exp().sum(-1) + rest[0].exp(), torch.ones(16), atol=1e-5)
    assert torch.equal(ids[0].long(), full.topk(8).indices)
    disk.close()
    assert not any(tmp_path.iterdir())


# -- recovery with a KL loss ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(MODELS))
def test_kl_recovery_lowers_the_kl_to_the_dense_model_more_than_lm_recovery(arch):
    dense, model, x, teacher = compressed(arch, SSLC, top_k=128)  # k = the whole vocabulary: the exact KL
    by_kl, by_lm = copy.deepcopy(model), copy.deepcopy(model)
    info = recover(by_kl, x, Recovery(steps=20, lr=1e-2, batch_size=4, loss="kl", top_k=128), teacher=teacher)
    recover(by_lm, x, Recovery(steps=20, lr=1e-2, batch_size=4))
    assert info["kl_after"] < 0.7 * info["kl_before"] and info["teacher"] == "cached"
    assert info["kl_before"] == pytest.approx(kl_to(dense, model, x[:8]), rel=1e-4)
    # on these random windows the LM loss pulls away from the teacher; the KL loss pulls towards it
    assert kl_to(dense, by_kl, x) < min(kl_to(dense, model, x), kl_to(dense, by_lm, x))
    assert info["loss_first"] > info["loss_last"]


def test_cached_top_k_and_online_teachers_train_to_close_models():
    dense, model, x, cached = compressed("llama", SSLC, sharpen=20.0, top_k=32)
    mass = torch.softmax(logits(dense, x), -1).topk(32).values.sum(-1).mean()
    assert mass > 0.9  # the regime top-k caching is for: the top 32 of 128 tokens hold most of the mass
    online, exact = OnlineTeacher(dense), CachedTeacher(dense, x, 128)
    runs = {}
    for name, teacher, k in (("cached", cached, 32), ("exact", exact, 128), ("online", online, 64)):
        tuned = copy.deepcopy(model)
        teach = "online" if name == "online" else "cached"
        runs[name] = recover(tuned, x, Recovery(steps=15, lr=1e-2, batch_size=4, loss="kl", teacher=teach, top_k=k),
                             teacher=teacher), kl_to(dense, tuned, x)
    # the cached top-V teacher is the online one up to rounding; the top-32 one trains to a close model
    assert runs["exact"][0]["kl_after"] == pytest.approx(runs["online"][0]["kl_after"], rel=1e-3)
    assert runs["exact"][0]["kl_before"] == pytest.approx(runs["online"][0]["kl_before"], rel=1e-4)
    assert runs["cached"][1] == pytest.approx(runs["online"][1], rel=0.05)
    assert runs["online"][1] < 0.6 * kl_to(dense, model, x)
    assert runs["cached"][0]["kl_before"] < runs["online"][0]["kl_before"]  # a coarsening: a lower bound
    assert runs["online"][0]["teacher_bytes"] == sum(p.numel() * 4 for p in dense.parameters())


def test_kl_recovery_needs_its_teacher():
    _, model, x, _ = compressed("llama", SSLC)
    with pytest.raises(ValueError, match="needs the dense teacher"):
        recover(model, x, Recovery(steps=2, loss="kl"))


# -- scales (EfficientQAT's E2E-QP) ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(MODELS))
def test_training_scales_changes_only_scales_and_keeps_the_planned_bytes(arch, tmp_path):
    _, model, x, teacher = compressed(arch, GPTQ)
    tuned = copy.deepcopy(model)
    info = recover(tuned, x, Recovery(steps=15, lr=2e-4, batch_size=4, train="scales", loss="kl"), teacher=teacher)
    assert info["kl_after"] < info["kl_before"]
    scales = sum(t.slots()["a"].scale.numel() for m in compressed_modules(model).values() for t in m.terms)
    assert info["trained"] == {"scales": scales} == {"scales": info["trained_parameters"]}
    before, after = stored(model), stored(tuned)
    changed = 0
    for name, tensors in before.items():
        assert tensors.keys() == after[name].keys()
        for key, t in tensors.items():
            same = torch.equal(t, after[name][key])
            if key.endswith(".scale"):
                changed += not same
                assert after[name][key].dtype == t.dtype
            else:
                assert same, key  # codes, zero points: bit-exact
    assert changed == len(before)
    for m, t in zip(compressed_modules(model).values(), compressed_modules(tuned).values()):
        assert m.spec() == t.spec()
    out = save_compressed(tuned, tmp_path / "ck")
    for name, m in compressed_modules(model).items():
        assert file_tensor_bytes(out / "model.safetensors", prefix=name + ".") == m.nbytes()
    again, _, _ = load_compressed(out)
    assert torch.equal(logits(again, x), logits(tuned, x))


def test_scales_combine_with_factors_and_sparse_values():
    _, model, x, _ = compressed("llama", SSLC)
    tuned = copy.deepcopy(model)
    info = recover(tuned, x, Recovery(steps=6, lr=1e-2, batch_size=4, train=["scales", "lowrank", "sparse"]))
    assert info["train"] == "lowrank+sparse+scales" and set(info["trained"]) == {"lowrank", "scales"}
    for m, t in zip(compressed_modules(model).values(), compressed_modules(tuned).values()):
        (s0, l0), (s1, l1) = m.terms, t.terms
        assert torch.equal(s0.values.codes, s1.values.codes) and torch.equal(s0.mask, s1.mask)
        assert not torch.equal(s0.values.scale, s1.values.scale)
        assert not torch.equal(l0.u, l1.u) and not torch.equal(l0.v, l1.v)


# -- held-out windows --------------------------------------------------------------------------------------

def test_heldout_windows_are_not_trained_on_and_report_their_loss():
    _, model, x, _ = compressed("llama", SSLC, n=10)
    other = x.clone()
    other[7:] = windows(3, 32, seed=9)  # change only the held-out windows
    cfg = Recovery(steps=8, lr=1e-2, batch_size=4, heldout=3)
    runs = []
    for data in (x, other):
        tuned = copy.deepcopy(model)
        runs.append((recover(tuned, data, cfg), stored(tuned)))
    (info, first), (info2, second) = runs
    for name, tensors in first.items():
        for key, t in tensors.items():
            assert torch.equal(t, second[name][key]), key  # the held-out windows did not move anything
    assert info["train_windows"] == [0, 7] and info["heldout_windows"] == [7, 10] and info["probe_windows"] == 7
    assert info["loss_before"] == info2["loss_before"] and info["heldout_loss_before"] != info2["heldout_loss_before"]
    assert {"heldout_loss_before", "heldout_loss_after"} <= set(info)
    with pytest.raises(ValueError, match="leaves none of the 10"):
        recover(copy.deepcopy(model), x, Recovery(steps=1, heldout=10))


def test_compress_runs_a_kl_recovery_with_held_out_windows_and_reports_it():
    model, x = MODELS["llama"](), windows(8, 32)
    recipe = Recipe.from_dict({"calibration": {"n": 8}, "steps": GPTQ,
                               "recover": {"steps": 6, "lr": 2e-4, "batch_size": 2, "train": "scales",
                                           "loss": "kl", "top_k": 16, "heldout": 2}})
    rec = compress(model, recipe, x, compute_dtype="fp32").to_dict()["recovery"]
    assert rec["heldout_windows"] == [6, 8] and rec["teacher"] == "cached" and rec["top_k"] == 16
    assert rec["kl_after"] < rec["kl_before"] and rec["heldout_kl_before"] > 0 and rec["heldout_kl_after"] > 0
    assert rec["teacher_bytes"] == 8 * 32 * (8 * 16 + 4) and rec["teacher_store"] == "memory"


def test_recover_windows_calibrate_the_steps_on_the_first_n_and_train_on_all():
    """`recover.windows`: the steps see only the first calibration.n windows (the codes, which scale training
    leaves alone, equal a run on those windows alone), the teacher and the recovery all of them (changing a
    window past calibration.n that recovery trains on changes the scales)."""
    model, x = MODELS["llama"](), windows(12, 32)
    rec = {"steps": 6, "lr": 2e-4, "batch_size": 2, "train": "scales", "loss": "kl", "top_k": 16, "heldout": 2}
    recipe = Recipe.from_dict({"calibration": {"n": 8}, "steps": GPTQ, "recover": {**rec, "windows": 12}})
    assert recipe.window_count == 12 and Recipe.from_dict({"calibration": {"n": 8}, "steps": GPTQ}).window_count == 8

    def run(data, recipe=recipe):
        tuned = copy.deepcopy(model)
        return compress(tuned, recipe, data, compute_dtype="fp32").to_dict(), stored(tuned)

    report, first = run(x)
    assert report["calibration"]["windows"] == [8, 32] and report["calibration"]["n"] == 8
    assert report["recovery"]["train_windows"] == [0, 10] and report["recovery"]["heldout_windows"] == [10, 12]
    assert report["recovery"]["teacher_bytes"] == 12 * 32 * (8 * 16 + 4)
    _, calibrated = run(x[:8], Recipe.from_dict({"calibration": {"n": 8}, "steps": GPTQ}))
    other = x.clone()
    other[8:10] = windows(2, 32, seed=9)  # trained on by the recovery only
    _, moved = run(other)
    codes = [(n, k) for n, ts in first.items() for k in ts if k.endswith(".codes")]
    assert codes and all(torch.equal(first[n][k], calibrated[n][k]) for n, k in codes)
    assert all(torch.equal(first[n][k], moved[n][k]) for n, k in codes)
    scales = [(n, k) for n, ts in first.items() for k in ts if k.endswith(".scale")]
    assert any(not torch.equal(first[n][k], moved[n][k]) for n, k in scales)
    with pytest.raises(ValueError, match=r"recover.windows=12: windows must hold that many rows .* got 8"):
        compress(copy.deepcopy(model), recipe, x[:8], compute_dtype="fp32")


# -- the recipe ---------------------------------------------------------------------------------------------

def test_the_new_fields_stay_out_of_the_recipe_at_their_defaults():
    old = Recipe.from_dict({"steps": SSLC, "recover": {"steps": 50, "train": "lowrank+sparse"}})
    assert list(old.to_dict()["recover"]) == ["steps", "lr", "weight_decay", "batch_size", "train"]
    assert old.hash() == Recipe.from_dict({"steps": SSLC, "recover": {"steps": 50, "train": ["sparse", "lowrank"],
                                                                      "loss": "lm", "heldout": 0}}).hash()
    new = Recipe.from_dict({"steps": GPTQ, "recover": {"steps": 50, "train": "scales", "loss": "kl",
                                                       "teacher": "online", "heldout": 4}})
    assert new.to_dict()["recover"]["teacher"] == "online" and "top_k" not in new.to_dict()["recover"]
    assert Recipe.from_yaml(new.to_yaml()) == new and new.hash() != old.hash()


@pytest.mark.parametrize("steps, train, match", [
    ([{"wanda": {"sparsity": 0.5}}], "scales", "finds no quantized tensor to train"),
    ([{"svd": {"ratio": 0.5}}], "sparse+scales", "finds no tensor to train"),
])
def test_a_recovery_of_scales_with_nothing_quantized_is_refused(steps, train, match):
    recipe = Recipe.from_dict({"steps": steps, "recover": {"steps": 10, "train": train}})
    with pytest.raises(IllegalStep, match=match):
        recipe.check({"model.layers.0.mlp.up_proj": (32, 16)})


@pytest.mark.parametrize("steps, train", [(GPTQ, "scales"), (GPTQ, "lowrank+scales"), (SSLC, "scales")])
def test_a_recovery_of_scales_on_quantized_tensors_is_accepted(steps, train):
    Recipe.from_dict({"steps": steps, "recover": {"steps": 10, "train": train}}).check(
        {"model.layers.0.mlp.up_proj": (32, 16)})


@pytest.mark.parametrize("recover, match", [
    ({"teacher": "online"}, "teacher='online' needs loss: kl"),
    ({"top_k": 8, "teacher": "online"}, "teacher='online', top_k=8: each needs loss: kl"),
    ({"loss": "ce"}, r"recover\.loss: got 'ce'"),
    ({"train": "lowrank+lowrank"}, r"recover\.train: got 'lowrank\+lowrank'"),
    ({"steps": 5, "heldout": 128}, r"heldout=128 leaves no window to train on \(calibration.n=128\)"),
    ({"loss": "kl", "top_k": 0}, r"recover\.top_k: got 0"),
    ({"steps": 5, "windows": 64}, r"windows=64 is fewer than the calibration windows it starts with "
                                  r"\(calibration.n=128\); allowed: none or an integer >= 128"),
    ({"steps": 5, "windows": 200, "heldout": 200}, r"heldout=200 leaves no window to train on \(recover.windows=200\)"),
    ({"windows": 256}, r"windows=256.*needs steps > 0"),
])
def test_bad_distillation_settings_name_the_field(recover, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"steps": GPTQ, "recover": recover})
