"""Every technique registers itself on import; one import line per technique file."""

from .prune import magnitude  # noqa: F401
from .quant import rtn  # noqa: F401
