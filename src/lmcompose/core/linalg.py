"""Linear-algebra helpers shared by several techniques: the damped inverse-Hessian Cholesky factor of
the OBS methods (SparseGPT, GPTQ, OBS salience) and a seeded randomized SVD."""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def damped_inverse_cholesky(h: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None, *,
                            dtype: torch.dtype = torch.float32, layer_shape: tuple[int, int] | None = None):
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H); `dead` diagonals set to 1.

    Computed as the reference does (Cholesky, ``cholesky_inverse``, upper Cholesky) in `dtype`.
    Shared by SparseGPT and GPTQ. Returns (U, λ). Raises ValueError, naming the layer, when H is not
    finite or not positive definite even after damping (no silent fallback).
    """
    cols = h.shape[0]
    what = f"the {layer_shape[0]}x{layer_shape[1]} layer" if layer_shape else f"a layer with {cols} inputs"
    h = h.to(dtype=dtype, copy=True)
    if not torch.isfinite(h).all():
        raise ValueError(f"the input Gram matrix of {what} has non-finite entries; check the calibration inputs")
    if dead is not None:
        h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(f"the Hessian of {what} is not positive definite after damping "
                         f"λ={float(damp):.3e} (percdamp={percdamp}, {str(dtype).removeprefix('torch.')}); "
                         "raise percdamp (e.g. 0.1)")
    return chol, float(damp)


@contextlib.contextmanager
def one_thread():
    """Run the body on one intra-op thread (a context manager, or a decorator: ``@one_thread()``).

    The OBS solvers (GPTQ, SparseGPT) issue thousands of small ops per layer, and their Cholesky
    factorizations are of a few-hundred-wide matrix. Split over threads, each op ends in a barrier; when
    another process holds one of the cores, every barrier waits for a descheduled thread. On the 2-core
    machine of BENCHMARKS.md ("Calibration passes and solvers"), with other processes running, a GPTQ
    solve of a 1536×576 layer took 2–6 s on 2 threads and 0.2 s on 1, and the damped inverse Cholesky of
    a 576-wide H 0.15 s against 0.01 s. On an idle machine one thread costs these solvers little: their
    ops are too small to gain from a second one. Forwards and Gram products keep every thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Weights (rows × cols) below which an OBS solve runs on one thread (`solver_threads`). The largest stacked
# solves of SmolLM2-135M (gate/up, 3072 × 576) and Gemma-3-270M (4096 × 640) are below it, a 4096-wide
# model's smallest (4096 × 4096) above.
SMALL_SOLVE = 4 * 2**20


def solver_threads(fn):
    """Decorator for an OBS solver ``fn(w, h, ...)``: a small `w` is solved on one intra-op thread
    (`one_thread`: its many small ops gain nothing from a second one and stall on a busy machine), a large
    one on every thread, since its lazy-batch updates (rows × 128 × cols products) and Cholesky
    factorizations are big enough to use them (a 7B-shaped block's GPTQ spent 82% of its time in the solver
    on one thread; BENCHMARKS.md, issue 21)."""
    @functools.wraps(fn)
    def wrapped(w, *args, **kwargs):
        if w.numel() >= SMALL_SOLVE:
            return fn(w, *args, **kwargs)
        with one_thread():
            return fn(w, *args, **kwargs)
    return wrapped


def randomized_svd(a: torch.Tensor, q: int, niter: int = 2, generator: torch.Generator | None = None):
    """(U [m, q], S [q]) of the randomized SVD of `a` (Halko et al. 2011, alg. 4.4; torch.svd_lowrank's)."""
    omega = torch.randn(a.shape[1], q, dtype=a.dtype, device=a.device, generator=generator)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, s, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return basis @ u, s
