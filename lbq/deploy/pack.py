"""k-bit packing of unsigned integer codes (1 to 8 bits per code).

Layout: the codes of a tensor, flattened in C order, form one bit stream. Code i occupies
stream bits [i*k, (i+1)*k), least significant bit first, and stream bit j is bit (j mod 8) of
byte j // 8 (NumPy's ``bitorder='little'``). At k = 2 that is four codes per byte, code 4m + r
in bits 2r and 2r+1 of byte m; at k = 8 a byte is a code. The last byte is padded with zero
bits. NumPy has no k-bit dtype, hence this small codec on top of ``np.packbits``.
"""

from __future__ import annotations

import numpy as np

from lbq.deploy.errors import DeployError

MAX_BITS = 8
# Codes per chunk: a multiple of 8, so every chunk starts on a byte boundary at any k.
_CHUNK = 1 << 20


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= MAX_BITS:
        raise DeployError(f"bits={bits!r}: packing takes whole bit-widths 1..{MAX_BITS}")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ceil(count * bits / 8)."""
    return -(-int(count) * _check_bits(bits) // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs integer codes into bytes, ``bits`` bits per code (layout in the module doc).

    Args:
      codes: integer array of any shape, every value in [0, 2^bits - 1].
      bits: 1..8.

    Returns:
      uint8 array of shape [packed_size(codes.size, bits)].

    Raises:
      DeployError: for a bit-width outside 1..8, a non-integer array or a code out of range.
    """
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise DeployError(f"codes must be integers, got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() > (1 << bits) - 1):
        raise DeployError(
            f"codes span [{flat.min()}, {flat.max()}], outside [0, {(1 << bits) - 1}] for "
            f"{bits} bits"
        )
    shifts = np.arange(bits, dtype=np.uint8)
    out = np.empty(packed_size(flat.size, bits), np.uint8)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK].astype(np.uint8)
        stream = ((chunk[:, None] >> shifts) & 1).reshape(-1)
        first = start * bits // 8
        packed = np.packbits(stream, bitorder="little")
        out[first : first + packed.size] = packed
    return out


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_codes`.

    Args:
      packed: uint8 array of shape [packed_size(count, bits)].
      bits: 1..8, as packed.
      count: how many codes the bytes hold.

    Returns:
      uint8 array of shape [count].

    Raises:
      DeployError: when ``packed`` is not uint8 of exactly the expected length.
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed)
    expected = packed_size(count, bits)
    if packed.dtype != np.uint8 or packed.shape != (expected,):
        raise DeployError(
            f"packed codes have dtype {packed.dtype} and shape {packed.shape}; {count} codes of "
            f"{bits} bits need uint8 of shape ({expected},)"
        )
    weights = (1 << np.arange(bits)).astype(np.uint8)
    out = np.empty(count, np.uint8)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        chunk = packed[first : first + packed_size(n, bits)]
        stream = np.unpackbits(chunk, count=n * bits, bitorder="little").reshape(n, bits)
        out[start : start + n] = (stream * weights).sum(axis=1, dtype=np.uint8)
    return out
