"""Label-free fidelity: KL(dense ‖ compressed) and top-1 agreement against a direct full-logits formula."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import MODELS, windows

from lmcompose import Recipe, compress
from lmcompose.cli import build_parser
from lmcompose.data import eval_tokens
from lmcompose.eval.fidelity import (
    ChunkedLogits,
    chunked_kl_top1,
    fidelity,
)
from lmcompose.eval.perplexity import get_protocol, windows_of
from lmcompose.models.checkpoint import save_compressed

PROTOCOL = get_protocol("quick", seqlen=40, batch_size=2)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "wikitext-2").mkdir()
    text = " = Title = \n\n The first paragraph has some words in it . Another one , 2 + 2 = 4 .\n"
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(text * 12)
    return tmp_path


def perturbed(model, scale: float, seed: int = 0):
    """A copy whose Linear weights get relative Gaussian noise of std `scale`."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight += scale * m.weight.std() * torch.randn(m.weight.shape, generator=g)
    return other


@torch.no_grad()
def direct(dense, comp, batch):
    """KL and top-1 from the models' full forward logits (float64), all positions."""
    p = dense(input_ids=batch, use_cache=False).logits.double()
    q = comp(input_ids=batch, use_cache=False).logits.double()
    kl = (F.softmax(p, -1) * (F.log_softmax(p, -1) - F.log_softmax(q, -1))).sum(-1)
    return kl.mean().item(), (p.argmax(-1) == q.argmax(-1)).double().mean().item()


@pytest.mark.parametrize("family", list(MODELS))
def test_model_against_itself_has_zero_kl_and_full_agreement(family, data_dir, tiny_tokenizer):
    model = MODELS[family]()
    result = fidelity(model, copy.deepcopy(model), tiny_tokenizer, PROTOCOL, data_dir, max_windows=3)
    assert result.kl_mean == pytest.approx(0.0, abs=1e-7) and result.top1_agreement == 1.0
    assert result.n_windows == 3 and result.n_tokens == 3 * 40


@pytest.mark.parametrize("family", list(MODELS))
def test_fidelity_equals_the_direct_full_logits_formula(family, data_dir, tiny_tokenizer):
    dense = MODELS[family]()
    if family == "gemma3":
        dense.config.final_logit_softcapping = 2.0  # the chunked head path must reproduce the soft cap
    comp = perturbed(dense, 0.3)
    result = fidelity(dense, comp, tiny_tokenizer, PROTOCOL, data_dir, max_windows=4)
    batch = windows_of(eval_tokens(tiny_tokenizer, data_dir=data_dir), PROTOCOL.model_copy(update={"max_windows": 4}))
    kl, top1 = direct(dense, comp, batch)
    assert result.kl_mean == pytest.approx(kl, rel=1e-4) and result.kl_mean > 0
    assert result.top1_agreement == pytest.approx(top1, abs=1e-12)


def test_chunk_size_does_not_change_the_sums():
    dense = MODELS["llama"]()
    comp = perturbed(dense, 0.5)
    x = windows(n=3, seqlen=37)
    sides = [ChunkedLogits(dense, True), ChunkedLogits(comp, True)]
    whole = chunked_kl_top1(*sides, x, chunk=37)
    for chunk in (1, 5, 16):
        # The head matmul's shape changes with the chunk (chunk 1 is a matrix-vector product), so fp32
        # rounding moves the sum by a few 1e-6 on some BLAS paths (3e-6 seen on a 2-core CI machine); a
        # dropped or repeated position would move it by about 1/111 of the sum.
        kl, agree = chunked_kl_top1(*sides, x, chunk=chunk)
        assert kl == pytest.approx(whole[0], rel=1e-5) and agree == whole[1]
    full = [ChunkedLogits(dense, False), ChunkedLogits(comp, False)]  # the full-forward fallback
    kl, agree = chunked_kl_top1(*full, x, chunk=8)
    assert kl == pytest.approx(whole[0], rel=1e-5) and agree == whole[1]


def test_kl_is_nonnegative_and_grows_with_the_perturbation(data_dir, tiny_tokenizer):
    dense = MODELS["llama"]()
    results = [fidelity(dense, perturbed(dense, s), tiny_tokenizer, PROTOCOL, data_dir, max_windows=4)
               for s in (0.02, 0.1, 0.5, 2.0)]
    kls = [r.kl_mean for r in results]
    assert all(k > 0 for k in kls) and kls == sorted(kls) and kls[-1] > 20 * kls[0]
    assert results[0].top1_agreement > results[-1].top1_agreement


def test_bad_arguments_are_refused(data_dir, tiny_tokenizer):
    dense = MODELS["llama"]()
    with pytest.raises(ValueError, match="max_windows=0"):
        fidelity(dense, dense, tiny_tokenizer, PROTOCOL, data_dir, max_windows=0)
    dense.resize_token_embeddings(130)
    with pytest.raises(ValueError, match="different vocabularies"):
        fidelity(dense, MODELS["llama"](), tiny_tokenizer, PROTOCOL, data_dir, max_windows=1)


def test_cli_compares_a_saved_checkpoint_with_its_base_model(data_dir, tiny_tokenizer, tmp_path):
    base = tmp_path / "base"
    dense = MODELS["llama"]()
    dense.save_pretrained(base, safe_serialization=True)
    tiny_tokenizer.save_pretrained(base)
    comp = copy.deepcopy(dense)
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [{"rtn": {"bits": 3, "group_size": 32}}]})
    compress(comp, recipe, windows())
    run = save_compressed(comp, tmp_path / "run", tiny_tokenizer, float_dtype="fp32", base_model=str(base))
    parser = build_parser()
    out = tmp_path / "f.json"
    args = parser.parse_args(["fidelity", "--compressed", str(run), "--data-dir", str(data_dir), "--seqlen", "40",
                              "--max-windows", "2", "--dtype", "fp32", "--json", str(out)])
    assert args.func(args) == 0
    saved = json.loads(out.read_text())
    expected = fidelity(dense, comp, tiny_tokenizer, PROTOCOL, data_dir, max_windows=2)
    assert saved["dense"] == str(base) and saved["n_tokens"] == 80
    assert saved["kl_mean"] == pytest.approx(expected.kl_mean, rel=1e-5) and saved["kl_mean"] > 0
