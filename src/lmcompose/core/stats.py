"""Streaming statistics of a Linear's inputs (DESIGN §3).

One accumulator per distinct input tensor collects, in fp32 and as running means (so no sum grows
with the token count): the token count, the Gram matrix ``H = XᵀX / N``, the mean absolute value and
the absolute maximum per input channel. The per-channel second moment is ``diag(H)``. Techniques read
what they need; none collects its own. ``tests/test_stats.py`` checks the streaming result against the
batch formula.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class StatsAccumulator:
    """Running-mean accumulation of :class:`Stats` over batches of inputs ``[..., in_features]``."""

    def __init__(self, in_features: int, device=None):
        self.n = 0
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.abs_mean = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.gram.device, torch.float32)
        k = x.shape[0]
        if k == 0:
            return
        total = self.n + k
        # Rescale the old mean by n/(n+k) and add the new batch's share: a running mean in fp32.
        self.gram.mul_(self.n / total).addmm_(x.T, x, alpha=1.0 / total)
        self.abs_mean.mul_(self.n / total).add_(x.abs().sum(0), alpha=1.0 / total)
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        self.n = total

    def result(self) -> Stats:
        return Stats(self.n, self.gram, self.abs_mean, self.absmax)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W−Ŵ)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), computed from the Gram matrix.

    The products run in fp32 (fp64 matmuls are several times slower on CPUs) and the sums in fp64.
    """
    h = gram.float()
    w, dw = w.float().to(h.device), (w.float().to(h.device) - w_hat.float().to(h.device))
    num = ((dw @ h) * dw).double().sum()
    den = ((w @ h) * w).double().sum()
    return float(num / den) if den > 0 else float(num > 0)
