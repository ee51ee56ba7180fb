"""Perplexity and fidelity of models bigger than memory, one decoder block at a time.

The model comes with its decoder blocks on the meta device and a block loader that materialises block i
(``load(i, block, prefix)``) and frees it again (``release(i, block)``): `models.stream.StreamedBlocks` for a
base safetensors checkpoint, `models.stream.CompressedBlocks` for an lmcompose run directory;
`models.stream.open_for_streaming` opens either. The protocol's windows then go through the model layer by
layer, as the compression pipeline sends its calibration windows:

1. what every block receives is captured with the blocks replaced by the identity
   (`pipeline.passes.capture_inputs`: the embedding, and per block the masks and rotary tables);
2. each block is loaded, run over the hidden states of all windows, and released;
3. the model runs once more per batch with its blocks standing in for themselves (the last one hands back
   the hidden states it computed), so that the final norm, the head, any soft cap and the NLL are the
   in-memory path's own code (`perplexity.window_nll`).

The result equals `perplexity.perplexity` of the same model in memory (tests/test_stream_eval.py checks it
exactly): the same windows in the same batches, the same dtype (the one the weights were loaded in, as
``lmcompose eval`` loads them), the same operations.

Memory: the tensors outside the blocks, one block, and the hidden states of one chunk of windows plus one
batch (`pipeline.passes.advance`: a block's outputs replace its inputs batch by batch), plus what the model
hands its blocks per batch (rotary tables; attention masks where the attention implementation needs them).
The windows go in chunks of `chunk_windows`, by default as many as keep those hidden states within
`HIDDEN_BUDGET` (4 GiB: all 64 windows of the quick protocol for a 4096-wide bf16 model take 256 MiB, the
166 windows of the full one 2.6 GiB, one chunk each; an 8192-wide model's full protocol takes two). Every
block is read once per chunk.

`streamed_fidelity` does the same for two models at once (the dense reference and a compressed one): KL and
top-1 agreement equal `fidelity.fidelity`'s, with one block of one model in memory at a time.

Example::

    model, tokenizer, blocks = open_for_streaming("runs/llama-70b-gptq", dtype="bf16")
    result = streamed_perplexity(model, tokenizer, "quick", blocks)
    print(result.ppl)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from ..core.dtypes import FLOAT_BYTES, dtype_name, model_dtype
from ..data.calibration import eval_tokens
from ..pipeline.blocks import find_blocks
from ..pipeline.hooks import owned_hooks
from ..pipeline.passes import BlockInputs, advance, capture_inputs
from ..runtime.linear import CompressedLinear
from ..runtime.logits import head_path, head_path_agrees
from .fidelity import (
    ChunkedLogits,
    FidelityResult,
    compare_runs,
    fidelity_protocol,
    fidelity_result,
)
from .perplexity import (
    PerplexityResult,
    Protocol,
    result_of,
    run_protocol,
    window_nll,
    windows_of,
)

HIDDEN_BUDGET = 4 * 2**30  # bytes of hidden states one chunk may hold


def _width(model) -> int:
    """The width of the hidden states between the blocks."""
    return getattr(model.config, "hidden_size", None) or model.get_input_embeddings().embedding_dim


def chunk_size(model, protocol: Protocol, budget: int = HIDDEN_BUDGET) -> int:
    """Windows per chunk: the most whole batches whose hidden states, with one batch more, fit in `budget`
    bytes (at least one batch). `protocol.dtype` must be set (`perplexity.run_protocol`)."""
    per_batch = protocol.batch_size * protocol.seqlen * _width(model) * FLOAT_BYTES[protocol.dtype]
    return max(1, budget // per_batch - 1) * protocol.batch_size


def place(model: nn.Module, device) -> None:
    """Move every tensor of `model` that is not on the meta device to `device`, tied tensors staying one
    tensor (``model.to`` would fail on the meta blocks)."""
    device, moved = torch.device(device), {}
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            if module._probe.device.type != "meta":
                module.to(device)
            continue
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is None or t.device.type == "meta":
                    continue
                if id(t) not in moved:
                    moved[id(t)] = nn.Parameter(t.to(device), t.requires_grad) if isinstance(t, nn.Parameter) \
                        else t.to(device)
                store[name] = moved[id(t)]


def _loaded_device(model: nn.Module) -> torch.device:
    return next(t.device for t in model.parameters() if t.device.type != "meta")


def _stand_in(hidden: torch.Tensor | None, as_tuple: bool):
    """A block's forward that returns `hidden`, or its own input when `hidden` is None."""
    def forward(h=None, *args, **kwargs):
        y = hidden if hidden is not None else (h if h is not None else kwargs["hidden_states"])
        return (y,) if as_tuple else y
    return forward


@contextmanager
def _replayed(layers: nn.ModuleList, hidden: torch.Tensor | None, as_tuple: bool):
    """The blocks replaced by what they computed: each passes its input on and the last hands back `hidden` (the
    batch's output of the last block; None: its input too). The model's own code runs around them."""
    with owned_hooks() as hooks:
        for i, block in enumerate(layers):
            hooks.patch(block, "forward", _stand_in(hidden if i == len(layers) - 1 else None, as_tuple))
        yield


def _run(block: nn.Module, inputs, index: int) -> bool:
    """Run `block` over every batch of `inputs`, whose hidden states become its outputs; returns whether the
    block returns a tuple (older transformers' blocks do, and the model then indexes it: the stand-ins must too)."""
    kinds = []
    with owned_hooks() as hooks, torch.inference_mode():
        hooks.forward(block, lambda module, args, out: kinds.append(isinstance(out, (tuple, list))))
        advance(block, inputs, index)
    return kinds[-1]


def _stream(model, inputs, blocks, device, tick: Callable[[], None]) -> bool:
    """Captured `inputs` through every block of `model`, one block in memory at a time: ``inputs.hidden``
    then holds per batch the last block's output. Returns whether the blocks return tuples (`_run`). `tick`
    is called after each block."""
    prefix, layers = find_blocks(model)
    as_tuple = False
    for i, block in enumerate(layers):
        blocks.load(i, block, f"{prefix}.{i}")
        try:
            as_tuple = _run(block.to(device), inputs, i)
        finally:
            blocks.release(i, block)
        tick()
    return as_tuple


def _through_blocks(model, part: torch.Tensor, bs: int, blocks, device, tick: Callable[[], None]):
    """Windows `part` (batches of `bs`) through every block (`_stream`). Returns ``(inputs, as_tuple)``."""
    inputs = capture_inputs(model, part, bs, device)
    return inputs, _stream(model, inputs, blocks, device, tick)


def _head_agrees(model, as_tuple: bool, window: torch.Tensor) -> bool:
    """Whether trunk + head reproduce the model's logits (`runtime.logits.head_path_agrees`), the blocks
    passing their inputs on: it does not depend on what the blocks compute."""
    parts = head_path(model)
    with _replayed(find_blocks(model)[1], None, as_tuple):
        return parts is not None and head_path_agrees(model, *parts, window)


def _ticker(progress, total: int) -> Callable[[], None]:
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
    return tick


def streamed_perplexity(model, tokenizer, protocol: Protocol | str, blocks, data_dir=None, device=None,
                        progress=None, chunk_windows: int | None = None) -> PerplexityResult:
    """Token-level perplexity of `model` under `protocol` with one decoder block in memory at a time (see the
    module docstring): the number `perplexity.perplexity` gives for the same model in memory.

    Args:
        model: a causal LM whose decoder blocks are on the meta device and whose other tensors are loaded
            (`models.stream.open_for_streaming`); its blocks are on the meta device again when this returns.
        tokenizer: its tokenizer.
        protocol: a `Protocol` or the name of one.
        blocks: the block loader (``load(i, block, prefix)``, ``release(i, block)``).
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``).
        device: where the windows, the hidden states and each loaded block go; the model's loaded tensors are
            moved there (default: where they are).
        progress: optional ``callable(done, total)`` counting block passes (blocks × chunks).
        chunk_windows: windows per chunk, rounded down to whole batches (at least one); default `chunk_size`.
    """
    protocol = run_protocol(model, protocol)
    if device is not None:
        place(model, device)
    device = _loaded_device(model)
    t0 = time.perf_counter()
    windows = windows_of(eval_tokens(tokenizer, protocol.dataset, protocol.split, data_dir), protocol)
    layers = find_blocks(model)[1]
    bs, total = protocol.batch_size, windows.shape[0]
    chunk = max(1, (chunk_windows or chunk_size(model, protocol)) // bs) * bs  # the in-memory path's batches
    tick = _ticker(progress, -(-total // chunk) * len(layers))
    nll, use_head = 0.0, None
    for start in range(0, total, chunk):
        part = windows[start:start + chunk]
        inputs, as_tuple = _through_blocks(model, part, bs, blocks, device, tick)
        if use_head is None:
            use_head = _head_agrees(model, as_tuple, part[:1].to(device))
        for b, hidden in enumerate(inputs.hidden):
            with _replayed(layers, hidden, as_tuple):
                nll += float(window_nll(model, part[b * bs:(b + 1) * bs].to(device), use_head).sum())
        del inputs
    return result_of(nll, total, protocol, t0)


def streamed_fidelity(dense, dense_blocks, compressed, compressed_blocks, tokenizer,
                      protocol: Protocol | str = "quick", data_dir=None, max_windows: int | None = 16, device=None,
                      progress=None, chunk_windows: int | None = None) -> FidelityResult:
    """KL(dense ‖ compressed) and top-1 agreement (`fidelity.fidelity`) of two models bigger than memory,
    each streamed one block at a time: per chunk of windows, the dense model's blocks run over it, then the
    compressed model's, and both heads then run per batch on the final hidden states, `fidelity.CHUNK`
    positions at a time. Equals `fidelity.fidelity` of the same models in memory.

    Args:
        dense, compressed: causal LMs opened by `models.stream.open_for_streaming` (blocks on the meta
            device), with their block loaders `dense_blocks` and `compressed_blocks`.
        tokenizer: the tokenizer of both.
        protocol, data_dir, max_windows: as `fidelity.fidelity`.
        device: where both models' loaded tensors, each loaded block and the hidden states go (default:
            where the dense model's loaded tensors are).
        progress: optional ``callable(done, total)`` counting block passes (both models' blocks × chunks).
        chunk_windows: windows per chunk (whole batches); default: the smaller `chunk_size` of the two, so
            that both models' hidden states of a chunk fit in twice `HIDDEN_BUDGET`.
    """
    protocol = fidelity_protocol(protocol, max_windows, dense, compressed)
    if device is not None:
        place(dense, device)
    device = _loaded_device(dense)
    place(compressed, device)
    t0 = time.perf_counter()
    windows = windows_of(eval_tokens(tokenizer, protocol.dataset, protocol.split, data_dir), protocol)
    bs, total = protocol.batch_size, windows.shape[0]
    sizes = [chunk_size(m, protocol.model_copy(update={"dtype": dtype_name(model_dtype(m))}))
             for m in (dense, compressed)]
    chunk = max(1, (chunk_windows or min(sizes)) // bs) * bs
    models = [(dense, dense_blocks), (compressed, compressed_blocks)]
    tick = _ticker(progress, -(-total // chunk) * sum(len(find_blocks(m)[1]) for m, _ in models))
    kl_sum, agree, sides = 0.0, 0, None
    for start in range(0, total, chunk):
        part = windows[start:start + chunk]
        runs = [_through_blocks(m, part, bs, loader, device, tick) for m, loader in models]
        if sides is None:
            sides = [ChunkedLogits(m, _head_agrees(m, as_tuple, part[:1].to(device)))
                     for (m, _), (_, as_tuple) in zip(models, runs)]
        for b in range(len(runs[0][0].hidden)):
            batch = part[b * bs:(b + 1) * bs]
            for side, (m, _), (inputs, as_tuple) in zip(sides, models, runs):
                with _replayed(find_blocks(m)[1], inputs.hidden[b], as_tuple):
                    side.run(batch)
            k, a = compare_runs(*sides, batch.shape[1])
            kl_sum, agree = kl_sum + k, agree + a
        del runs
    return fidelity_result(kl_sum, agree, windows, protocol, t0)


class StreamedCalls:
    """The logits of lm-evaluation-harness's model calls for a model bigger than memory (`zeroshot` with a
    block loader), one decoder block in memory at a time.

    lm-eval scores a request kind (loglikelihood, loglikelihood_rolling) by calling the model on padded
    batches it builds itself, one after the other, and reads each batch's logits before it builds the next.
    Streaming every call through all the blocks would read the whole checkpoint once per batch; instead the
    request kind runs twice: while *recording*, each call's input ids are kept and zero logits of the right
    shape go back (lm-eval's scores of that pass are thrown away); then the recorded calls are split into
    groups whose hidden states fit in `budget` bytes, and while *replaying*, the first call of a group sends
    the whole group through every block (each block read once per group), and each call's logits come from
    the model's own code around the blocks (`_replayed`), as in `streamed_perplexity`. lm-eval's batching is
    deterministic, so the replayed calls are the recorded ones; each is checked, and a mismatch is an error.

    The logits equal those of the same model in memory called on the same batch (right-padded, no attention
    mask: causal attention never reads the padding of later positions); tests/test_stream_eval.py checks the
    zero-shot results are identical.
    """

    def __init__(self, model, blocks, device=None, budget: int | None = None, progress=None):
        if device is not None:
            place(model, device)
        self.model, self.blocks, self.budget, self.progress = model, blocks, budget or HIDDEN_BUDGET, progress
        self.device = _loaded_device(model)
        self.layers = find_blocks(model)[1]
        self.width = _width(model)
        head = model.get_output_embeddings()
        self.vocab = getattr(head, "out_features", None) or model.config.vocab_size
        self.passes = 0  # block passes done, over every replay
        self._recorded: list[torch.Tensor] = []
        self._replaying, self._next, self._ready = False, 0, {}

    def record(self) -> None:
        """Start a recording pass: calls are kept and answered with zero logits."""
        self._recorded, self._replaying = [], False

    def replay(self) -> None:
        """Start the replay of what was recorded: calls are answered with their logits, group by group."""
        self._replaying, self._next, self._ready = True, 0, {}
        self._groups = self._split()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if not self._replaying:
            self._recorded.append(ids.detach().cpu())
            return torch.zeros(*ids.shape, self.vocab)
        k, self._next = self._next, self._next + 1
        if k >= len(self._recorded) or not torch.equal(ids.cpu(), self._recorded[k]):
            raise RuntimeError(f"lm-evaluation-harness's model call {k} differs from the one recorded: its batches "
                               f"are not deterministic here, so the streamed scores cannot be matched to them")
        if k not in self._ready:
            self._run(next(g for g in self._groups if k in g))
        hidden, as_tuple = self._ready.pop(k)
        with _replayed(self.layers, hidden, as_tuple), torch.inference_mode():
            return self.model(input_ids=ids.to(self.device)).logits

    def _tick(self) -> None:
        self.passes += 1
        if self.progress is not None:
            self.progress(self.passes, None)

    def _split(self) -> list[range]:
        """Consecutive recorded calls in groups whose hidden states fit in the budget (at least one call each)."""
        per_token = self.width * FLOAT_BYTES[dtype_name(model_dtype(self.model))]
        groups, start, size = [], 0, 0
        for k, ids in enumerate(self._recorded):
            need = ids.numel() * per_token
            if k > start and size + need > self.budget:
                groups.append(range(start, k))
                start, size = k, 0
            size += need
        if self._recorded:
            groups.append(range(start, len(self._recorded)))
        return groups

    def _run(self, group: range) -> None:
        """Every call of `group` through every block, one block in memory at a time."""
        parts = [capture_inputs(self.model, self._recorded[k], self._recorded[k].shape[0], self.device)
                 for k in group]
        inputs = BlockInputs([h for p in parts for h in p.hidden], [kw for p in parts for kw in p.kwargs],
                             [a for p in parts for a in p.args])
        as_tuple = _stream(self.model, inputs, self.blocks, self.device, self._tick)
        self._ready = {k: (h, as_tuple) for k, h in zip(group, inputs.hidden)}
