"""lmcompose: compose pruning, low-rank factorization and quantization of causal LMs.

Importing the package has no side effects: no torch flags, no global seeding, no printing.
"""

__version__ = "0.1.0"

from .api import compress  # noqa: E402
from .pipeline.records import Report  # noqa: E402
from .recipe import Recipe  # noqa: E402

__all__ = ["Recipe", "Report", "compress", "__version__"]
