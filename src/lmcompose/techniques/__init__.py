"""Every technique registers itself on import; one import line per technique file.

Look them up with `lmcompose.techniques.registry` (``get_technique("gptq")``)."""

from .joint import (
    dam,  # noqa: F401
    qer,  # noqa: F401
    sslc,  # noqa: F401
)
from .lowrank import (
    asvd,  # noqa: F401
    svd,  # noqa: F401
    svdllm,  # noqa: F401
)
from .prune import (
    magnitude,  # noqa: F401
    sparsegpt,  # noqa: F401
    wanda,  # noqa: F401
)
from .quant import (
    awq,  # noqa: F401
    gptq,  # noqa: F401
    rtn,  # noqa: F401
)
from .train import reconstruct  # noqa: F401
from .transform import rotate  # noqa: F401
from .registry import describe_techniques, get_technique, registry  # noqa: E402,F401
