"""Streaming statistics of a Linear's inputs (DESIGN §3).

One accumulator per distinct input tensor collects, in fp32 and as running means (so no sum grows
with the token count): the token count, the Gram matrix ``H = XᵀX / N``, the mean absolute value and
the absolute maximum per input channel. The per-channel second moment is ``diag(H)``. Techniques read
what they need; none collects its own. ``tests/test_stats.py`` checks the streaming result against the
batch formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch


@dataclass
class Stats:
    """Statistics of the N calibration tokens that reached one Linear."""

    n_tokens: int
    gram: torch.Tensor      # [in, in] fp32, E[x xᵀ]
    abs_mean: torch.Tensor  # [in] fp32, E|x|
    absmax: torch.Tensor    # [in] fp32, max |x|

    @property
    def sq_mean(self) -> torch.Tensor:
        """Per-channel second moment E[x²] (the Wanda / OATS statistic)."""
        return torch.diagonal(self.gram)

    def to(self, device) -> "Stats":
        return Stats(self.n_tokens, self.gram.to(device), self.abs_mean.to(device), self.absmax.to(device))


# Width of the column strips of the Gram update. H is symmetric, so each batch adds only its upper
# triangle, one strip product ``x[:, a:b]ᵀ x[:, a:]`` per strip (a 1536-wide H costs 58% of the full
# product's multiply-adds); narrower strips save more products but run at a lower matmul efficiency.
GRAM_STRIP = 256


def _strips(n: int) -> list[tuple[int, int]]:
    k = max(1, round(n / GRAM_STRIP))
    edges = [n * i // k for i in range(k + 1)]
    return list(pairwise(edges))


class StatsAccumulator:
    """Running-mean accumulation of :class:`Stats` over batches of inputs ``[..., in_features]``.

    Between batches only the upper triangle of the Gram matrix is current (see `GRAM_STRIP`);
    `result` fills in the lower one."""

    def __init__(self, in_features: int, device=None):
        self.n = 0
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self._strips = _strips(in_features)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.gram.device, torch.float32)
        k = x.shape[0]
        if k == 0:
            return
        total = self.n + k
        # Rescale the old mean by n/(n+k) and add the new batch's share: a running mean in fp32.
        keep, share = self.n / total, 1.0 / total
        for a, b in self._strips:
            self.gram[a:b, a:].addmm_(x[:, a:b].T, x[:, a:], beta=keep, alpha=share)
        a = x.abs()
        self.abs_mean.mul_(keep).add_(a.sum(0), alpha=share)
        torch.maximum(self.absmax, a.amax(0), out=self.absmax)
        self.n = total

    def result(self) -> Stats:
        rows, cols = torch.tril_indices(*self.gram.shape, -1, device=self.gram.device)
        self.gram[rows, cols] = self.gram[cols, rows]  # mirror the upper triangle
        return Stats(self.n, self.gram, self.abs_mean, self.absmax)


def output_energy(w: torch.Tensor, gram: torch.Tensor | None) -> float:
    """‖WX‖² = tr(W H Wᵀ) from the Gram matrix H: the denominator of `relative_error`, which a caller
    measuring several approximations of one weight computes once. Without a Gram (None: no calibration),
    ‖W‖²_F."""
    if gram is None:
        return float(w.double().pow(2).sum())
    h = gram.float()
    w = w.float().to(h.device)
    return float(((w @ h) * w).double().sum())


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor | None,
                   energy: float | None = None) -> float:
    """‖(W−Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), computed from the Gram matrix; without one (None: a
    run without calibration) the weights' own ‖W−Ŵ‖²_F / ‖W‖²_F.

    The products run in fp32 (fp64 matmuls are several times slower on CPUs) and the sums in fp64.
    `energy` is ``output_energy(w, gram)`` when the caller has it: each product with an 11008-wide H
    costs seconds, and the denominator does not change between the steps applied to one weight.
    """
    if gram is None:
        num = float((w.double() - w_hat.double().to(w.device)).pow(2).sum())
    else:
        h = gram.float()
        dw = w.float().to(h.device) - w_hat.float().to(h.device)
        num = float(((dw @ h) * dw).double().sum())
    den = output_energy(w, gram) if energy is None else energy
    return num / den if den > 0 else float(num > 0)
