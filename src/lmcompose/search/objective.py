"""The search objective at three levels of cost: proxy, quick perplexity, full protocol.

* **Level 1, the proxy ("independent" mode).** The dense model's block statistics (one ``Stats`` per
  Linear input: Gram, E|x|, max|x|) are computed once by a dense forward over the calibration windows and
  cached on disk as safetensors (`DenseStats`; never a pickle). Each trial then applies its recipe to
  every targeted Linear *from the dense inputs*: no sequential propagation, so a step sees the statistics
  of the uncompressed model even where the real pipeline would show it inputs already changed by earlier
  blocks (and the schedule, layer- or step-major, makes no difference at this level). Steps that split
  their budget across blocks (OWL) get ``allocate`` on the same dense statistics, as the pipeline's
  prepass does. The proxy is ``Σ_l w_l e_l / Σ_l w_l`` with ``e_l = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` the relative
  output error of Linear l (``pipeline.stats.relative_error``) and ``w_l = out·in`` its parameter count,
  so a large MLP matrix weighs more than a small k/v projection, as its share of the compute and bytes.
* **Level 1b, "independent" perplexity** (`Evaluator.independent`, ``--level independent``, the search's
  default level). The proxy's
  independently compressed Linears put into a copy of the dense model, scored by perplexity on the
  held-out windows: a few seconds more than the proxy (one forward over the held-out windows), no
  sequential pipeline. It sees how the layers' errors add up through the network, which the weighted mean
  cannot: on SmolLM2 at 3.2 bits/weight the proxy rates 3-bit GPTQ ahead of SparseGPT 50% + 4-bit GPTQ
  (0.022 against 0.028) while the full protocol rates the latter 26% better.
* **Level 2, quick perplexity.** ``compress`` (the real sequential pipeline) on a copy of the dense model,
  then perplexity on a few *held-out* calibration windows (token windows not used to calibrate).
* **Level 3, the full protocol**, only for finalists: WikiText-2 perplexity under the ``full`` protocol
  of the same compressed copy that level 2 measured (`Evaluator.compressed`), so a finalist is
  compressed once. Tests never run it on a real model.

`rank_correlation` (Spearman, scipy when present, else average ranks for ties) reports how well a cheaper
level ranks the candidates that were also measured at a dearer one.

Example::

    stats = DenseStats.load_or_compute(model, windows, cache_dir="runs/search/cache")
    ev = Evaluator(model, stats, calib=windows, heldout=heldout)
    ev.proxy(recipe).value, ev.quick(recipe)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..api import compress
from ..core import dtypes as compute
from ..core.dtypes import cast_for_eval
from ..core.stats import Stats, relative_error
from ..eval.perplexity import window_nll
from ..pipeline.blocks import block_linears, find_blocks
from ..pipeline.sequential import capture_inputs, observe, run_block
from ..recipe import Recipe
from ..runtime.linear import CompressedLinear

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


@dataclass
class DenseStats:
    """Per-Linear input statistics of the dense model; Linears fed the same tensor share one entry."""

    stats: dict[str, Stats]           # by canonical name
    alias: dict[str, str]             # Linear name -> canonical name
    blocks: list[list[str]]           # Linear names per block, in block order
    key: str = ""

    def __getitem__(self, name: str) -> Stats:
        return self.stats[self.alias[name]]

    @classmethod
    @torch.no_grad()
    def compute(cls, model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
                compute_dtype: str = "auto") -> "DenseStats":
        """One dense forward on the model's device, block by block, observing every Linear (the
        pipeline's `observe`, with its forwards in the compute dtype as the pipeline runs them; the
        statistics themselves accumulate in fp32); the statistics are kept on the CPU."""
        device = next(model.parameters()).device
        dtype = compute.resolve(compute_dtype, device, compute.model_dtype(model))
        prefix, blocks = find_blocks(model)
        with compute.autocast(dtype, device):
            inputs = capture_inputs(model, windows, batch_size, device)
            stats, alias, names = {}, {}, []
            for i, block in enumerate(blocks):
                linears = block_linears(block, f"{prefix}.{i}")
                got, groups = observe(block, inputs, i, linears)
                for group in groups:
                    stats[group[0]] = got[group[0]].to("cpu")
                    alias.update({n: group[0] for n in group})
                names.append([n for n in linears if n in alias])
                inputs.hidden = run_block(block, inputs, i)
        return cls(stats, alias, names, fingerprint(model, windows, dtype))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + os.replace) so concurrent workers never read half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, s in self.stats.items():
            tensors[f"{name}/gram"] = s.gram.contiguous()
            tensors[f"{name}/abs_mean"] = s.abs_mean.contiguous()
            tensors[f"{name}/absmax"] = s.absmax.contiguous()
        meta = {"alias": json.dumps(self.alias), "blocks": json.dumps(self.blocks), "key": self.key,
                "n_tokens": json.dumps({n: s.n_tokens for n, s in self.stats.items()})}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        return path

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
                        batch_size: int = 8, compute_dtype: str = "auto") -> "DenseStats":
        dtype = compute.resolve(compute_dtype, next(model.parameters()).device, compute.model_dtype(model))
        path = Path(cache_dir) / f"dense-stats-{fingerprint(model, windows, dtype)}.safetensors"
        if path.is_file():
            log.info("dense statistics from cache %s", path)
            return cls.load(path)
        stats = cls.compute(model, windows, batch_size, dtype)
        stats.save(path)
        log.info("dense statistics cached in %s", path)
        return stats


@dataclass
class ProxyResult:
    value: float                                   # parameter-weighted mean relative output error
    errors: dict[str, float] = field(default_factory=dict)
    linear_bytes: int = 0                          # what the compressed Linears store, as compressed here
    linear_dense_fp16_bytes: int = 0               # the same Linears dense in fp16
    weights: int = 0                               # their weight count
    layers: dict[str, CompressedLinear] = field(default_factory=dict, repr=False)  # kept on request only

    @property
    def ratio(self) -> float:
        return self.linear_bytes / self.linear_dense_fp16_bytes

    @property
    def bits_per_weight(self) -> float:
        """Measured, not planned: a step that allocates across Linears (allocation: sensitivity) spends
        bytes the uniform plan of `Recipe.check` cannot know."""
        return 8 * self.linear_bytes / self.weights


class Evaluator:
    """Scores recipes against one dense model; holds its dense statistics and evaluation windows.

    Args:
        model: the dense model (never modified: `quick` compresses a deep copy).
        stats: its `DenseStats` on the calibration windows.
        calib: calibration windows ``[n, seqlen]`` for `quick` (level 2).
        heldout: held-out windows ``[n, seqlen]`` scored by `quick`.
        device: where layers are compressed (default: the model's device).
        compute_dtype: dtype of the forwards of `quick` (`lmcompose.compute`; auto = bf16 where faster).
    """

    def __init__(self, model: nn.Module, stats: DenseStats, calib: torch.Tensor | None = None,
                 heldout: torch.Tensor | None = None, device=None, compute_dtype: str = "auto"):
        self.model, self.stats, self.calib, self.heldout = model, stats, calib, heldout
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def proxy(self, recipe: Recipe, keep_layers: bool = False) -> ProxyResult:
        """Level 1: every Linear compressed independently from the dense statistics (module docstring);
        `keep_layers` keeps the compressed Linears in the result."""
        steps = list(recipe.steps)
        allocated = {}  # step index -> {linear name: copy} for steps that allocate across Linears
        for j, step in enumerate(steps):
            if step.needs_prepass:
                allocated[j] = step.allocate([
                    [(n, self._weight(n), self.stats[n]) for n in names if step.targets(n)]
                    for names in self.stats.blocks])
        errors, weights, nbytes, fp16, layers = {}, {}, 0, 0, {}
        for b, names in enumerate(self.stats.blocks):
            for name in names:
                hits = [allocated.get(j, {}).get(name, s) for j, s in enumerate(steps) if s.targets(name)]
                if not hits:
                    continue
                dense = self.model.get_submodule(name)
                st = self.stats[name].to(self.device)
                layer = CompressedLinear.from_linear(dense, recipe.float_dtype).to(self.device)
                original = layer.to_dense(torch.float32)
                for step in hits:
                    layer, _ = step.apply(layer, st)
                errors[name] = relative_error(original, layer.to_dense(torch.float32), st.gram)
                weights[name] = dense.out_features * dense.in_features
                spec = layer.spec()
                nbytes, fp16 = nbytes + spec.nbytes(), fp16 + spec.dense_fp16_nbytes()
                if keep_layers:
                    layers[name] = layer
        if not errors:
            raise ValueError(f"recipe {recipe.hash()} targets no Linear of the model")
        value = sum(weights[n] * errors[n] for n in errors) / sum(weights.values())
        return ProxyResult(value, errors, nbytes, fp16, sum(weights.values()), layers)

    @torch.no_grad()
    def independent(self, recipe: Recipe, batch_size: int = 4) -> tuple[float, ProxyResult]:
        """Level 1b: held-out perplexity of a copy of the dense model holding the proxy's independently
        compressed Linears (module docstring). Returns it with the proxy's result (without the layers)."""
        if self.heldout is None:
            raise ValueError("independent perplexity needs heldout windows")
        result = self.proxy(recipe, keep_layers=True)
        home = next(self.model.parameters()).device
        # the copy takes the compressed Linears in place of the dense ones instead of copying those first
        memo = {id(self.model.get_submodule(name)): layer.to(home) for name, layer in result.layers.items()}
        model = copy.deepcopy(self.model, memo)
        result.layers = {}
        cast_for_eval(model, self.compute_dtype)
        return heldout_perplexity(model, self.heldout, batch_size), result

    def _weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight.detach().float().to(self.device)

    @torch.no_grad()
    def compressed(self, recipe: Recipe) -> nn.Module:
        """A copy of the dense model compressed by the real pipeline on `calib`, cast to the compute dtype
        for evaluation (levels 2 and 3 measure this one model)."""
        if self.calib is None:
            raise ValueError("compressing a candidate needs calib windows")
        model = copy.deepcopy(self.model)
        compress(model, recipe, self.calib, device=self.device, compute_dtype=self.compute_dtype)
        cast_for_eval(model, self.compute_dtype)
        return model

    @torch.no_grad()
    def quick(self, recipe: Recipe, batch_size: int = 4, model: nn.Module | None = None) -> float:
        """Level 2: perplexity on `heldout` of the compressed copy (`compressed`, or `model` if given)."""
        if self.heldout is None:
            raise ValueError("quick perplexity needs heldout windows")
        return heldout_perplexity(model if model is not None else self.compressed(recipe), self.heldout, batch_size)


@torch.no_grad()
def heldout_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over `windows` (each predicts its last seqlen-1 tokens), the eval convention."""
    device = next(model.parameters()).device
    nll = sum(float(window_nll(model, windows[s:s + batch_size].to(device)).sum())
              for s in range(0, windows.shape[0], batch_size))
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the tie-averaged ranks (NaN when either side is constant or n < 2)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(list(a)), _ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's ρ: scipy's when installed, else `spearman` (same definition, ties averaged)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return spearman(a, b)
    if len(a) < 2 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)
