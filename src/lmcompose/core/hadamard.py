"""Orthogonal matrices for incoherence transforms: randomized Hadamard where one exists, else Haar-random.

A Hadamard matrix of order n exists for n = 2^k·m when m = 1 (Sylvester) or m is the order of a Paley
matrix built from a prime q: m = q + 1 with q ≡ 3 (mod 4) (Paley I) or m = 2(q + 1) with q ≡ 1 (mod 4)
(Paley II). That covers the widths of the usual models (576 = 36·16, 640 = 20·32, 1536 = 12·128, 2048, 4096).
The transform ``Q = (H_m ⊗ H_{2^k}) · diag(signs) / √n`` is applied as a Kronecker product of small dense
factors (H_m, and H_{2^k} split into at most two or three Sylvester factors of order ≤ 128, since
H_{2^a} ⊗ H_{2^b} = H_{2^(a+b)}): one small matmul per factor along its axis, O(n (m + Σ factor orders))
per vector instead of O(n²), so an *online* rotation costs far less than the matmul it precedes; the
factors are built once per device and dtype. `matrix` materializes the same Q for fusing into weights
(``matrix() @ v == apply(v)``) and `apply_inverse` applies Qᵀ. A width
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


MAX_FACTOR = 128  # largest Sylvester factor applied as one matmul (measured: balanced factors ≤ 128 are fastest)


@lru_cache(maxsize=None)
def sylvester(s: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order s (a power of two), entries ±1 (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < s:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def power_split(p: int) -> list[int]:
    """Orders of the Sylvester factors of H_p (p a power of two): as few as keep each ≤ `MAX_FACTOR`,
    balanced (4096 → [64, 64], 1536's 128 → [128], 256 → [16, 16])."""
    k = p.bit_length() - 1
    if k == 0:
        return []
    parts = -(-k // (MAX_FACTOR.bit_length() - 1))
    exps = [k // parts + (1 if i < k % parts else 0) for i in range(parts)]
    return [1 << e for e in exps]


@lru_cache(maxsize=256)
def _plan(t: "OrthogonalTransform", device: torch.device, dtype: torch.dtype):
    """(signs or None, orthonormal Kronecker factors of one block) of `t` on `device` in `dtype`, built once."""
    size = t.block or t.n
    if t.kind == "orthogonal":
        return None, (t._haar(size).to(device, dtype),)
    if t.kind == "hadamard":
        m, p = hadamard_split(size)
        first = paley(m).double() / math.sqrt(m)
    else:
        m, p = odd_split(size)
        first = t._haar(m)
    factors = ([first] if m > 1 else []) + [sylvester(s) / math.sqrt(s) for s in power_split(p)]
    return t.signs().to(device, dtype), tuple(f.to(device, dtype).contiguous() for f in factors)


def _kron_apply(y: torch.Tensor, factors, transpose: bool) -> torch.Tensor:
    """(F_1 ⊗ … ⊗ F_k) y (or with every F transposed) for each row of y [rows, n]: one matmul per axis."""
    n = rest = y.shape[-1]
    for f in factors:
        s = f.shape[0]
        rest //= s
        if rest == 1:  # the last axis: one GEMM over all rows
            y = y.reshape(-1, s) @ (f if transpose else f.T)
        else:
            y = torch.matmul(f.T if transpose else f, y.reshape(-1, s, rest))
    return y.reshape(-1, n)


@dataclass(frozen=True)
class OrthogonalTransform:
    """An orthogonal n×n map, stored as what regenerates it: kind, size and seed (zero tensor bytes).

    ``hadamard``: Q = (H_m ⊗ H_p)·diag(s)/√n with random signs s (QuaRot's randomized Hadamard), applied
    fast; when n has no known Hadamard factorization, the `fallback` kind is used instead (recorded).
    ``orthogonal``: a Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), applied as a matmul.
    ``block`` b > 0: block-diagonal, ``Q = (I_{n/b} ⊗ Q_b)·diag(s)``, each run of b consecutive coordinates
    rotated on its own (llm-compressor's SpinQuant ``transform_block_size``); 0: one block of the full width.
    """

    n: int
    kind: str = "hadamard"
    seed: int = 0
    block: int = 0

    @classmethod
    def create(cls, n: int, kind: str = "hadamard", seed: int = 0, block: int = 0) -> "OrthogonalTransform":
        """A transform of size n; `block` is dropped (full width) where it does not divide n into several
        blocks."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; allowed: {list(KINDS)}")
        if block < 0:
            raise ValueError(f"block={block} is not allowed; allowed: 0 (full width) or a block size > 0")
        block = block if 0 < block < n and n % block == 0 else 0
        if kind == "hadamard" and hadamard_split(block or n) is None:
            kind = "hadamard+orthogonal"
        return cls(n, kind, seed, block)

    @classmethod
    def from_meta(cls, meta: dict) -> "OrthogonalTransform":
        """The transform a checkpoint's metadata names (`meta`, as written by `meta`)."""
        return cls(int(meta["n"]), meta["transform"], int(meta["seed"]), int(meta.get("block", 0)))

    def meta(self) -> dict:
        """n, transform kind and seed (and block, only when block-diagonal: older metadata reads the same)."""
        return {"n": self.n, "transform": self.kind, "seed": self.seed, **({"block": self.block} if self.block else {})}

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

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"transform of size {self.n} applied to a last axis of {x.shape[-1]}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Q x for every row vector of `x` (last axis n), i.e. ``x @ Q.T``, computed in at least fp32 and
        returned in x's dtype."""
        self._check(x)
        dtype = self._compute_dtype(x)
        signs, factors = _plan(self, x.device, dtype)
        y = x.to(dtype).reshape(-1, self.n)
        if signs is not None:
            y = y * signs
        return _kron_apply(y.reshape(-1, self.block or self.n), factors, False).reshape(x.shape).to(x.dtype)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Qᵀ x for every row vector of `x`, i.e. ``x @ Q``: undoes `apply`."""
        self._check(x)
        dtype = self._compute_dtype(x)
        signs, factors = _plan(self, x.device, dtype)
        y = _kron_apply(x.to(dtype).reshape(-1, self.block or self.n), factors, True).reshape(-1, self.n)
        if signs is not None:
            y = y * signs
        return y.reshape(x.shape).to(x.dtype)

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """Q as a dense matrix (rows are Q's rows): ``matrix() @ v == apply(v)``."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).T.contiguous().to(dtype)
