"""Every technique registers itself on import; one import line per technique file."""

from .prune import magnitude  # noqa: F401
from .quant import rtn  # noqa: F401
from .prune import wanda  # noqa: F401
from .prune import sparsegpt  # noqa: F401
from .quant import gptq  # noqa: F401
from .lowrank import svd  # noqa: F401
from .lowrank import asvd  # noqa: F401
from .lowrank import svdllm  # noqa: F401
from .joint import qer  # noqa: F401
from .joint import sslc  # noqa: F401
from .joint import dam  # noqa: F401
