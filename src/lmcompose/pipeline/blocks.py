"""Finding decoder blocks and their Linears structurally, never by model family, and counting what a
model stores.

The blocks are the entries of the ``nn.ModuleList`` whose children are instances of the classes named
in ``model._no_split_modules`` (the same signal accelerate uses for device maps). A model without that
attribute falls back to the longest ModuleList of identical non-Linear modules.
"""

from __future__ import annotations

from torch import nn

from ..core.dtypes import FLOAT_BYTES
from ..runtime.linear import CompressedLinear
from ..runtime.model_ops import replace_module


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder blocks."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    best = None
    for qual, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c).__name__ for c in mod}
        if len(kinds) != 1 or isinstance(mod[0], nn.Linear):
            continue
        hit = kinds <= names if names else True
        score = (hit, len(mod))
        if best is None or score > best[0]:
            best = (score, qual, mod)
    if best is None or (names and not best[0][0]):
        raise ValueError(f"no decoder blocks found in {type(model).__name__}: no ModuleList of "
                         f"{sorted(names) or 'identical modules'}")
    return best[1], best[2]


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Linear-like modules inside one block (``nn.Linear`` or an already compressed one), by full name."""
    return {f"{prefix}.{n}": m for n, m in block.named_modules()
            if isinstance(m, (nn.Linear, CompressedLinear))}


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every Linear inside the decoder blocks. Works on a meta model."""
    prefix, blocks = find_blocks(model)
    shapes = {}
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block, f"{prefix}.{i}").items():
            shapes[name] = (lin.out_features, lin.in_features)
    return shapes


def other_param_bytes(model: nn.Module, dtype_bytes: int = 2) -> int:
    """Bytes of all parameters outside the block Linears (tied tensors counted once)."""
    prefix, blocks = find_blocks(model)
    inside = set()
    for i, block in enumerate(blocks):
        for lin in block_linears(block, f"{prefix}.{i}").values():
            inside.update(id(p) for p in lin.parameters(recurse=False))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in inside or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * dtype_bytes
    return total


set_module = replace_module  # put a module at a name, its model-op hooks handed over (runtime.model_ops)


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def other_nbytes(model: nn.Module, float_dtype: str) -> int:
    """Bytes :func:`other_tensors` will write, computed without copying anything."""
    skip = tuple(f"{n}." for n in compressed_modules(model))
    total, seen = 0, set()
    for name, t in model.state_dict().items():
        # meta tensors (a streamed model's freed blocks) all have address 0: they are told apart by name
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() and t.device.type != "meta" else (name,)
        if name.startswith(skip) or key in seen:
            continue
        seen.add(key)
        total += t.numel() * (FLOAT_BYTES[float_dtype] if t.is_floating_point() else t.element_size())
    return total


def model_nbytes(model: nn.Module, float_dtype: str) -> int:
    """Total tensor bytes of the saved checkpoint."""
    return sum(m.nbytes() for m in compressed_modules(model).values()) + other_nbytes(model, float_dtype)
