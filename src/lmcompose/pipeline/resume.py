"""Resuming an interrupted run: the work directory the sequential loop writes as blocks finish.

A run into ``OUT`` keeps a work directory ``OUT.partial/`` beside it while it runs (`work_dir_for`). When
block i is final (layer-major schedule: every step has run on it), the loop writes, each file atomically
(temporary name, then rename):

* ``block-0000i.safetensors``: every tensor of the block as it is in memory (the compressed Linears'
  stored tensors, the norms and any Linear left dense), with, in the file's metadata, each compressed
  Linear's structure, the block's `LayerRecord` s and its seconds;
* ``hidden-0000i.safetensors``: the hidden states entering block i+1 (and, for block steps that fit the
  dense block's outputs, the dense stream's too); the previous block's file is then removed;
* ``journal.json`` last, saying that i+1 blocks are done, and fingerprinting the run (`fingerprint`:
  lmcompose version, recipe hash, model name, config, a hash of the input embedding, weights and compute
  dtypes, the calibration windows, the schedule, the number of blocks and, for a recipe with a ``recover``
  section, each of its settings as ``recover.<field>``, so a refusal names the setting that differs).

A killed run therefore leaves at most one block's work undone. ``resume=True`` (CLI ``--resume``)
redoes what is cheap and deterministic (model-level steps such as a rotation, the capture of block 0's
inputs), restores the finished blocks and their records from their files, takes the saved hidden states
and continues with the next block: the tensors saved at the end are bit-identical to those of an
uninterrupted run. A fingerprint that differs is refused, naming the fields. Without ``resume``, an
existing work directory is refused (suggesting ``--resume``), unless ``overwrite`` discards it. The
caller removes the work directory once the checkpoint is saved (`discard`).

Not resumable (refused by name with ``resume=True``; run without a work directory otherwise): the
``step-major`` schedule, and steps that allocate a budget across Linears from a dense pre-pass over the
whole model (``needs_prepass``).

A recipe's ``recover`` section, which runs once every block is final, saves its state to
``recover.safetensors`` (`RunJournal.recover_file`) every ``recover.checkpoint_every`` steps and after its
last (`lmcompose.training.recover`: trained tensors, AdamW moments, step, losses so far); a resumed run
restores the blocks and continues the recovery from the step saved there, bit-identically.

Example::

    journal = RunJournal(work_dir_for("runs/x"), fingerprint(model, recipe, windows, ...), resume=True)
    SequentialCompressor(model, steps, journal=journal).run(windows, batch_size)
    ...save the checkpoint...; journal.discard()
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..core.io import atomic_file, tensor_sha256, write_json_atomically
from ..runtime.linear import CompressedLinear
from .blocks import set_module
from .records import LayerRecord

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
JOURNAL_FORMAT = 1
WORK_SUFFIX = ".partial"
_META_KEY = "lmcompose-journal"
RECOVER_FILE = "recover.safetensors"


def work_dir_for(out_dir: str | Path) -> Path:
    """The work directory of a run into `out_dir`: ``OUT.partial`` beside it."""
    out = Path(out_dir).expanduser()
    return out.with_name(out.name + WORK_SUFFIX)


def fingerprint(model, recipe_hash: str, windows: torch.Tensor | None, *, model_name: str, compute_dtype: str,
                schedule: str, n_blocks: int, streamed: bool = False, version: str = "",
                recover: dict | None = None) -> dict:
    """What must be equal for a saved block to be the block this run would compute. The weights are
    represented by the input embedding's hash (hashing every weight of a 7B model would cost a minute).
    `recover`, the recipe's recovery settings (None without one), adds one ``recover.<field>`` entry each:
    the recipe hash covers them too, but only these name the setting a refusal is about."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    embedding = model.get_input_embeddings().weight
    return {"lmcompose": version, "recipe_hash": recipe_hash, "model": model_name, "config_sha256": config_hash,
            "embedding_sha256": tensor_sha256(embedding) if embedding.device.type != "meta" else None,
            "weights_dtype": str(embedding.dtype).removeprefix("torch."), "compute_dtype": compute_dtype,
            "windows_sha256": None if windows is None else tensor_sha256(windows),
            "windows_shape": None if windows is None else list(windows.shape), "schedule": schedule,
            "blocks": n_blocks, "streamed": streamed, **{f"recover.{k}": v for k, v in (recover or {}).items()}}


def unsupported(steps, schedule: str) -> str | None:
    """Why a run of `steps` cannot be resumed (None: it can)."""
    if schedule != "layer-major":
        return f"schedule {schedule!r} (only 'layer-major' runs can be resumed)"
    needing = [s.name for s in steps if getattr(s, "needs_prepass", False)]
    if needing:
        return (f"step(s) {needing}, which allocate their budget from a dense pre-pass over the whole model "
                "(not saved in the work directory)")
    return None


def block_file(work_dir: str | Path, index: int) -> Path:
    return Path(work_dir) / f"block-{index:05d}.safetensors"


def read_block(work_dir: str | Path, index: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of final block `index` in `work_dir`: the metadata holds ``layers`` (each
    compressed Linear's structure and compute dtype), ``records`` and ``seconds``."""
    path = block_file(work_dir, index)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        return meta, load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a damaged or missing file: say which, and how to start over
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); pass --overwrite (without "
                         "--resume) to start over") from None


def _journal(path: Path) -> dict | None:
    try:
        data = json.loads((path / JOURNAL_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / JOURNAL_FILE} cannot be read ({err}); remove {str(path)!r} (or pass "
                         "--overwrite) to start over") from None
    if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT or not isinstance(data.get("done"), int):
        raise ValueError(f"{path / JOURNAL_FILE} is not a journal this lmcompose writes (format {JOURNAL_FORMAT}); "
                         f"remove {str(path)!r} (or pass --overwrite) to start over")
    return data


def saved_compute_dtype(path: str | Path) -> str | None:
    """The compute dtype an interrupted run in work directory `path` resolved (None without a journal). A
    resumed ``auto`` run takes it: ``auto`` is measured per process (`core.dtypes.bf16_speedup`), and a
    busier machine may measure the other dtype, which would make the saved blocks unusable."""
    data = _journal(Path(path)) if Path(path).is_dir() else None
    return (data or {}).get("fingerprint", {}).get("compute_dtype")


def check_work_dir(path: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is loaded, an interrupted run's work directory that this run would ignore:
    without `resume` it is refused unless `overwrite` (which discards it when the run starts)."""
    path = Path(path)
    if resume or overwrite or not path.exists():
        return
    data = _journal(path) if path.is_dir() else None
    done = f"{data['done']} of {data['fingerprint'].get('blocks')} blocks done" if data else "no block done"
    raise ValueError(f"{str(path)!r} holds an interrupted run into the same output ({done}); continue it with "
                     "--resume (API: resume=True), or pass --overwrite to discard it and start over")


class RunJournal:
    """The work directory of one run (see the module docstring). Created per run; `done` is the number of
    blocks already final (0 for a fresh run)."""

    def __init__(self, path: str | Path, fingerprint: dict, *, resume: bool = False, overwrite: bool = False):
        self.path, self.fingerprint = Path(path), fingerprint
        if self.path.exists() and not resume:
            check_work_dir(self.path, resume, overwrite)
            shutil.rmtree(self.path)
        data = _journal(self.path) if self.path.is_dir() else None
        if data is None:
            if resume:
                log.info("no interrupted run in %s: starting from the first block", self.path)
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self.done = 0
            self._write_journal()
            return
        saved = data.get("fingerprint", {})
        differs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in fingerprint.items() if saved.get(k) != v]
        if differs:
            raise ValueError(f"--resume: the interrupted run in {str(self.path)!r} was made with other settings ("
                             + "; ".join(differs) + "); rerun with those settings, or pass --overwrite (without "
                             "--resume) to start over")
        self.done = data["done"]
        log.info("resuming %s: %d of %d blocks done", self.path, self.done, fingerprint.get("blocks"))

    def _write_journal(self) -> None:
        write_json_atomically(self.path / JOURNAL_FILE, {"format": JOURNAL_FORMAT, "done": self.done,
                                                         "fingerprint": self.fingerprint})

    def block_file(self, index: int) -> Path:
        return block_file(self.path, index)

    @property
    def recover_file(self) -> Path:
        """Where the recovery saves its state (`lmcompose.training.recover`); written once every block is final."""
        return self.path / RECOVER_FILE

    def _hidden_file(self, index: int) -> Path:
        return self.path / f"hidden-{index:05d}.safetensors"

    # -- writing ---------------------------------------------------------------------------------------
    def block_done(self, index: int, block, prefix: str, records: dict[str, LayerRecord], seconds: float,
                   hidden: list[torch.Tensor], dense: list[torch.Tensor] | None) -> None:
        """Record block `index` (full name `prefix`) as final: its tensors, records and the hidden states
        entering the next block. Each file is written atomically, the journal last."""
        tensors, layers = {}, {}
        for name, module in block.named_modules():
            if isinstance(module, CompressedLinear):
                full = f"{prefix}.{name}"
                tensors.update(module.state(full))
                layers[full] = {**module.meta(), "compute_dtype": str(module._probe.dtype).removeprefix("torch.")}
        skip = tuple(f"{n}." for n in layers)
        for name, t in block.state_dict().items():
            full = f"{prefix}.{name}"
            if not full.startswith(skip):
                tensors[full] = t.detach().cpu().clone().contiguous()  # clone: no tensor shared between keys
        mine = {n: r.to_dict() for n, r in records.items() if n.startswith(f"{prefix}.")}
        meta = json.dumps({"layers": layers, "records": mine, "seconds": seconds}, default=str)
        with atomic_file(self.block_file(index)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", _META_KEY: meta})
        states = {f"hidden.{b}": h.detach().cpu().contiguous() for b, h in enumerate(hidden)}
        states.update({f"dense.{b}": h.detach().cpu().contiguous() for b, h in enumerate(dense or [])})
        with atomic_file(self._hidden_file(index)) as tmp:
            save_file(states, str(tmp))
        self.done = index + 1
        self._write_journal()
        if index > 0:
            self._hidden_file(index - 1).unlink(missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------------
    def restore_block(self, index: int, model, block, prefix: str) -> tuple[dict[str, LayerRecord], float]:
        """Put block `index`'s saved tensors back into `model`; returns its records and seconds."""
        path = self.block_file(index)
        meta, state = read_block(self.path, index)
        device = next((t.device for t in block.parameters()), torch.device("cpu"))
        for name, layer_meta in meta["layers"].items():
            dtype = getattr(torch, layer_meta["compute_dtype"])
            layer = CompressedLinear.from_state(name, layer_meta, state, dtype)
            set_module(model, name, layer.to(device) if device.type != "meta" else layer)
        skip = tuple(f"{n}." for n in meta["layers"])
        rest = {k[len(prefix) + 1:]: v for k, v in state.items() if not k.startswith(skip)}
        on_meta = any(p.device.type == "meta" for p in block.parameters())
        missing, unexpected = block.load_state_dict(rest, strict=False, assign=on_meta)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit block {index} (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}); pass --overwrite (without --resume) to start over")
        records = {}
        for name, d in meta["records"].items():
            records[name] = LayerRecord(name, tuple(d["shape"]), d["steps"], d["nbytes"], d["dense_fp16_bytes"],
                                        d["structure"], d["skipped"])
        return records, float(meta.get("seconds", 0.0))

    def hidden(self, device) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The hidden states entering block `done` (and the dense stream's, or None)."""
        state = load_file(str(self._hidden_file(self.done - 1)))
        n = sum(1 for k in state if k.startswith("hidden."))
        dense = [state[f"dense.{b}"].to(device) for b in range(n)] if "dense.0" in state else None
        return [state[f"hidden.{b}"].to(device) for b in range(n)], dense

    def discard(self) -> None:
        """Remove the work directory (the checkpoint it served is saved)."""
        shutil.rmtree(self.path, ignore_errors=True)
