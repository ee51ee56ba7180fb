"""The public verb: ``compress(model, recipe, windows) -> Report``.

Example::

    from lmcompose import compress, Recipe
    recipe = Recipe.from_dict({"steps": [{"magnitude": {"sparsity": 0.5}}]})
    report = compress(model, recipe, windows)      # windows: LongTensor [n, seqlen]
    print(report.summary())
"""

from __future__ import annotations

import logging
import platform
import time

import torch
from torch import nn

from .core import dtypes as compute_dtypes
from .core.dtypes import FLOAT_DTYPES
from .core.memory import peak_rss_bytes
from .pipeline.blocks import (
    compressed_modules,
    linear_shapes,
    model_nbytes,
    other_param_bytes,
)
from .pipeline.records import Report
from .pipeline.resume import RunJournal, fingerprint, saved_compute_dtype, unsupported
from .pipeline.sequential import SequentialCompressor
from .recipe import Recipe
from .training.distill import dense_teacher
from .training.recover import recover

log = logging.getLogger(__name__)


def as_recipe(recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    return Recipe.load(recipe)


def _round_other_weights(model: nn.Module, float_dtype: str) -> None:
    """Round every weight that is not compressed to the storage dtype, so the model in memory is
    exactly the model the checkpoint holds (save → load then gives identical logits)."""
    skip = {id(p) for m in compressed_modules(model).values() for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in skip and p.is_floating_point():
            p.data = p.data.to(FLOAT_DTYPES[float_dtype]).to(p.dtype)


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _journal(model, recipe, windows, work_dir, resume, overwrite, model_name, resolved, streamed):
    """The run's `RunJournal` in `work_dir` (None without one, or for a recipe that cannot resume)."""
    if work_dir is None:
        if resume:
            raise ValueError("resume=True needs work_dir (the directory an interrupted run recorded its blocks in)")
        return None
    why = unsupported(recipe.steps, recipe.schedule)
    if why is not None:
        if resume:
            raise ValueError(f"--resume is not supported for {why}; rerun without --resume (and --overwrite)")
        log.info("this run cannot be resumed (%s): no work directory is written", why)
        return None
    from . import __version__
    from .pipeline.blocks import find_blocks

    fp = fingerprint(model, recipe.hash(), windows, model_name=model_name, compute_dtype=resolved,
                     schedule=recipe.schedule, n_blocks=len(find_blocks(model)[1]), streamed=streamed,
                     version=__version__, recover=recipe.recover.model_dump() if recipe.recover.steps else None)
    return RunJournal(work_dir, fp, resume=resume, overwrite=overwrite)


def _check_streamable(recipe: Recipe) -> None:
    """Steps that need the whole model in memory cannot run block by block from disk."""
    whole = [s.name for s in recipe.steps if s.unit == "model" or getattr(s, "needs_prepass", False)]
    if whole:
        raise ValueError(f"step(s) {whole} transform or measure the whole model at once and cannot be streamed "
                         "block by block; run without --stream")
    if recipe.schedule != "layer-major":
        raise ValueError(f"schedule={recipe.schedule!r} cannot be streamed (each step would read every block "
                         "again); allowed with --stream: 'layer-major'")
    if recipe.recover.steps:
        raise ValueError("a recipe with a 'recover' section fine-tunes the whole model at once and cannot be "
                         "streamed; run without --stream")


def compress(model: nn.Module, recipe, windows: torch.Tensor | None, *, device=None, model_name: str = "",
             on_block=None, compute_dtype: str = "auto", work_dir=None, resume: bool = False,
             overwrite_work: bool = False, block_io=None) -> Report:
    """Compress `model` in place with `recipe`, calibrating on `windows` ([n, seqlen] token ids; None for a
    recipe with ``calibration: {source: none}``, whose steps read the weights alone and whose per-Linear
    errors are then measured on the weights, ``‖ΔW‖²/‖W‖²``).

    The recipe is type-checked and costed on the model's shapes before any block is touched. With
    `device` set (e.g. "cuda") and the model elsewhere (e.g. CPU), blocks move to `device` one at a
    time, so device memory holds one block plus the calibration activations. `compute_dtype`
    (``auto``, ``fp32``, ``bf16``, ``fp16``; see `lmcompose.core.dtypes`) is the dtype of the block
    forwards that collect statistics and propagate activations; the weights the techniques read, their
    arithmetic and the statistics themselves stay in full precision. The resolved dtype is recorded in
    the report's environment. A recipe's ``recover`` section then fine-tunes the float factors (or the
    quantization scales) on the same windows (the whole model moves to `device` for it) and its losses
    land in ``report.recovery``; with ``recover.windows`` set, `windows` holds that many rows, the steps
    calibrate on the first ``calibration.n`` and the recovery trains on all of them. With ``recover: {loss:
    kl}`` the dense teacher is taken first, before any step: ``teacher: cached`` runs the dense model over
    the windows now (the whole model on `device`) and keeps its top-k log-probabilities; ``teacher: online``
    keeps a deep copy of the model (a second model in memory until the recovery ends).

    With `work_dir` set (CLI: ``OUT.partial`` beside ``--out``), every final block is recorded there
    (`lmcompose.pipeline.resume`) and ``resume=True`` continues an interrupted run from its last finished
    block, bit-identically; the ``recover`` section also saves its state there every
    ``recover.checkpoint_every`` steps and continues from its last save. An existing work directory
    without `resume` is refused unless `overwrite_work`. Remove it once the model is saved
    (``RunJournal.discard`` / ``shutil.rmtree``).
    `block_io` (``models.stream.StreamedBlocks``) loads each block's weights just before it is visited and
    frees them after: the model's blocks may then start on the meta device.
    """
    compute_dtypes.check(compute_dtype, "compute_dtype")
    recipe = as_recipe(recipe)
    shapes = linear_shapes(model)
    recipe.check(shapes, other_param_bytes(model))
    if recipe.calibration.none:
        if windows is not None:
            raise ValueError("the recipe's calibration.source is none, so windows must be None (no calibration "
                             "forward runs)")
    elif windows is None or windows.dim() != 2:
        got = "None" if windows is None else f"shape {tuple(windows.shape)}"
        raise ValueError(f"windows must be a [n, seqlen] tensor of token ids, got {got} (a recipe of statistic-free "
                         "steps can run without: calibration: {source: none})")
    rec = recipe.recover
    calib = windows
    if rec.windows is not None:  # recovery trains on more windows than the steps calibrate on (needs steps > 0)
        if windows.shape[0] != rec.windows:
            raise ValueError(f"recover.windows={rec.windows}: windows must hold that many rows (the first "
                             f"calibration.n={recipe.calibration.n} calibrate the steps), got {windows.shape[0]}; "
                             "draw them with data.calibration_windows(n=recipe.window_count)")
        calib = windows[:recipe.calibration.n]
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    saved = saved_compute_dtype(work_dir) if resume and work_dir is not None and compute_dtype == "auto" else None
    resolved = saved or compute_dtypes.resolve(compute_dtype, device if device is not None else home,
                                               compute_dtypes.model_dtype(model))
    if block_io is not None:
        _check_streamable(recipe)
        if work_dir is None:
            raise ValueError("a streamed run (block_io) needs work_dir: its finished blocks are kept there until "
                             "the checkpoint is written (models.checkpoint.save_streamed)")
    journal = _journal(model, recipe, windows, work_dir, resume, overwrite_work, model_name, resolved,
                       block_io is not None)
    # a KL recovery needs the dense model's distributions: cached (top-k, now) or a copy of it (online)
    teacher = (dense_teacher(model, windows, rec, resolved, device, recipe.calibration.batch_size)
               if rec.steps and rec.loss == "kl" else None)
    try:
        runner = SequentialCompressor(model, recipe.steps, recipe.float_dtype, device, on_block, resolved,
                                      journal=journal, block_io=block_io)
        runner.run(calib, recipe.calibration.batch_size, recipe.schedule)
        state_file = journal.recover_file if journal is not None else None  # the recovery's checkpoints
        recovery = recover(model, windows, rec, resolved, device, teacher, state_file) if rec.steps else None
    finally:
        if teacher is not None:
            teacher.close()
    _round_other_weights(model, recipe.float_dtype)
    wall = time.perf_counter() - t0
    layers = [runner.records[n] for n in shapes if n in runner.records]
    compressed = [l for l in layers if l.steps]
    return Report(
        model=model_name, recipe=recipe.to_dict(), recipe_hash=recipe.hash(), layers=layers,
        block_seconds=runner.block_seconds, wall_seconds=wall, peak_rss_bytes=peak_rss_bytes(),
        linear_bytes=sum(l.nbytes for l in compressed),
        linear_dense_fp16_bytes=sum(l.dense_fp16_bytes for l in compressed),
        linear_weights=sum(l.shape[0] * l.shape[1] for l in compressed),
        total_bytes=model_nbytes(model, recipe.float_dtype),
        calibration={**recipe.calibration.model_dump(), "windows": None if calib is None else list(calib.shape)},
        environment={**environment(), "compute_dtype": resolved}, recovery=recovery,
        transforms=runner.model_steps)
