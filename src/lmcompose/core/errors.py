"""The errors lmcompose raises on purpose. Each names what is wrong and what is allowed.

* `IllegalStep`: a recipe step that cannot apply to what the steps before it produced (raised while a
  recipe is checked, before any weights load);
* `RecipeError`: a recipe, search space or other settings file that cannot be read (malformed YAML or
  JSON, a duplicate key, too large, nested too deep, aliases that expand too far; `core.yamlsafe`);
* `InvariantError`: a step broke what an earlier step guaranteed (a mask, codes, the planned bytes);
  raised by the pipeline's invariant check on the layer and step at fault;
* `CheckpointError`: a run directory (or a cached model) whose files are damaged, missing, or disagree
  with each other; the message names the file, and the layer and metadata field where there is one.
  `CheckpointFileMissing` is the one raised for a missing file (also a `FileNotFoundError`).
"""

from __future__ import annotations


class IllegalStep(ValueError):
    """A recipe step that cannot apply to what the previous steps produced."""


class RecipeError(ValueError):
    """A recipe or settings file that cannot be read (syntax, duplicate keys, size, depth, aliases)."""


class InvariantError(RuntimeError):
    """A step broke what an earlier step guaranteed, or stored other than it planned."""


class CheckpointError(ValueError):
    """A damaged or inconsistent run directory. ``str(err)`` reads ``FILE: layer L: field F: what``
    (layer and field where known); the parts are kept as `file`, `layer` and `field`."""

    def __init__(self, what: str, *, file: str | None = None, layer: str | None = None, field: str | None = None):
        self.what, self.file, self.layer, self.field = what, file, layer, field
        where = [file] if file else []
        if layer:
            where.append(f"layer {layer}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, what]))


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file a run directory needs is absent (``except FileNotFoundError`` catches it too)."""
