"""Distillation targets for recovery (``recover: {loss: kl}``): the dense model's next-token distributions.

The loss is KL(p_dense ‖ p_model) per position, averaged over every position of the batch's windows.
The dense teacher is one of:

* ``cached`` (`CachedTeacher`): before the steps run, the dense model's ``top_k`` log-probabilities (and
  their token ids) and the log of the probability left outside them (``log_rest``) are computed on every
  calibration window. The KL is then that of the (k+1)-bucket coarsening of both distributions: the top-k
  tokens one by one, everything else as one bucket (`kl_topk`). That is exact where k is the vocabulary
  and otherwise a lower bound of the full KL (coarsening cannot increase a KL); the student's gradient
  inside the tail only moves the tail's total mass, not its shape. Memory: ``n × L × (8k + 4)`` bytes
  (int32 ids, fp32 log-probabilities, fp32 ``log_rest``), held in memory up to `CACHE_IN_MEMORY` bytes
  and otherwise written as one safetensors file per window to a temporary directory that `close`
  removes; one batch at a time then sits on the device.
* ``online`` (`OnlineTeacher`): a deep copy of the dense model taken before the steps, run without
  gradients on every batch; the KL is the full one (`kl_full`). Memory: a second model (its weights in
  their dtype, moved to the training device for the recovery) and one batch of its hidden states.

Neither side ever holds ``[B, L, V]`` fp32 logits: both run their output head over `CHUNK` positions at
a time (`runtime.logits`), and `chunked_kl` takes the student's backward chunk by chunk (the head's
gradient lands on a detached copy of the hidden states, which then backpropagates through the trunk
once), so a step holds at most two ``[B · CHUNK, V]`` fp32 logit chunks and their softmax temporaries.
A model whose trunk + head do not reproduce its logits falls back to its full logits (one ``[B, L, V]``
tensor in the compute dtype, and its gradient), still compared chunk by chunk.

Method notes: docs/methods/recover.md

Example::

    teacher = dense_teacher(model, windows, Recovery(steps=64, loss="kl"), "fp32")   # before compressing
    ...                                                                             # compress `model`
    record = recover(model, windows, cfg, teacher=teacher)
    teacher.close()
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..core import dtypes as compute
from ..recipe import Recovery
from ..runtime.logits import CHUNK, head_path, head_path_agrees, softcap

CACHE_IN_MEMORY = 256 * 2**20  # bytes: a larger cached teacher goes to safetensors files on disk


def kl_full(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) per row of ``[N, V]`` logits, in fp32."""
    logq = F.log_softmax(student.float(), dim=-1)
    logp = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)


def topk_targets(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 ``[N, k]``, log-probabilities fp32 ``[N, k]``, log of the rest's mass fp32 ``[N]``) of the
    top-k tokens of ``[N, V]`` teacher logits; ``log_rest`` is -inf when k covers the vocabulary."""
    z = teacher.float()
    lse = torch.logsumexp(z, -1)
    top, ids = z.topk(min(k, z.shape[-1]), dim=-1)
    rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - lse
    return ids.to(torch.int32), top - lse.unsqueeze(-1), rest


def kl_topk(student: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor) -> torch.Tensor:
    """KL of the (k+1)-bucket coarsening per row: Σ_top-k p (log p − log q) + p_rest (log p_rest − log q_rest),
    from ``[N, V]`` student logits and the teacher's `topk_targets`. Equals `kl_full` when k = V."""
    z = student.float()
    ids = ids.long()
    lse = torch.logsumexp(z, -1, keepdim=True)
    logq = z.gather(-1, ids) - lse
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if ids.shape[-1] < z.shape[-1]:  # the tail bucket (empty when k covers the vocabulary)
        q_rest = torch.logsumexp(z.scatter(-1, ids, float("-inf")), -1) - lse.squeeze(-1)
        p_rest = log_rest.clamp_min(-1e4)  # a tail of mass 0 contributes 0, without a nan
        kl = kl + p_rest.exp() * (p_rest - q_rest)
    return kl


class ChunkedLogits:
    """A model's logits `CHUNK` positions at a time, under the compute dtype's autocast (see the module
    docstring); `hidden` runs the trunk (or, without a head path, the whole model) and `head` one chunk."""

    def __init__(self, model, compute_dtype: str, sample: torch.Tensor):
        self.model, self.compute_dtype = model, compute_dtype
        self.device = sample.device
        parts = head_path(model)
        self.parts = parts if parts is not None and head_path_agrees(model, *parts, sample) else None

    def _cast(self):
        return compute.autocast(self.compute_dtype, self.device)

    def hidden(self, batch: torch.Tensor) -> torch.Tensor:
        with self._cast():
            if self.parts is None:
                return self.model(input_ids=batch, use_cache=False).logits
            return self.parts[0](input_ids=batch, use_cache=False).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[B · positions, V]`` of a chunk of `hidden`."""
        if self.parts is None:
            return hidden.flatten(0, 1).float()
        with self._cast():
            return softcap(self.model, self.parts[1](hidden)).flatten(0, 1).float()


def chunked_kl(student: ChunkedLogits, batch: torch.Tensor, divergence, chunk: int = CHUNK,
               backward: bool = False) -> float:
    """Mean per-position KL over the ``[B, L]`` `batch`; ``divergence(s, e, logits)`` gives the KL of each
    row of the student's fp32 logits of positions s..e-1 (``[B · (e − s), V]``). With `backward`, the
    gradient of that mean is accumulated into the student's parameters, one chunk of logits at a time."""
    out = student.hidden(batch)
    h = out.detach().requires_grad_() if backward else out
    count, total = batch.numel(), 0.0
    for s in range(0, batch.shape[1], chunk):
        e = min(s + chunk, batch.shape[1])
        kl = divergence(s, e, student.head(h[:, s:e])).sum() / count
        if backward:
            kl.backward()
        total += float(kl.detach())
    if backward:
        out.backward(h.grad)
    return total


class CachedTeacher:
    """The dense model's top-k targets on every calibration window (see the module docstring)."""

    kind = "cached"

    def __init__(self, model, windows: torch.Tensor, top_k: int, compute_dtype: str = "fp32", device=None,
                 batch_size: int = 8, memory_limit: int = CACHE_IN_MEMORY, directory=None):
        t0 = time.perf_counter()
        home = next(model.parameters()).device
        device = torch.device(device) if device is not None else home
        n, length = windows.shape
        vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else top_k
        self.top_k, self.n_windows = min(top_k, vocab), n
        self.nbytes = n * length * (8 * self.top_k + 4)
        self.path = None
        if self.nbytes > memory_limit:
            self.path = Path(tempfile.mkdtemp(prefix="lmcompose-teacher-", dir=directory))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        else:
            self.ids = torch.empty(n, length, self.top_k, dtype=torch.int32)
            self.logp = torch.empty(n, length, self.top_k)
            self.log_rest = torch.empty(n, length)
        was_training = model.training
        model.to(device).eval()
        try:
            with torch.no_grad():
                logits = ChunkedLogits(model, compute_dtype, windows[:1].to(device))
                for start in range(0, n, batch_size):
                    x = windows[start:start + batch_size].to(device)
                    hidden = logits.hidden(x).flatten(0, 1).unsqueeze(0)  # CHUNK positions at a time, any batch
                    parts = [topk_targets(logits.head(hidden[:, s:s + CHUNK]), self.top_k)
                             for s in range(0, hidden.shape[1], CHUNK)]
                    ids, logp, rest = (torch.cat(p, 0).view(x.shape[0], length, -1).cpu() for p in zip(*parts))
                    self._store(range(start, start + x.shape[0]), ids, logp, rest.squeeze(-1))
        finally:
            model.to(home).train(was_training)
        self.seconds = time.perf_counter() - t0

    def _file(self, i: int) -> Path:
        return self.path / f"window{i:06d}.safetensors"

    def _store(self, rows, ids, logp, rest) -> None:
        for j, i in enumerate(rows):
            if self.path is None:
                self.ids[i], self.logp[i], self.log_rest[i] = ids[j], logp[j], rest[j]
            else:
                save_file({"ids": ids[j].contiguous(), "logp": logp[j].contiguous(),
                           "log_rest": rest[j].contiguous()}, str(self._file(i)))

    def targets(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, logp, log_rest) of the windows `rows`, ``[B, L, k]``, ``[B, L, k]``, ``[B, L]``, on `device`."""
        if self.path is None:
            out = self.ids[rows], self.logp[rows], self.log_rest[rows]
        else:
            files = [load_file(str(self._file(int(i)))) for i in rows]
            out = tuple(torch.stack([f[key] for f in files]) for key in ("ids", "logp", "log_rest"))
        return tuple(t.to(device) for t in out)

    @contextlib.contextmanager
    def on(self, device, compute_dtype: str):
        yield self

    def batch(self, rows: torch.Tensor, tokens: torch.Tensor):
        """``divergence(s, e, student_logits)`` for `chunked_kl` on the windows `rows` (whose ids are `tokens`)."""
        ids, logp, rest = self.targets(rows, tokens.device)
        return lambda s, e, z: kl_topk(z, ids[:, s:e].flatten(0, 1), logp[:, s:e].flatten(0, 1),
                                       rest[:, s:e].flatten())

    def describe(self) -> dict:
        return {"teacher": self.kind, "top_k": self.top_k, "teacher_bytes": self.nbytes,
                "teacher_store": "memory" if self.path is None else "disk", "teacher_seconds": round(self.seconds, 2)}

    def close(self) -> None:
        """Remove the files of a teacher kept on disk (also done when the teacher is garbage collected)."""
        if self.path is not None:
            self._cleanup()


class OnlineTeacher:
    """A frozen deep copy of the dense model whose logits are computed on every batch (see the module docstring)."""

    kind = "online"

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.logits = None

    @contextlib.contextmanager
    def on(self, device, compute_dtype: str):
        """The teacher on `device` for a recovery, back where it was afterwards."""
        home = next(self.model.parameters()).device
        self.model.to(device)
        try:
            sample = torch.zeros(1, 8, dtype=torch.long, device=device)
            self.logits = ChunkedLogits(self.model, compute_dtype, sample)
            yield self
        finally:
            self.logits = None
            self.model.to(home)

    def batch(self, rows: torch.Tensor, tokens: torch.Tensor):
        with torch.no_grad():
            hidden = self.logits.hidden(tokens)

        @torch.no_grad()
        def teacher(s, e):
            return self.logits.head(hidden[:, s:e])

        return lambda s, e, z: kl_full(z, teacher(s, e))

    def describe(self) -> dict:
        return {"teacher": self.kind, "teacher_bytes": self.nbytes}

    def close(self) -> None:
        self.model = None


def dense_teacher(model, windows: torch.Tensor, cfg: Recovery, compute_dtype: str = "fp32", device=None,
                  batch_size: int = 8, **cache_options):
    """The teacher `cfg` asks for, from the still dense `model` (call it before compressing): a
    `CachedTeacher` of ``cfg.top_k`` tokens over `windows` (computed now, on `device`), or an `OnlineTeacher`.
    `cache_options`: ``memory_limit``, ``directory`` of the cached one."""
    if cfg.teacher == "online":
        return OnlineTeacher(model)
    return CachedTeacher(model, windows, cfg.top_k, compute_dtype, device, batch_size, **cache_options)
