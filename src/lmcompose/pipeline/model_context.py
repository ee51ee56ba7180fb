"""What a model-unit step (``Technique.transform_model``) may use of the pipeline, found structurally.

A step that transforms the whole model before the sequential pass (a rotation of the residual stream)
needs the structure of every block (`pipeline.structure.trace_block`) and of the model's two ends, block
forwards to check its work, and the norms' effective weights. Techniques sit below the pipeline and may
not import it; `ModelContext` hands them these services:

* `probe` draws a few random token windows and captures what each block receives on them;
* `residual_structure` traces block i and checks that its residual stream is the usual pre-norm one
  (every norm RMS-type, each residual update written by one Linear or by a post-norm over one Linear),
  raising `StructureError` naming the module otherwise;
* `ends` finds the embedding, the head, whether they share one matrix (tied) and the final norm between
  the last block and the head, from one traced forward;
* `run_block`, `norm_weight`, `set_norm_weight`, and `error` (a `StructureError` to raise).

Example::

    ctx = ModelContext(model, float_dtype="fp16")
    windows, inputs = ctx.probe()
    s = ctx.residual_structure(0, inputs)           # BlockStructure, checked
    ends = ctx.ends(windows)                        # ModelEnds(embedding='model.embed_tokens', ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import find_blocks
from .hooks import owned_hooks
from .passes import BlockInputs, capture_inputs, run_block
from .structure import LINEAR_TYPES, BlockStructure, StructureError, _is_norm, norm_weight, set_norm_weight, trace_block


@dataclass
class ModelEnds:
    """The model outside its blocks (names from the root): embedding, head, tied, final norm (or None)."""

    embedding: str
    head: str
    tied: bool
    final_norm: str | None


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise StructureError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


class ModelContext:
    """Services of the pipeline for `Technique.transform_model` (see the module docstring)."""

    def __init__(self, model: nn.Module, float_dtype: str = "fp16", compute_dtype: str = "fp32"):
        self.model = model
        self.float_dtype = float_dtype
        self.compute_dtype = compute_dtype
        self.prefix, self.blocks = find_blocks(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def error(self, message: str) -> StructureError:
        return StructureError(message)

    # -- forwards --------------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, n: int = 2, seqlen: int = 32, seed: int = 0) -> tuple[torch.Tensor, BlockInputs]:
        """`n` random token windows and what block 0 receives on them (with every block's kwargs)."""
        vocab = self.model.get_input_embeddings().num_embeddings
        windows = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
        return windows, capture_inputs(self.model, windows, n, self.device)

    @torch.no_grad()
    def run_block(self, index: int, inputs: BlockInputs) -> list[torch.Tensor]:
        return run_block(self.blocks[index], inputs, index)

    @torch.no_grad()
    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=windows.to(self.device), use_cache=False).logits

    norm_weight = staticmethod(norm_weight)
    set_norm_weight = staticmethod(set_norm_weight)

    # -- structure -------------------------------------------------------------------------------
    def full(self, index: int, name: str) -> str:
        return f"{self.prefix}.{index}.{name}"

    @torch.no_grad()
    def residual_structure(self, index: int, inputs: BlockInputs, probe_channels: bool = False) -> BlockStructure:
        """The traced structure of block `index`, checked to be a pre-norm residual block of RMS-type norms."""
        block = self.blocks[index]
        width = inputs.hidden[0].shape[-1]
        for name, m in block.named_modules():
            if name and isinstance(m, LINEAR_TYPES):
                continue
            widths = [p for p in m.parameters(recurse=False) if p.dim() == 1 and p.shape[0] == width]
            if widths and not _is_norm(m, width):
                raise StructureError(f"{self.full(index, name)} ({type(m).__name__}) has per-channel parameters of the "
                                     f"residual width {width} but is not a scale-invariant norm with one weight (a "
                                     "LayerNorm with a bias, or an unknown module): the residual stream cannot be "
                                     "rotated through it")
        s = trace_block(block, inputs, index, probe_channels=probe_channels)
        for name in s.norms:
            self._check_rms(block.get_submodule(name), self.full(index, name), width)
        if not s.readers:
            raise StructureError(f"block {self.full(index, '')[:-1]}: no norm reads the residual stream (no pre-norm "
                                 "found); only pre-norm residual blocks can be rotated")
        for norm, linears in s.readers.items():
            if not linears:
                raise StructureError(f"{self.full(index, norm)} reads the residual stream but feeds no Linear directly")
        updates = 2 if len(s.readers) >= 2 else 1
        if len(s.writers) != updates:
            raise StructureError(f"block {self.full(index, '')[:-1]}: {updates} residual update(s) but "
                                 f"{len(s.writers)} module(s) found writing one ({s.writers}); an update that is the "
                                 "sum of several modules (parallel attention and MLP) cannot be rotated per writer")
        for w in s.writers:
            source = s.post_norms.get(w, w)
            if source is None or not isinstance(block.get_submodule(source), LINEAR_TYPES):
                raise StructureError(f"{self.full(index, w)} writes the residual stream but is neither a Linear nor a "
                                     "norm over one Linear's output")
        return s

    @torch.no_grad()
    def _check_rms(self, norm: nn.Module, name: str, width: int) -> None:
        """f(x) = g ⊙ x / rms(x): no mean subtraction, no bias (probed on inputs of large magnitude)."""
        p = next(norm.parameters())
        g = norm_weight(norm)
        x = (torch.randn(4, width, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 1e2 + 30.0)
        want = g * x / x.pow(2).mean(-1, keepdim=True).sqrt()
        got = norm(x.to(p.device, p.dtype)).float().cpu()
        if not torch.allclose(got, want.to(got.device), rtol=2e-2, atol=1e-3 * float(g.abs().max())):
            raise StructureError(f"{name} ({type(norm).__name__}) is scale-invariant but not an RMS norm (it subtracts "
                                 "the mean, or adds a bias): it does not commute with a rotation")

    @torch.no_grad()
    def ends(self, windows: torch.Tensor) -> ModelEnds:
        """The embedding, the head, whether they share their weight, and the final norm between the last
        block and the head (None when the head reads the last block's output directly)."""
        model = self.model
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if emb is None or head is None or not isinstance(head, nn.Linear):
            raise StructureError(f"{type(model).__name__}: no input embedding and Linear output head found "
                                 "(get_input_embeddings / get_output_embeddings)")
        tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
        inside = {id(m) for m in self.blocks.modules()}
        outputs: list[tuple[str, torch.Tensor]] = []
        seen: dict[str, torch.Tensor] = {}
        last = self.blocks[len(self.blocks) - 1]

        def post(name):
            def fn(module, args, out):
                y = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(y, torch.Tensor):
                    outputs.append((name, y))
            return fn

        def pre(name):
            def fn(module, args):
                if args and isinstance(args[0], torch.Tensor):
                    seen[name] = args[0]
            return fn

        def producer(x: torch.Tensor | None) -> str | None:
            """The last module whose output is `x`, or a view of it of the same shape (a head reading
            ``hidden[:, -k:]`` with k = all positions)."""
            if x is None:
                return None
            for name, y in reversed(outputs):
                if y is x or (y.shape == x.shape and y.data_ptr() == x.data_ptr() and y.stride() == x.stride()):
                    return name
            return None

        with owned_hooks() as hooks:
            for name, m in model.named_modules():
                if name and (id(m) not in inside or m is last) and not isinstance(m, (nn.ModuleList,)):
                    hooks.forward(m, post(name))
                    hooks.forward_pre(m, pre(name))
            self.logits(windows[:1])
        head_name, last_name = _name_of(model, head), f"{self.prefix}.{len(self.blocks) - 1}"
        if head_name not in seen:
            raise StructureError(f"{head_name} was not called on the model's forward")
        source = producer(seen[head_name])
        if source == last_name:
            return ModelEnds(_name_of(model, emb), head_name, tied, None)
        norm = model.get_submodule(source) if source else None
        width = head.in_features
        if norm is None or not _is_norm(norm, width):
            raise StructureError(f"{head_name} reads {source or 'a tensor no module produced'}, which is not a "
                                 "scale-invariant norm with one weight: the final norm is not recognised")
        if producer(seen.get(source)) != last_name:
            raise StructureError(f"{source} (the final norm) does not read the last block's output "
                                 f"({last_name}) directly")
        self._check_rms(norm, source, width)
        return ModelEnds(_name_of(model, emb), head_name, tied, source)
