"""Recovery: fine-tune the float factors (or the quantization scales) of a compressed model, everything else frozen.

SSLC's optional recovery (METHODS §2.3 step 7: "train U', V' with S frozen, mask fixed"), SVD-LLM's
parameter update and EfficientQAT's E2E-QP, read as one pass over the whole model after the sequential
pass, on the calibration windows. What trains (``train``, '+'-joined): ``lowrank``, the float low-rank
factors; ``sparse``, the float sparse values inside their masks; ``scales``, the scales of every quantized
tensor (codes, zero points and perms fixed). AdamW on fp32 master copies; masks, codes and the byte count
do not change (checked). The loss (``loss``) is the causal-LM loss, or ``kl``: the KL from the dense
model's next-token distribution (a cached top-k or an online teacher: `training.distill`). The last
``heldout`` calibration windows are left out of training and report a held-out loss before and after.

Checkpoints (``checkpoint_every``): given a `state_file` (`api.compress` passes ``recover.safetensors`` in
the run's work directory, `pipeline.resume`), every ``checkpoint_every`` steps and after the last one the
loop writes, atomically, one safetensors file: every trained fp32 tensor, the AdamW state of each (step,
both moments), the global torch RNG states (dropout draws from them, where a model has any); its JSON
metadata holds the step, the loss of every step so far, the losses measured before training, the seconds
spent and what must match to continue (the settings, the compute dtype, a hash of the windows). No other
state exists: the windows of step s are a function of s (`_rows`). A recovery that finds the file
continues after its step and ends with tensors and losses bit-identical to an uninterrupted run's; its
record differs only in ``seconds`` (the saved run's seconds up to its checkpoint plus this run's) and in
``resumed_from_step``, present only then. Each save costs 12 bytes per trained number of disk (the file is
rewritten) and of host memory while it is written. Bit-identity needs deterministic steps: on CPU they
are; on CUDA the scales' gradient (``index_add_``) uses atomic adds, so there even two uninterrupted runs
may differ in their last bits.

Memory, on one device: the whole model (frozen weights in the compute dtype; a scale-trained tensor keeps
its uint8 codes and rebuilds its weight each forward); 16 bytes per trained number (fp32 value, gradient,
two Adam moments); one batch's activations; with ``loss: kl`` the teacher (`training.distill`: a cached
one holds one batch of top-k targets on the device, an online one a second model) and at most two
``[batch · CHUNK, vocab]`` fp32 logit chunks at a time.

Method notes: docs/methods/recover.md

Example::

    recover: {steps: 200, lr: 1.0e-4, batch_size: 1, train: lowrank}
    recover: {steps: 64, lr: 2.0e-5, train: scales, loss: kl, top_k: 64, heldout: 4}   # E2E-QP with KD
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..algebra.quant import QTensor
from ..algebra.terms import as_float, materialize
from ..core import dtypes as compute
from ..core.dtypes import FLOAT_DTYPES, dtype_name
from ..core.io import atomic_file, tensor_sha256
from ..pipeline.blocks import compressed_modules
from ..recipe import Recovery
from ..runtime.linear import CompressedLinear
from .distill import ChunkedLogits, chunked_kl

log = logging.getLogger(__name__)

STATE_FORMAT = 1
_STATE_KEY = "lmcompose-recover"


def _float(t) -> bool:
    return not isinstance(t, QTensor)


class _Dequantize(torch.autograd.Function):
    """``W = scale[:, g] · (codes − zero[:, g])`` with a gradient for the scale only. The backward
    recomputes ``codes − zero`` from the uint8 codes, so a step keeps 1 byte per weight, not an fp32 copy."""

    @staticmethod
    def forward(ctx, scale, codes, zero, gidx):
        ctx.save_for_backward(codes, zero, gidx)
        ctx.groups = scale.shape[1]
        return scale[:, gidx] * _centered(codes, zero, gidx)

    @staticmethod
    def backward(ctx, grad):
        codes, zero, gidx = ctx.saved_tensors
        per_weight = grad * _centered(codes, zero, gidx)
        out = torch.zeros(codes.shape[0], ctx.groups, dtype=per_weight.dtype, device=per_weight.device)
        return out.index_add_(1, gidx, per_weight), None, None, None


def _centered(codes: torch.Tensor, zero: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
    """``codes − zero`` in fp32 (small integers, exact); `zero` is ``[rows, groups]``, or ``[1, 1]`` (symmetric)."""
    return codes.float() - (zero.float() if zero.shape[1] == 1 else zero.float()[:, gidx])


class _Scales:
    """A quantized tensor whose scales train (fp32 master copy); its codes, zero points and perm stay as they are."""

    def __init__(self, q: QTensor):
        self.q = q
        self.scale = nn.Parameter(q.scale.detach().float())
        self.gidx = q.group_index()
        mid = torch.full((1, 1), (q.spec.maxq + 1) / 2, device=q.codes.device)
        self.zero = mid if q.zero is None else q.zero

    def weight(self) -> torch.Tensor:
        return _Dequantize.apply(self.scale, self.q.codes, self.zero, self.gidx)

    def stored(self) -> QTensor:
        """The quantized tensor with the trained scales, rounded to its scale dtype."""
        return QTensor(self.q.codes, self.scale.detach(), self.q.zero, self.q.spec, self.q.perm)


class _Trainable:
    """One CompressedLinear during recovery: its frozen terms summed once, its trained ones rebuilt every
    forward from Parameters (float slots) and `_Scales` (quantized slots whose scales train).

    A term's float slots train when `cfg` lists its kind and every other slot of it is float or has its
    scales trained; with ``scales``, every quantized slot trains its scales."""

    def __init__(self, module: CompressedLinear, cfg: Recovery, dtype: torch.dtype):
        self.module = module
        self.index, self.params, frozen = [], [], []
        for i, term in enumerate(module.terms):
            slots = term.slots()
            floats = cfg.trains(term.kind) and (cfg.scales or all(_float(v) for v in slots.values()))
            params = {k: nn.Parameter(v.detach().float()) if _float(v) else _Scales(v) for k, v in slots.items()
                      if (floats and _float(v)) or (cfg.scales and not _float(v))}
            if params:
                self.index.append(i)
                self.params.append(params)
            else:
                frozen.append(term)
        # the frozen part, summed once and held in the compute dtype (what autocast would cast it to)
        self.frozen = torch.stack([t.weight(torch.float32) for t in frozen]).sum(0).to(dtype) if frozen else None
        self.bias = None if module.bias_value is None else module.bias_value.float()

    def named_parameters(self, prefix: str) -> list[tuple[str, nn.Parameter]]:
        """The trained Parameters, named ``<prefix>.<term index>.<slot>`` (a trained scale: ``….<slot>.scale``)."""
        return [(f"{prefix}.{i}.{k}.scale", p.scale) if isinstance(p, _Scales) else (f"{prefix}.{i}.{k}", p)
                for i, d in zip(self.index, self.params) for k, p in d.items()]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters("")]

    def counts(self) -> dict[str, int]:
        """Trained numbers per kind: float values (a sparse term's: inside its mask), scales."""
        out = {"lowrank": 0, "sparse": 0, "dense": 0, "scales": 0}
        for i, d in zip(self.index, self.params):
            term = self.module.terms[i]
            for p in d.values():
                if isinstance(p, _Scales):
                    out["scales"] += p.scale.numel()
                else:
                    out[term.kind] += int(term.mask.sum()) if term.kind == "sparse" else p.numel()
        return out

    def _slot(self, term, params: dict, key: str) -> torch.Tensor:
        p = params.get(key)
        if p is None:
            return materialize(term.slots()[key])
        return p.weight() if isinstance(p, _Scales) else p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module.input_ops:
            x = self.module.transform_input(x)
        y = F.linear(x, self.frozen, self.bias) if self.frozen is not None else (
            0 if self.bias is None else self.bias)
        for i, p in zip(self.index, self.params):
            term = self.module.terms[i]
            if term.kind == "lowrank":
                u, v = self._slot(term, p, "u"), self._slot(term, p, "v")
                v = v if term.d is None else term.d.float().unsqueeze(1) * v
                y = y + F.linear(F.linear(x, v), u)
            elif term.kind == "sparse":
                y = y + F.linear(x, self._slot(term, p, "values") * term.mask.float())
            else:
                y = y + F.linear(x, self._slot(term, p, "a"))
        return y

    def write_back(self) -> None:
        terms = list(self.module.terms)
        for i, p in zip(self.index, self.params):
            term = terms[i]
            new = {k: v.stored() if isinstance(v, _Scales) else
                   as_float(v.detach() * (term.mask if k == "values" else 1), dtype_name(term.slots()[k].dtype))
                   for k, v in p.items()}
            terms[i] = term.replace(**new)
        self.module.terms = tuple(terms)
        self.module._cache = None


def _rows(step: int, batch_size: int, n: int) -> torch.Tensor:
    """The training windows of step `step`: consecutive batches of the `n` training windows, wrapping
    around. A function of the step alone, so a resumed recovery needs no saved data order."""
    return torch.arange(step * batch_size, (step + 1) * batch_size) % n


def _settings(cfg: Recovery, compute_dtype: str) -> dict:
    """What a saved state must have been trained with to be continued (not ``checkpoint_every``: it only
    says when states are saved)."""
    return {**{f"recover.{k}": v for k, v in cfg.model_dump(exclude={"checkpoint_every"}).items()},
            "compute_dtype": compute_dtype}


def _save_state(path: Path, step: int, named, opt: torch.optim.Optimizer, device: torch.device, meta: dict) -> None:
    """Write the recovery's state after `step` steps to `path` in one atomic rename (see the module
    docstring): tensors ``param.<name>``, ``adam.<name>.<key>``, ``rng.cpu`` (and ``rng.cuda``), and `meta`."""
    t0 = time.perf_counter()
    names = [n for n, _ in named]
    tensors = {f"param.{n}": p.detach().to("cpu", copy=True).contiguous() for n, p in named}
    for i, entry in opt.state_dict()["state"].items():
        for key, v in entry.items():  # AdamW: step (a 0-d tensor), exp_avg, exp_avg_sq
            tensors[f"adam.{names[i]}.{key}"] = torch.as_tensor(v).detach().to("cpu", copy=True).contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    text = json.dumps({"format": STATE_FORMAT, "step": step, **meta})
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", _STATE_KEY: text})
    log.debug("recovery state after step %d written to %s in %.2f s", step, path, time.perf_counter() - t0)


def _load_state(path: Path, named, opt: torch.optim.Optimizer, device: torch.device, settings: dict,
                windows_sha256: str) -> dict:
    """Put the state saved in `path` into the trained Parameters, `opt` and the torch RNGs; returns its
    metadata. A state of other settings, windows or trained tensors is refused, naming what differs."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_STATE_KEY])
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged file: say which, and how to start over
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); pass --overwrite (without "
                         "--resume) to start over") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a recovery state this lmcompose writes (format {STATE_FORMAT}); pass "
                         "--overwrite (without --resume) to start over")
    saved = meta.get("settings", {})
    differs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if meta.get("windows_sha256") != windows_sha256:
        differs.append("the calibration windows")
    shapes = {n: tuple(p.shape) for n, p in named}
    if {k[6:]: tuple(t.shape) for k, t in tensors.items() if k.startswith("param.")} != shapes:
        differs.append("the trained tensors (names or shapes)")
    if differs:
        raise ValueError(f"{path} holds a recovery made with other settings (" + "; ".join(differs) + "); "
                         "rerun with those settings, or pass --overwrite (without --resume) to start over")
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"])
    index = {n: i for i, (n, _) in enumerate(named)}
    state = {}
    for key, t in tensors.items():
        if key.startswith("adam."):
            name, part = key[5:].rsplit(".", 1)
            state.setdefault(index[name], {})[part] = t
    # the hyperparameters are the ones `opt` was built with (equal: the settings matched); only the state loads
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return meta


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def recover(model: nn.Module, windows: torch.Tensor, cfg: Recovery, compute_dtype: str = "fp32",
            device=None, teacher=None, state_file=None) -> dict:
    """Fine-tune `model`'s compressed Linears in place (see the module docstring).

    `windows` are the calibration windows; the last ``cfg.heldout`` of them are not trained on. With
    ``cfg.loss == "kl"``, `teacher` is the dense model's (`training.distill.dense_teacher`, built before
    compressing). Returns a record: the mean LM loss of the first (up to) 8 training windows before and
    after (`loss_before`, `loss_after`: a check that training worked, not an evaluation), with a KL loss
    also their mean KL to the teacher (`kl_before`, `kl_after`); with held-out windows the same on them
    (`heldout_loss_*`, `heldout_kl_*`: an evaluation, on windows the steps calibrated on but recovery never
    trained on); the mean training loss over the first and the last tenth of the steps (different windows,
    so noisy); which windows trained and which were held out; what trained and the seconds taken.

    With `state_file` (a path), the state is saved there every ``cfg.checkpoint_every`` steps and after the
    last; if the file exists, the recovery continues from the step it holds (see the module docstring)."""
    n = windows.shape[0]
    if cfg.heldout >= n:
        raise ValueError(f"recover.heldout={cfg.heldout} leaves none of the {n} calibration windows to train on")
    kl = cfg.loss == "kl"
    if kl and teacher is None:
        raise ValueError("recover.loss='kl' needs the dense teacher, built before compressing: "
                         "training.distill.dense_teacher(model, windows, cfg) (api.compress builds it)")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.to(device)
    modules = compressed_modules(model)
    specs = {n: m.spec() for n, m in modules.items()}
    layers = {n: _Trainable(m, cfg, FLOAT_DTYPES[compute_dtype]) for n, m in modules.items()}
    layers = {n: t for n, t in layers.items() if t.params}
    if not layers:
        raise ValueError(f"recover.train={cfg.train!r}: no compressed Linear has a tensor to train")
    named = [(pn, p) for name, t in layers.items() for pn, p in t.named_parameters(name)]
    counts = {k: sum(t.counts()[k] for t in layers.values()) for k in ("lowrank", "sparse", "dense", "scales")}
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses, record, t0, start = [], {}, time.perf_counter(), 0
    state_file = Path(state_file) if state_file is not None else None
    settings, windows_sha256 = _settings(cfg, compute_dtype), tensor_sha256(windows)
    if state_file is not None and state_file.exists():
        saved = _load_state(state_file, named, opt, device, settings, windows_sha256)
        start, losses, record = saved["step"], saved["losses"], saved["record"]
        t0 -= saved["seconds"]
        log.info("recovery: continuing from step %d of %d (%s)", start, cfg.steps, state_file)
    was_training = model.training
    trained_n = n - cfg.heldout
    probe = torch.arange(min(8, trained_n))  # the same windows before and after
    heldout = torch.arange(trained_n, n)
    student = ChunkedLogits(model, compute_dtype, windows[:1].to(device)) if kl else None

    @torch.no_grad()
    def lm_loss(rows: torch.Tensor) -> float:
        with compute.autocast(compute_dtype, device):
            return sum(float(model(input_ids=x, labels=x, use_cache=False).loss)
                       for x in (windows[i:i + 1].to(device) for i in rows)) / len(rows)

    @torch.no_grad()
    def kl_loss(rows: torch.Tensor) -> float:
        return sum(chunked_kl(student, x, teacher.batch(rows[j:j + 1], x))
                   for j, x in enumerate(windows[i:i + 1].to(device) for i in rows)) / len(rows)

    def measure(when: str) -> None:
        for name, rows in (("", probe), ("heldout_", heldout)):
            if len(rows):
                record[f"{name}loss_{when}"] = lm_loss(rows)
                if kl:
                    record[f"{name}kl_{when}"] = kl_loss(rows)

    try:
        for t in layers.values():
            t.module.forward = t.forward
        with _frozen(model), (teacher.on(device, compute_dtype) if kl else contextlib.nullcontext()):
            model.eval()
            if not start:  # a resumed recovery has the losses measured before its first step saved
                measure("before")
            model.train()
            for step in range(start, cfg.steps):
                rows = _rows(step, cfg.batch_size, trained_n)
                batch = windows[rows].to(device)
                opt.zero_grad(set_to_none=True)
                if kl:
                    loss = chunked_kl(student, batch, teacher.batch(rows, batch), backward=True)
                else:
                    with compute.autocast(compute_dtype, device):
                        lm = model(input_ids=batch, labels=batch, use_cache=False).loss
                    lm.backward()
                    loss = float(lm.detach())
                opt.step()
                losses.append(loss)
                done = step + 1
                if state_file is not None and cfg.checkpoint_every and (
                        done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    _save_state(state_file, done, named, opt, device, {
                        "settings": settings, "windows_sha256": windows_sha256, "losses": losses,
                        "record": record, "seconds": time.perf_counter() - t0})
            model.eval()
            measure("after")
    finally:
        for t in layers.values():
            del t.module.forward  # back to the class's forward
        model.train(was_training)
    for name, t in layers.items():
        t.write_back()
        if t.module.spec() != specs[name]:
            raise RuntimeError(f"recovery changed the structure of {name}: {specs[name].describe()} -> "
                               f"{t.module.spec().describe()}")
    model.to(home)
    tenth = max(1, len(losses) // 10)
    # no teacher without a KL; when states are saved is no setting of the result
    report = cfg.model_dump(exclude={"checkpoint_every"} | (set() if kl else {"teacher", "top_k"}))
    resumed = {"resumed_from_step": start} if start else {}
    return {**report, "trained_linears": len(layers), "trained_parameters": sum(counts.values()),
            "trained": {k: v for k, v in counts.items() if v}, **record, "probe_windows": len(probe),
            "train_windows": [0, trained_n], "heldout_windows": [trained_n, n] if cfg.heldout else None,
            "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            **(teacher.describe() if kl else {}), "seconds": round(time.perf_counter() - t0, 2), **resumed}
