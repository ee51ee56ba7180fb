"""Streaming statistics equal the batch formula; the reported error equals its definition."""

import torch

from lmcompose.core.stats import StatsAccumulator, output_energy, relative_error


def test_streaming_equals_batch_formula():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 7, 24, generator=g) * (i + 1) for i, b in enumerate([1, 3, 2, 5])]
    acc = StatsAccumulator(24)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 24) for b in batches]).double()
    stats = acc.result()
    assert stats.n_tokens == x.shape[0]
    torch.testing.assert_close(stats.gram.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.abs_mean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.absmax.double(), x.abs().amax(0))
    torch.testing.assert_close(stats.sq_mean.double(), (x * x).mean(0), rtol=1e-5, atol=1e-5)


def test_relative_error_is_output_error_over_output_energy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    w_hat = w + 0.1 * torch.randn(8, 16, generator=g)
    acc = StatsAccumulator(16)
    acc.update(x)
    direct = ((x @ (w - w_hat).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    gram = acc.result().gram
    assert abs(relative_error(w, w_hat, gram) - direct) < 1e-5 * direct
    energy = output_energy(w, gram)  # the denominator a caller computes once per weight
    assert abs(energy - (x @ w.T).pow(2).sum().item() / 300) < 1e-5 * energy
    assert relative_error(w, w_hat, gram, energy) == relative_error(w, w_hat, gram)


def test_gram_in_strips_equals_batch_formula_and_is_symmetric():
    # wider than GRAM_STRIP: the upper triangle is accumulated strip by strip, the lower one mirrored
    from lmcompose.core.stats import GRAM_STRIP
    n = 2 * GRAM_STRIP + 40
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(b, 9, n, generator=g) for b in (2, 1, 3)]
    acc = StatsAccumulator(n)
    for b in batches:
        acc.update(b)
    gram = acc.result().gram
    x = torch.cat([b.reshape(-1, n) for b in batches]).double()
    torch.testing.assert_close(gram.double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(gram, gram.T)
