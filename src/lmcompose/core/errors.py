"""The errors lmcompose raises on purpose. Each names what is wrong and what is allowed.

* `IllegalStep`: a recipe step that cannot apply to what the steps before it produced (raised while a
  recipe is checked, before any weights load);
* `InvariantError`: a step broke what an earlier step guaranteed (a mask, codes, the planned bytes);
  raised by the pipeline's invariant check on the layer and step at fault.
"""

from __future__ import annotations


class IllegalStep(ValueError):
    """A recipe step that cannot apply to what the previous steps produced."""


class InvariantError(RuntimeError):
    """A step broke what an earlier step guaranteed, or stored other than it planned."""
