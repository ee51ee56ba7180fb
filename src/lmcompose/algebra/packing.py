"""Bit packing for stored codes and N:M sparsity metadata.

Codes of any width from 1 to 8 bits are packed into one little-endian bit stream, so a tensor of
`count` codes of `bits` bits takes exactly ``ceil(count * bits / 8)`` bytes on disk. That is the
number ``nbytes()`` reports, and the test suite checks the two agree.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations

import torch


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by `count` values of `bits` bits each in one packed stream."""
    return (count * bits + 7) // 8


CHUNK_CODES = 1 << 20  # codes (un)packed at a time: bounds the temporaries (~10 bytes per code)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits into a flat uint8 tensor (little-endian bit order), in
    chunks of `CHUNK_CODES` codes (a multiple of 8, so every chunk but the last fills whole bytes)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; allowed: 1..8")
    flat = values.reshape(-1).to(torch.uint8).cpu()
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8)
    shifts, weights = torch.arange(bits, dtype=torch.uint8), (1 << torch.arange(8, dtype=torch.uint8))
    for start in range(0, flat.numel(), CHUNK_CODES):
        chunk = flat[start:start + CHUNK_CODES]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, torch.zeros(pad, dtype=torch.uint8)])
        first = start * bits // 8
        out[first:first + stream.numel() // 8] = (stream.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns `count` uint8 values.

    Works through the stream `CHUNK_CODES` codes at a time (each chunk is a whole number of bytes:
    8 codes span `bits` bytes), so loading a large checkpoint never holds more than a few MiB of
    temporaries beside the result."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is not supported; allowed: 1..8")
    if packed.numel() != packed_nbytes(count, bits):
        raise ValueError(f"packed stream has {packed.numel()} bytes, expected {packed_nbytes(count, bits)}")
    flat = packed.reshape(-1).to(torch.uint8)
    out = torch.empty(count, dtype=torch.uint8)
    shifts, weights = torch.arange(8, dtype=torch.uint8), (1 << torch.arange(bits, dtype=torch.uint8))
    for start in range(0, count, CHUNK_CODES):  # CHUNK_CODES is a multiple of 8: chunks start on a byte
        n = min(CHUNK_CODES, count - start)
        chunk = flat[start * bits // 8: (start * bits + n * bits + 7) // 8]
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits)
        out[start:start + n] = (stream * weights).sum(1, dtype=torch.uint8)
    return out


def nm_index_bits(n: int, m: int) -> int:
    """Bits that identify which `n` of `m` entries are kept: ceil(log2 C(m, n))."""
    return max(1, math.ceil(math.log2(math.comb(m, n)))) if math.comb(m, n) > 1 else 0


@lru_cache(maxsize=None)
def _nm_table(n: int, m: int) -> tuple[torch.Tensor, dict[int, int]]:
    """All keep-patterns of n out of m as an [C(m,n), m] bool table, and pattern-bits -> index."""
    combos = list(combinations(range(m), n))
    table = torch.zeros(len(combos), m, dtype=torch.bool)
    lookup = {}
    for i, c in enumerate(combos):
        table[i, list(c)] = True
        lookup[sum(1 << j for j in c)] = i
    return table, lookup


def encode_nm(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Encode an N:M mask [rows, cols] as one combination index per group of m columns."""
    groups = mask.reshape(-1, m).cpu().to(torch.int64)
    codes = (groups * (1 << torch.arange(m))).sum(1)
    _, lookup = _nm_table(n, m)
    keys = torch.tensor(sorted(lookup), dtype=torch.int64)
    vals = torch.tensor([lookup[int(k)] for k in keys], dtype=torch.int64)
    pos = torch.searchsorted(keys, codes)
    if (pos >= len(keys)).any() or (keys[pos.clamp(max=len(keys) - 1)] != codes).any():
        raise ValueError(f"mask is not {n}:{m}: some group of {m} does not keep exactly {n}")
    return vals[pos]


def decode_nm(index: torch.Tensor, n: int, m: int, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`encode_nm`."""
    table, _ = _nm_table(n, m)
    return table[index.to(torch.int64)].reshape(rows, cols)
