"""The perplexity protocol against a direct formula, on tiny models and a small WikiText-like file."""

import math
import types

import pytest
import torch

from lmcompose.data import eval_tokens
from lmcompose.eval.perplexity import (
    PROTOCOLS,
    Protocol,
    get_protocol,
    perplexity,
    windows_of,
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "wikitext-2").mkdir()
    rows = [" = Title = ", " ", " The first paragraph has some words in it .", " Another one , 2 + 2 = 4 ."]
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(("\r\n".join(rows) + "\r\n").encode() * 12)
    return tmp_path


def direct_ppl(model, tokens: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """exp(mean CE) over the first n_windows non-overlapping windows, each scoring its last seqlen-1 tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n_windows):
            w = tokens[:, i * seqlen:(i + 1) * seqlen]
            logits = model(input_ids=w).logits[0, :-1].double()
            nll += -torch.log_softmax(logits, -1).gather(1, w[0, 1:, None]).sum().item()
            count += seqlen - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma3"])
def test_perplexity_equals_the_direct_formula(family, request, data_dir, tiny_tokenizer):
    model = request.getfixturevalue(family)
    tokens = eval_tokens(tiny_tokenizer, data_dir=data_dir)
    result = perplexity(model, tiny_tokenizer, get_protocol("quick", seqlen=48, max_windows=6), data_dir)
    assert result.n_windows == 6 and result.n_tokens == 6 * 47
    assert result.ppl == pytest.approx(direct_ppl(model, tokens, 48, 6), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll_sum / result.n_tokens), rel=1e-12)


def test_soft_capped_logits_are_reproduced(tiny_gemma3, data_dir, tiny_tokenizer, caplog):
    tiny_gemma3.config.final_logit_softcapping = 0.5  # small cap: changes the numbers a lot
    tokens = eval_tokens(tiny_tokenizer, data_dir=data_dir)
    result = perplexity(tiny_gemma3, tiny_tokenizer, get_protocol("full", seqlen=40, max_windows=3), data_dir)
    assert result.ppl == pytest.approx(direct_ppl(tiny_gemma3, tokens, 40, 3), rel=1e-5)
    assert "post-processes" not in caplog.text  # the chunked head path was used, not the fallback


def test_models_that_post_process_logits_fall_back_to_the_full_forward(tiny_llama, data_dir, tiny_tokenizer,
                                                                       caplog):
    plain = tiny_llama.forward

    def scaled(self, *args, **kwargs):  # like Granite's logits_scaling, which the head path cannot see
        out = plain(*args, **kwargs)
        out.logits = out.logits * 0.25
        return out

    tiny_llama.forward = types.MethodType(scaled, tiny_llama)
    tokens = eval_tokens(tiny_tokenizer, data_dir=data_dir)
    result = perplexity(tiny_llama, tiny_tokenizer, get_protocol("full", seqlen=40, max_windows=3), data_dir)
    assert result.ppl == pytest.approx(direct_ppl(tiny_llama, tokens, 40, 3), rel=1e-5)
    assert "post-processes" in caplog.text


def test_batching_does_not_change_the_result(tiny_llama, data_dir, tiny_tokenizer):
    one = perplexity(tiny_llama, tiny_tokenizer, get_protocol("quick", seqlen=32, max_windows=7), data_dir)
    four = perplexity(tiny_llama, tiny_tokenizer, get_protocol("quick", seqlen=32, max_windows=7, batch_size=4),
                      data_dir)
    assert one.n_windows == four.n_windows == 7
    assert abs(one.ppl - four.ppl) <= 1e-5 * one.ppl


def test_limits_cut_whole_windows_and_drop_the_partial_one():
    tokens = torch.arange(1050).unsqueeze(0)
    full = windows_of(tokens, get_protocol("full", seqlen=100))
    assert full.shape == (10, 100) and torch.equal(full[3], torch.arange(300, 400))  # 50 trailing dropped
    assert windows_of(tokens, get_protocol("full", seqlen=100, max_tokens=399)).shape == (3, 100)
    assert windows_of(tokens, get_protocol("full", seqlen=100, max_tokens=400)).shape == (4, 100)
    assert windows_of(tokens, get_protocol("quick", seqlen=100, max_windows=2)).shape == (2, 100)
    assert windows_of(tokens, get_protocol("full", seqlen=100, max_tokens=700, max_windows=5)).shape == (5, 100)
    with pytest.raises(ValueError, match="seqlen=2048"):
        windows_of(tokens, get_protocol("full"))


def test_limits_reach_the_result_and_progress_is_reported(tiny_llama, data_dir, tiny_tokenizer):
    calls = []
    proto = get_protocol("full", seqlen=32, max_tokens=32 * 5 + 31, batch_size=2)
    result = perplexity(tiny_llama, tiny_tokenizer, proto, data_dir, progress=lambda d, t: calls.append((d, t)))
    assert result.n_windows == 5 and result.n_tokens == 5 * 31
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert result.to_dict()["protocol"] == {**proto.model_dump(), "dtype": "fp32"}  # the dtype it ran in


def test_the_dtype_a_result_ran_in_is_recorded_and_a_mismatch_refused(tiny_llama, data_dir, tiny_tokenizer):
    proto = get_protocol("full", seqlen=32, max_tokens=32 * 2)
    assert perplexity(tiny_llama.to(torch.bfloat16), tiny_tokenizer, proto, data_dir).protocol["dtype"] == "bf16"
    with pytest.raises(ValueError, match="dtype='fp32'.*bf16"):
        perplexity(tiny_llama, tiny_tokenizer, proto.model_copy(update={"dtype": "fp32"}), data_dir)


def test_protocols_are_validated():
    assert PROTOCOLS["quick"].seqlen == 512 and PROTOCOLS["quick"].max_windows == 64
    assert PROTOCOLS["full"].seqlen == 2048 and PROTOCOLS["full"].max_windows is None
    with pytest.raises(ValueError, match="protocol='fast'.*allowed"):
        get_protocol("fast")
    with pytest.raises(ValueError, match="seqlen=1"):
        get_protocol("full", seqlen=1)
    with pytest.raises(ValueError, match="stride"):
        get_protocol("full", stride=5)
    with pytest.raises(Exception):
        PROTOCOLS["full"].seqlen = 4  # frozen
    assert Protocol().seqlen == 2048 and Protocol().batch_size == 1
