"""The search objective at three levels of cost: proxy, quick perplexity, full protocol.

* **Level 1, the proxy.** Every targeted Linear is compressed independently from the dense model's cached
  statistics (`lmcompose.pipeline.dense_stats.DenseStats`, through `lmcompose.techniques.apply.apply_steps`);
  the score is the parameter-weighted mean relative output error (``core.stats.relative_error``).
* **Level 1b, "independent" perplexity** (`Evaluator.independent`, the default level): the proxy's
  Linears in a copy of the dense model, scored by held-out perplexity, which sees how the layers' errors
  add up through the network (the proxy misranks across chains). A recipe whose steps only the pipeline
  runs (`Recipe.needs_pipeline`: rotate, awq, reconstruct, recover) is compressed by the pipeline
  instead, and scored by the same held-out perplexity, so the two kinds of candidates compare.
* **Level 2, quick perplexity**: the real sequential pipeline on a copy, then held-out perplexity.
* **Level 3, the full protocol**, only for finalists, on the copy level 2 compressed.

`rank_correlation` reports how well a cheaper level ranks the candidates measured at a dearer one.

Method notes: docs/methods/search.md (what each level sees and misses, and the measurements)

Example::

    stats = DenseStats.load_or_compute(model, windows, cache_dir="runs/search/cache")
    ev = Evaluator(model, stats, calib=windows, heldout=heldout)
    ev.proxy(recipe).value, ev.quick(recipe)
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import compress
from ..core.dtypes import cast_for_eval
from ..eval.perplexity import window_nll
from ..pipeline.dense_stats import DenseStats
from ..recipe import Recipe
from ..runtime.linear import CompressedLinear
from ..techniques.apply import apply_steps

log = logging.getLogger(__name__)


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
        compute_dtype: dtype of the forwards of `quick` (`lmcompose.core.dtypes`; auto = bf16 where faster).
    """

    def __init__(self, model: nn.Module, stats: DenseStats, calib: torch.Tensor | None = None,
                 heldout: torch.Tensor | None = None, device=None, compute_dtype: str = "auto"):
        self.model, self.stats, self.calib, self.heldout = model, stats, calib, heldout
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def proxy(self, recipe: Recipe, keep_layers: bool = False) -> ProxyResult:
        """Level 1: every Linear compressed independently from the dense statistics (module docstring);
        `keep_layers` keeps the compressed Linears in the result. A recipe that needs the pipeline
        (`Recipe.needs_pipeline`: rotate, awq, reconstruct, recover) has no proxy score: ValueError."""
        if recipe.needs_pipeline:
            raise ValueError(f"recipe {recipe.hash()} has steps only the sequential pipeline runs "
                             f"({', '.join(s.name for s in recipe.steps if s.unit != 'linear') or 'recover'}): "
                             "score it at the independent or quick level, not the proxy")
        steps = list(recipe.steps)
        # step index -> {linear name: copy} for steps that allocate across Linears, as the pipeline's prepass
        allocated = {j: step.allocate(self.stats.allocation_input(step, self.model, self.device),
                                      float_dtype=recipe.float_dtype)
                     for j, step in enumerate(steps) if step.needs_prepass}
        errors, weights, nbytes, fp16, layers = {}, {}, 0, 0, {}
        for b, names in enumerate(self.stats.blocks):
            for name in names:
                hits = [allocated.get(j, {}).get(name, s) for j, s in enumerate(steps) if s.targets(name)]
                if not hits:
                    continue
                dense = self.model.get_submodule(name)
                layer = CompressedLinear.from_linear(dense, recipe.float_dtype).to(self.device)
                layer, results = apply_steps(layer, hits, self.stats[name].to(self.device), name)
                errors[name] = results[-1].rel_error
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
