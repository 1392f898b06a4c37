"""Precision types: per layer (`LayerPrecision`) and network-wide (`Precision`, one entry per
quantized layer), passed to a network as data, and the helpers that build them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import numpy as np

from lbq.quant.quantizers import check_bits


class LayerPrecision(NamedTuple):
    """The precision of one quantized layer (conv or dense, and the activation it feeds).

    Attributes:
      w_bits: weight bit-width (scalar array).
      a_bits: activation bit-width (scalar array).
      quantize: 1 to run quantized, 0 to run in full precision (scalar array).
    """

    w_bits: jax.Array
    a_bits: jax.Array
    quantize: jax.Array


class Precision(NamedTuple):
    """Per-layer precision of a network, as three float32 vectors of length L.

    Layer i is the i-th name of the network's ``layer_names()``. Because these are arrays,
    one compiled step serves every precision and every stochastic mask.

    Attributes:
      w_bits: weight bit-widths, shape [L].
      a_bits: activation bit-widths, shape [L].
      quantize: 1 where the layer runs quantized, 0 where it runs in full precision.
    """

    w_bits: jax.Array
    a_bits: jax.Array
    quantize: jax.Array

    def layer(self, index: int) -> LayerPrecision:
        """The `LayerPrecision` of layer ``index``."""
        return LayerPrecision(self.w_bits[index], self.a_bits[index], self.quantize[index])


def block_of(layer_name: str) -> str:
    """The block a layer belongs to: the part of its name before the last '/'."""
    return layer_name.rsplit("/", 1)[0]


def make_precision(
    layer_names: Sequence[str],
    w_bits: int,
    a_bits: int,
    *,
    block_bits: Mapping[str, tuple[int, int]] | None = None,
    quantize: float = 1.0,
) -> Precision:
    """Builds a host-side `Precision` with the same bits everywhere, or per block.

    Args:
      layer_names: the network's quantized layers, in order.
      w_bits: default weight bit-width.
      a_bits: default activation bit-width.
      block_bits: optional {block name: (w_bits, a_bits)} overrides.
      quantize: the quantize switch for every layer.

    Returns:
      A `Precision` of numpy float32 vectors.

    Raises:
      ValueError: on a bit-width out of range or an unknown block name.
    """
    check_bits(w_bits, "w_bits")
    check_bits(a_bits, "a_bits")
    block_bits = dict(block_bits or {})
    known_blocks = {block_of(name) for name in layer_names}
    unknown = sorted(set(block_bits) - known_blocks)
    if unknown:
        raise ValueError(
            f"block_bits names unknown blocks {unknown}; this network's blocks are "
            f"{sorted(known_blocks)}"
        )
    rows = []
    for name in layer_names:
        w, a = block_bits.get(block_of(name), (w_bits, a_bits))
        rows.append(
            (
                check_bits(w, f"block_bits[{block_of(name)!r}]"),
                check_bits(a, f"block_bits[{block_of(name)!r}]"),
            )
        )
    bits = np.asarray(rows, np.float32).reshape(len(layer_names), 2)
    mask = np.full(len(layer_names), quantize, np.float32)
    return Precision(bits[:, 0], bits[:, 1], mask)


def unit_index(layer_names: Sequence[str], unit: str) -> tuple[list[str], np.ndarray]:
    """Groups layers into the units whose precision is sampled independently.

    Args:
      layer_names: the network's quantized layers, in order.
      unit: 'block' (all layers of a residual block together) or 'layer'.

    Returns:
      (unit names, int32 vector mapping each layer to its unit).
    """
    if unit == "layer":
        keys = list(layer_names)
    elif unit == "block":
        keys = [block_of(name) for name in layer_names]
    else:
        raise ValueError(f"unit={unit!r} is not one of 'block', 'layer'")
    names = list(dict.fromkeys(keys))
    return names, np.asarray([names.index(k) for k in keys], np.int32)
