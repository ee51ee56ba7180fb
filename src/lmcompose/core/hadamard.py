"""Orthogonal matrices for incoherence transforms: randomized Hadamard where one exists, else Haar-random.

A Hadamard matrix of order n exists for n = 2^k·m when m = 1 (Sylvester) or m is the order of a Paley
matrix built from a prime q: m = q + 1 with q ≡ 3 (mod 4) (Paley I) or m = 2(q + 1) with q ≡ 1 (mod 4)
(Paley II). That covers the widths of the usual models (576 = 36·16, 640 = 20·32, 1536 = 12·128, 2048, 4096).
The transform ``Q = (H_m ⊗ H_{2^k}) · diag(signs) / √n`` is applied in O(n (k + m)) per vector by a fast
Walsh–Hadamard transform over the 2^k axis and an m×m product (`apply`), so an *online* rotation costs
far less than the matmul it precedes; `matrix` materializes the same Q for fusing into weights. A width
with no such factorization (11008 = 43·256: 172 = 4·43 has no Paley construction) uses a Haar-random
orthogonal m×m block in place of H_m (``Q = (R_m ⊗ H_p)·diag(s)/√p``), just as fast; the kind recorded is
then ``hadamard+orthogonal``.

Example::

    t = OrthogonalTransform.create(576, kind="hadamard", seed=0)
    q = t.matrix()                       # [576, 576], q @ q.T == I
    torch.allclose(t.apply(x), x @ q.T)  # the online form of the same map
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

KINDS = ("hadamard", "orthogonal")  # what a recipe asks for; "hadamard+orthogonal" is recorded, not asked


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q), q prime; χ the quadratic character (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


@lru_cache(maxsize=None)
def paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from a Paley construction with a prime q, or None."""
    if m == 1:
        return torch.ones(1, 1)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: [[1, jᵀ], [−j, Q + I]] ... in the skew form
        jac = _jacobsthal(q)
        s = torch.zeros(m, m)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = jac
        return s + torch.eye(m)
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]
            c = torch.zeros(q + 1, q + 1)
            c[0, 1:] = 1.0
            c[1:, 0] = 1.0
            c[1:, 1:] = _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1), b)
    return None


MAX_PALEY = 256  # a larger Paley factor would make the online transform cost more than the matmul it precedes


def hadamard_split(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m·p, p a power of two and a Hadamard matrix of order m ≤ `MAX_PALEY` known (the
    smallest such m), or None."""
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    while p >= 1:
        m = n // p
        if m <= MAX_PALEY and paley(m) is not None:
            return m, p
        p //= 2
    return None


def odd_split(n: int) -> tuple[int, int]:
    """(m, p): n = m·p with p the largest power of two dividing n."""
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    return n // p, p


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last axis (length a power of two)."""
    n = x.shape[-1]
    h = 1
    out = x
    while h < n:
        out = out.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = out[..., 0, :], out[..., 1, :]
        out = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return out.reshape(x.shape)


@dataclass(frozen=True)
class OrthogonalTransform:
    """An orthogonal n×n map, stored as what regenerates it: kind, size and seed (zero tensor bytes).

    ``hadamard``: Q = (H_m ⊗ H_p)·diag(s)/√n with random signs s (QuaRot's randomized Hadamard), applied
    fast; when n has no known Hadamard factorization, the `fallback` kind is used instead (recorded).
    ``orthogonal``: a Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), applied as a matmul.
    """

    n: int
    kind: str = "hadamard"
    seed: int = 0

    @classmethod
    def create(cls, n: int, kind: str = "hadamard", seed: int = 0) -> "OrthogonalTransform":
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; allowed: {list(KINDS)}")
        if kind == "hadamard" and hadamard_split(n) is None:
            kind = "hadamard+orthogonal"
        return cls(n, kind, seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def signs(self) -> torch.Tensor:
        return torch.randint(0, 2, (self.n,), generator=self._generator()).float() * 2 - 1

    @lru_cache(maxsize=None)
    def _haar(self, size: int) -> torch.Tensor:
        """A Haar-random orthogonal size×size matrix from this transform's seed (float64, cached)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)

    def _factors(self) -> tuple[torch.Tensor, int]:
        """(the m×m factor, p) of Q = (F_m ⊗ H_p)·diag(s)/√n, F_m unnormalized for Paley (entries ±1)."""
        if self.kind == "hadamard":
            m, p = hadamard_split(self.n)
            return paley(m).double(), p
        m, p = odd_split(self.n)
        return self._haar(m) * math.sqrt(m), p

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Q x for every row vector of `x` (last axis n), i.e. ``x @ Q.T``, in x's dtype."""
        if x.shape[-1] != self.n:
            raise ValueError(f"transform of size {self.n} applied to a last axis of {x.shape[-1]}")
        if self.kind == "orthogonal":
            return x @ self._haar(self.n).to(x.device, x.dtype).T
        factor, p = self._factors()
        m = factor.shape[0]
        dtype = x.dtype
        y = x.to(torch.promote_types(x.dtype, torch.float32)) * self.signs().to(x.device, x.dtype)
        y = y.reshape(*x.shape[:-1], m, p)
        if p > 1:
            y = fwht(y)
        if m > 1:
            y = torch.einsum("ij,...jk->...ik", factor.to(y.device, y.dtype), y)
        return (y.reshape(x.shape) / math.sqrt(self.n)).to(dtype)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """Q as a dense matrix (rows are Q's rows): ``matrix() @ v == apply(v)``."""
        if self.kind == "orthogonal":
            return self._haar(self.n).to(dtype)
        return self.apply(torch.eye(self.n, dtype=torch.float64)).T.contiguous().to(dtype)

    def to_dict(self) -> dict:
        return {"n": self.n, "kind": self.kind, "seed": self.seed}
