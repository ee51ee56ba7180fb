"""Rotate the residual stream by an orthogonal Q, fused offline into the weights (QuaRot / SpinQuant "R1"),
with optional per-head rotations of the values (R2) and online Hadamards on chosen Linears' inputs (R4).

The dense model's function is unchanged (to float rounding); the weights the later steps compress are
rotated, which spreads outlier channels over all channels (incoherence). What is fused, for h' = Q h:

* each residual-reading norm's effective weight g goes into the Linears it feeds, the norm becomes unit
  (RMS norms commute with Q then): W ← W·diag(g)·Qᵀ;
* each Linear writing the residual: W ← Q·W, b ← Q·b; the embedding rows: E ← E·Qᵀ;
* the final norm and an untied head: W_head ← W_head·diag(g)·Qᵀ.

What runs online (0 stored bytes, `runtime.model_ops`, recorded in the checkpoint): Q after each post-norm
(Gemma-3's sandwich norms, which sit between a Linear and the residual add and do not commute with Q),
and, when the head shares the embedding (tied), the final norm conjugated: z = Q·norm(Qᵀ·h). R4 puts an
`InputRotation` (0 bytes) on the Linears `online_include` selects, with W ← W·Qᵀ fused.

The structure is found, never assumed (`pipeline.model_context`, `pipeline.structure`); every block is
checked numerically on random tokens before anything is changed (the rotated block on rotated inputs
must give the rotated outputs), and the logits afterwards; an unknown structure is refused, naming it.

Method notes: docs/methods/transforms.md

Example::

    steps:
      - rotate: {transform: hadamard, seed: 0, per_head: true, online: true}
      - gptq: {bits: 4, group_size: 64}
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.invariants import check_step
from ...algebra.ops import InputRotation, InputRotationSpec
from ...algebra.spec import LinearSpec
from ...algebra.terms import Dense, as_float
from ...core.dtypes import FLOAT_DTYPES
from ...core.errors import IllegalStep
from ...core.hadamard import OrthogonalTransform
from ...runtime.linear import CompressedLinear
from ...runtime.model_ops import ModelOp, attach_model_op, detach_model_ops, model_ops, replace_module
from ..base import Technique, register
from ..fields import only_with

R2_SEED, R4_SEED, OUT_SEED = 1, 2, 3  # offsets of the per-head, online-input and output rotations' seeds from `seed`


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


CHUNK = 4096  # rows (or columns) rotated at once in fp64: bounds the temporary memory of large embeddings


def fuse_reader(weight: torch.Tensor, g: torch.Tensor, q: OrthogonalTransform) -> None:
    """In place, W ← W·diag(g)·Qᵀ (in fp64, `CHUNK` rows at a time): a Linear reading norm(h) with weight g
    now reads the unit norm of Q h. With g = 1, the rows of an embedding."""
    g = g.to(weight.device, torch.float64)
    for i in range(0, weight.shape[0], CHUNK):
        rows = weight.data[i:i + CHUNK]
        rows.copy_(q.apply(rows.double() * g).to(weight.dtype))


def fuse_writer(weight: torch.Tensor, q: OrthogonalTransform, inverse: bool = False) -> None:
    """In place, W ← Q·W (in fp64, `CHUNK` columns at a time): a Linear writing the residual now writes Q
    times its update. With `inverse`, W ← Qᵀ·W (the output side, whose Q is applied online after it)."""
    rotate = q.apply_inverse if inverse else q.apply
    for j in range(0, weight.shape[1], CHUNK):
        cols = weight.data[:, j:j + CHUNK]
        cols.copy_(rotate(cols.T.double()).T.to(weight.dtype))


def per_head(src, dst, h: OrthogonalTransform) -> None:
    """R2 in place: rotate each head of `src`'s outputs by H and each head of `dst`'s inputs by Hᵀ (heads of
    width h.n; `dst` may read more heads than `src` writes, as with grouped-query attention)."""
    d = h.n
    w = src.weight.double().reshape(-1, d, src.in_features).transpose(1, 2)  # rows: one head's column
    _set(src.weight, h.apply(w).transpose(1, 2).reshape(src.weight.shape))
    if src.bias is not None:
        _set(src.bias, h.apply(src.bias.double().reshape(-1, d)).reshape(-1))
    _set(dst.weight, h.apply(dst.weight.double().reshape(dst.out_features, -1, d)).reshape(dst.weight.shape))


def _relative(got, want, base) -> float:
    """‖got − want‖ / ‖want − base‖ over batches: the error relative to what the block adds."""
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float((w.double() - b.double()).pow(2).sum()) for w, b in zip(want, base))
    return (num / max(den, 1e-30)) ** 0.5


def _logits_error(ctx, windows, dense_logits) -> float:
    """‖logits − dense logits‖ / ‖dense logits‖ of the model as it is now, on the probe windows."""
    return float((ctx.logits(windows).double() - dense_logits.double()).norm() / dense_logits.double().norm())


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


@register
class Rotate(Technique):
    name: ClassVar[str] = "rotate"
    family: ClassVar[str] = "transform"
    unit: ClassVar[str] = "model"
    summary: ClassVar[str] = ("orthogonal rotation of the residual stream fused into the weights (QuaRot/SpinQuant "
                              "R1; per-head R2 and online R4 optional); the dense model is unchanged")

    transform: Literal["hadamard", "orthogonal"] = Field(
        "hadamard", description="randomized Hadamard (a Haar-random block where the width has no Hadamard "
        "factorization, recorded as hadamard+orthogonal), or a Haar-random orthogonal matrix")
    seed: int = Field(0, ge=0, description="seed of the rotation (signs or Haar draw); R2 uses seed+1, R4 seed+2, the output side seed+3")
    per_head: bool = Field(False, description="R2: also rotate each attention head's values and the output "
                           "projection's matching inputs (head_dim from the model config)")
    online: bool = Field(False, description="R4: an online Hadamard on the input of the Linears online_include "
                         "selects (0 stored bytes; costs one fast transform per token per Linear)")
    online_include: tuple[str, ...] = Field(("*down_proj",), description="R4: globs (fnmatch) of the Linears "
                                            "that get an online rotation of their input")
    block_size: int = Field(0, ge=0, description="0: each rotation spans its full width; b > 0: block-diagonal, "
                            "each run of b channels rotated on its own (llm-compressor SpinQuant's "
                            "transform_block_size), where b divides the width into several blocks (R1, R4, output)")
    output: bool = Field(False, description="QuIP's output side: every Linear that reads the residual stream "
                         "(q/k/v, gate/up: R1 rotates their inputs, not their outputs) gets W ← Qᵀ·W fused and Q "
                         "applied online to its output (0 stored bytes; one fast transform per token per Linear)")

    @model_validator(mode="after")
    def _fields_that_apply(self):
        only_with(self, ("include", "exclude", "true_sequential", "allocation"), False,
                  "does not apply to rotate: it rotates every Linear that reads or writes the residual stream "
                  "(choose R4's Linears with online_include)")
        only_with(self, ("online_include",), self.online, "only applies with online: true")
        return self

    def params(self) -> dict:
        """The settings; `output` and `block_size` only when set, so recipes written before them keep their hashes
        (a run resumes)."""
        out = super().params()
        return {k: v for k, v in out.items() if k not in ("output", "block_size") or v}

    # -- planning: R4's Linears gain an input rotation (0 bytes); every other Linear keeps its spec --------
    def online_targets(self, name: str) -> bool:
        return self.online and any(fnmatchcase(name, p) for p in self.online_include)

    def online_transform(self, n: int) -> OrthogonalTransform:
        return OrthogonalTransform.create(n, self.transform, self.seed + R4_SEED, self.block_size)

    def plan(self, spec: LinearSpec) -> LinearSpec:
        return spec

    def plan_for(self, name: str, spec: LinearSpec) -> LinearSpec:
        if not self.online_targets(name):
            return spec
        t = self.online_transform(spec.in_features)
        return spec.with_input_ops((*spec.input_ops, InputRotationSpec(t.n, t.kind, t.seed, block=t.block)))

    def apply(self, layer, stats):
        raise IllegalStep("rotate transforms the whole model before the sequential pass (unit 'model'); "
                          "it has no per-Linear form")

    # -- the transform ------------------------------------------------------------------------------------
    @torch.no_grad()
    def transform_model(self, model, context) -> dict:
        """Rotate `model` in place; `context` is a `pipeline.model_context.ModelContext`. Returns the record."""
        t0 = time.perf_counter()
        ctx = context
        compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
        if compressed or model_ops(model):
            raise IllegalStep(f"rotate needs a dense model; {(compressed or [o.module for o in model_ops(model)])[0]} "
                              "is already compressed or rotated")
        dtype = next(model.parameters()).dtype
        tol = _tolerance(dtype)
        windows, inputs = ctx.probe()
        width = inputs.hidden[0].shape[-1]
        q = OrthogonalTransform.create(width, self.transform, self.seed, self.block_size)
        h2 = self._head_transform(model) if self.per_head else None
        ends = ctx.ends(windows)
        dense_logits = ctx.logits(windows)

        # 1. every block, checked before anything is kept: structure, R2 pair, and the rotated forward
        plans, worst = [], 0.0
        current = inputs.copy()
        for i, block in enumerate(ctx.blocks):
            s = ctx.residual_structure(i, current)
            base = ctx.run_block(i, current)
            backup = {k: v.clone() for k, v in block.state_dict().items()}
            try:
                pair = self._head_pair(ctx, i, s, current, base, h2, tol) if h2 is not None else None
                post = self._fuse_block(ctx, i, s, q, pair, h2)
                for name in post:
                    attach_model_op(model, ModelOp("rotate_output", ctx.full(i, name), q))
                rotated = current.copy()
                rotated.hidden = [q.apply(h) for h in current.hidden]
                err = _relative(ctx.run_block(i, rotated), [q.apply(o) for o in base], rotated.hidden)
            finally:
                block.load_state_dict(backup)
                detach_model_ops(model)
            if not err <= tol:
                raise ctx.error(f"block {ctx.full(i, '')[:-1]}: the rotated block does not reproduce the rotated dense "
                                f"block (error {err:.2e} of its residual update, tolerance {tol:g}); readers "
                                f"{s.readers}, writers {s.writers}: a structure this rotation does not know")
            worst = max(worst, err)
            plans.append((s, pair))
            current.hidden = base

        both = [ctx.full(i, n) for i, (s, _) in enumerate(plans) for n in s.residual_readers()
                if self.output and self.online_targets(ctx.full(i, n))]
        if both:  # nothing is fused yet: the output side needs these Linears plain
            raise IllegalStep(f"rotate: online_include selects {both[0]}, which reads the residual stream, and "
                              "output: true rotates its output; choose online_include among the Linears that do "
                              "not read the stream (e.g. ['*o_proj', '*down_proj']) or drop output")
        # 2. fuse for real: blocks, post-norm ops, embedding, final norm and head
        ops, counts = [], {"folded_norms": 0, "fused_readers": 0, "fused_writers": 0}
        for i, (s, pair) in enumerate(plans):
            counts["folded_norms"] += len(s.readers)
            counts["fused_readers"] += len(s.residual_readers())
            counts["fused_writers"] += sum(1 for w in s.writers if w not in s.post_norms)
            for name in self._fuse_block(ctx, i, s, q, pair, h2):
                ops.append(ModelOp("rotate_output", ctx.full(i, name), q))
        emb = model.get_submodule(ends.embedding)
        fuse_reader(emb.weight, torch.ones(width), q)
        head = model.get_submodule(ends.head)
        if ends.tied:
            if ends.final_norm is not None:
                ops.append(ModelOp("conjugate", ends.final_norm, q))
            head_how = "tied to the embedding: " + ("final norm conjugated online" if ends.final_norm else "rotated with it")
        else:
            g = torch.ones(width, dtype=torch.float64)
            if ends.final_norm is not None:
                norm = model.get_submodule(ends.final_norm)
                g = ctx.norm_weight(norm).double()
                ctx.set_norm_weight(norm, torch.ones_like(g))
            fuse_reader(head.weight, g, q)
            head_how = "final norm folded into the head" if ends.final_norm else "head rotated"
        for op in ops:
            attach_model_op(model, op)
        logits_err = _logits_error(ctx, windows, dense_logits)
        if not logits_err <= tol:
            raise ctx.error(f"the rotated model's logits differ from the dense model's by {logits_err:.2e} (relative, "
                            f"tolerance {tol:g}) although every block matched: the embedding ({ends.embedding}), final "
                            f"norm ({ends.final_norm}) or head ({ends.head}) is not what it seems; the model is left "
                            "rotated and should be reloaded")

        # 3. R4: online rotations of the selected Linears' inputs, fused into their weights
        online = self._online(model, ctx) if self.online else []
        # 4. output side: the residual readers' outputs rotated in their weights and back online
        outputs = self._outputs(model, ctx, plans, windows, dense_logits, tol) if self.output else []
        ops += outputs
        return {"transform": q.kind, "seed": self.seed, "width": width, "block": q.block, "blocks": len(plans), **counts,
                "embedding": ends.embedding, "head": f"{ends.head} ({head_how})",
                "per_head": None if h2 is None else {"head_dim": h2.n, "transform": h2.kind, "seed": h2.seed,
                                                     "pairs": sorted({f"{a} -> {b}" for _, (a, b) in plans})},
                "online": online, "outputs": [op.module for op in outputs], "model_ops": [op.meta() for op in ops],
                "online_ops_bytes": 0, "check": {"max_block_error": worst, "logits_error": logits_err,
                                                 "probe_windows": list(windows.shape)},
                "seconds": time.perf_counter() - t0}

    def _head_transform(self, model) -> OrthogonalTransform:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return OrthogonalTransform.create(int(d), self.transform, self.seed + R2_SEED)

    def _fuse_block(self, ctx, index: int, s, q, pair, h2) -> list[str]:
        """R1 (and R2) on block `index` in place; returns the post-norms that need Q applied online."""
        block = ctx.blocks[index]
        for norm_name, readers in s.readers.items():
            norm = block.get_submodule(norm_name)
            g = ctx.norm_weight(norm).double()
            for r in readers:
                lin = block.get_submodule(r)
                fuse_reader(lin.weight, g, q)
            ctx.set_norm_weight(norm, torch.ones_like(g))
        post = []
        for w in s.writers:
            if w in s.post_norms:
                post.append(w)
                continue
            lin = block.get_submodule(w)
            fuse_writer(lin.weight, q)
            if lin.bias is not None:
                _set(lin.bias, q.apply(lin.bias.double()))
        if pair is not None:
            per_head(block.get_submodule(pair[0]), block.get_submodule(pair[1]), h2)
        return post

    def _head_pair(self, ctx, index: int, s, inputs, base, h2, tol) -> tuple[str, str]:
        """The (values, output) Linear pair of block `index`: the one pair whose per-head rotation leaves the
        block's output unchanged, found by trying the candidates of matching widths."""
        block, d = ctx.blocks[index], h2.n
        readers = set(s.residual_readers())
        consumed = {p for p in s.producer.values() if p}
        found = []
        for j, dst in enumerate(s.linears):
            out_lin = block.get_submodule(dst)
            if s.producer.get(dst) is not None or dst in readers or out_lin.in_features % d:
                continue
            for src in s.linears[:j]:
                in_lin = block.get_submodule(src)
                if src in consumed or in_lin.out_features % d or out_lin.in_features % in_lin.out_features:
                    continue
                saved = [t.data.clone() for t in (in_lin.weight, in_lin.bias, out_lin.weight) if t is not None]
                try:
                    per_head(in_lin, out_lin, h2)
                    err = _relative(ctx.run_block(index, inputs), base, inputs.hidden)
                finally:
                    for t, v in zip([t for t in (in_lin.weight, in_lin.bias, out_lin.weight) if t is not None], saved):
                        t.data.copy_(v)
                if err <= tol:
                    found.append((src, dst))
        if len(found) != 1:
            normed = [f"{n} reads {p}" for n, p in s.producer.items() if p in s.linears and n not in s.linears]
            why = (f"; Linears whose output a norm reads (a norm on the values prevents R2): {normed}" if normed else "")
            raise ctx.error(f"per_head: block {ctx.full(index, '')[:-1]} has {len(found)} Linear pairs {found} whose "
                            f"channels pass through per-head attention (head_dim {d}) unchanged up to a rotation; "
                            f"R2 needs exactly one (the value and output projections){why}")
        return found[0]

    def _outputs(self, model, ctx, plans, windows, dense_logits, tol) -> list[ModelOp]:
        """Every residual reader's weight W ← Qᵀ·W (and bias), with ``rotate_output`` Q on the Linear: its
        output is unchanged, its rows mixed (QuIP's two-sided incoherence, with R1 as the input side). Q is a
        randomized Hadamard of the output width (seed + OUT_SEED), one per width. Checked on the logits."""
        ops = []
        for i, (s, _) in enumerate(plans):
            for name in s.residual_readers():
                full = ctx.full(i, name)
                lin = model.get_submodule(full)
                t = OrthogonalTransform.create(lin.out_features, self.transform, self.seed + OUT_SEED, self.block_size)
                fuse_writer(lin.weight, t, inverse=True)  # a plain Linear: R4 on the readers was refused first
                if lin.bias is not None:
                    _set(lin.bias, t.apply_inverse(lin.bias.double()))
                op = ModelOp("rotate_output", full, t)
                attach_model_op(model, op)
                ops.append(op)
        err = _logits_error(ctx, windows, dense_logits)
        if not err <= tol:
            raise ctx.error(f"rotate output: the logits differ from the dense model's by {err:.2e} (relative, "
                            f"tolerance {tol:g}); the model is left rotated and should be reloaded")
        return ops

    def _online(self, model, ctx) -> list[str]:
        """R4: W ← W·Qᵀ fused, and the Linear becomes a CompressedLinear applying Q to its input online."""
        names = [f"{ctx.prefix}.{i}.{n}" for i, b in enumerate(ctx.blocks) for n, m in b.named_modules()
                 if isinstance(m, torch.nn.Linear)]
        names = [n for n in names if self.online_targets(n)]
        if not names:
            raise ValueError(f"rotate: online_include={list(self.online_include)} selects no Linear in the blocks")
        tol = _tolerance(FLOAT_DTYPES[ctx.float_dtype])
        for name in names:
            lin = model.get_submodule(name)
            t = self.online_transform(lin.in_features)
            before = CompressedLinear.from_linear(lin, ctx.float_dtype)
            w = as_float(t.apply(lin.weight.double()), ctx.float_dtype)
            after = CompressedLinear(lin.in_features, lin.out_features, [Dense(w)], before.bias_value,
                                     compute_dtype=lin.weight.dtype, input_ops=[InputRotation(t)])
            check_step(before, after, self, name)  # stores exactly what plan_for said: 0 bytes more
            probe = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(0)).to(lin.weight)
            err = float((after(probe) - before(probe)).norm() / before(probe).norm().clamp_min(1e-30))
            if not err <= tol:
                raise ctx.error(f"{name}: the online rotation does not reproduce the Linear (error {err:.2e})")
            replace_module(model, name, after)
        return names
