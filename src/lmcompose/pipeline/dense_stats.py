"""The dense statistics pass: every block's Linear input statistics on the uncompressed model.

One pass serves the pipeline and the search. `SequentialCompressor` runs it (`DenseStats.from_inputs`)
as the prepass of the steps that split their budget across Linears (OWL, sensitivity allocation); the
search computes it once per model and calibration set (`DenseStats.compute`) and scores every trial from
it, cached on disk as safetensors (never a pickle), written atomically and keyed by `fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import dtypes as compute
from ..core.io import atomic_file
from ..core.stats import Stats
from ..runtime.linear import CompressedLinear
from .blocks import block_linears, find_blocks
from .passes import BlockInputs, capture_inputs, observe, run_block

log = logging.getLogger(__name__)


def fingerprint(model: nn.Module, windows: torch.Tensor, compute_dtype: str = "fp32") -> str:
    """sha256 of the block Linears' weights, the calibration windows and the (resolved) compute dtype of
    the forwards: the cache key of `DenseStats`."""
    h = hashlib.sha256(compute_dtype.encode())
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, f"{prefix}.{i}").items():
            h.update(name.encode())
            h.update(lin.weight.detach().float().cpu().numpy().tobytes())
    h.update(windows.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight of a Linear, or of an already compressed one."""
    if isinstance(module, CompressedLinear):
        return module.to_dense(torch.float32)
    return module.weight.detach().float()


@dataclass
class DenseStats:
    """Per-Linear input statistics of the dense model, on the CPU; Linears fed the same tensor share one entry."""

    stats: dict[str, Stats]           # by canonical name
    alias: dict[str, str]             # Linear name -> canonical name
    blocks: list[list[str]]           # Linear names per block, in block order
    key: str = ""

    def __getitem__(self, name: str) -> Stats:
        return self.stats[self.alias[name]]

    def allocation_input(self, step, model: nn.Module, device) -> list[list[tuple]]:
        """What ``step.allocate`` takes: per block, ``(name, fp32 weight on device, stats)`` of the Linears
        `step` targets (the statistics stay on the CPU; the allocation moves them one Linear at a time)."""
        return [[(n, dense_weight(model.get_submodule(n)).to(device), self[n]) for n in names if step.targets(n)]
                for names in self.blocks]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                compute_dtype: str = "auto", device=None) -> "DenseStats":
        """One dense forward over `windows`, block by block, observing every Linear (the pipeline's
        `observe`, with its forwards in the compute dtype as the pipeline runs them; the statistics
        themselves accumulate in fp32). With `device` set and the model elsewhere, blocks visit `device`
        one at a time, as in `compress`."""
        home = next(model.parameters()).device
        device = torch.device(device) if device is not None else home
        dtype = compute.resolve(compute_dtype, device, compute.model_dtype(model))
        with compute.autocast(dtype, home):
            inputs = capture_inputs(model, windows, batch_size, home)
        if device != home:
            inputs = inputs.to(device)
        stats = cls.from_inputs(model, inputs, device, dtype)
        stats.key = fingerprint(model, windows, dtype)
        return stats

    @classmethod
    @torch.no_grad()
    def from_inputs(cls, model: nn.Module, inputs: BlockInputs, device, compute_dtype: str) -> "DenseStats":
        """The pass itself, from the blocks' captured inputs (on `device`, left as they are), with the forwards
        in `compute_dtype` (resolved). Each block visits `device` and goes back home; no cache key."""
        home = next(model.parameters()).device
        prefix, blocks = find_blocks(model)
        current = inputs.copy()
        stats, alias, names = {}, {}, []
        for i, block in enumerate(blocks):
            block.to(device)
            linears = block_linears(block, f"{prefix}.{i}")
            with compute.autocast(compute_dtype, device):
                got, groups = observe(block, current, i, linears)
            for group in groups:
                stats[group[0]] = got[group[0]].to("cpu")
                alias.update({n: group[0] for n in group})
            names.append([n for n in linears if n in alias])
            with compute.autocast(compute_dtype, device):
                current.hidden = run_block(block, current, i)
            block.to(home)
        return cls(stats, alias, names)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (`core.io.atomic_file`) so concurrent workers never read half a file."""
        tensors = {}
        for name, s in self.stats.items():
            tensors[f"{name}/gram"] = s.gram.contiguous()
            tensors[f"{name}/abs_mean"] = s.abs_mean.contiguous()
            tensors[f"{name}/absmax"] = s.absmax.contiguous()
        meta = {"alias": json.dumps(self.alias), "blocks": json.dumps(self.blocks), "key": self.key,
                "n_tokens": json.dumps({n: s.n_tokens for n, s in self.stats.items()})}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DenseStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        n_tokens = json.loads(meta["n_tokens"])
        stats = {n: Stats(k, tensors[f"{n}/gram"], tensors[f"{n}/abs_mean"], tensors[f"{n}/absmax"])
                 for n, k in n_tokens.items()}
        return cls(stats, json.loads(meta["alias"]), json.loads(meta["blocks"]), meta["key"])

    @classmethod
    def load_or_compute(cls, model: nn.Module, windows: torch.Tensor, cache_dir: str | os.PathLike,
                        batch_size: int = 8, compute_dtype: str = "auto", device=None) -> "DenseStats":
        """`load` the cached statistics of this model, windows and compute dtype, or `compute` and cache them."""
        where = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = compute.resolve(compute_dtype, where, compute.model_dtype(model))
        path = Path(cache_dir) / f"dense-stats-{fingerprint(model, windows, dtype)}.safetensors"
        if path.is_file():
            log.info("dense statistics from cache %s", path)
            return cls.load(path)
        stats = cls.compute(model, windows, batch_size, dtype, device)
        stats.save(path)
        log.info("dense statistics cached in %s", path)
        return stats
