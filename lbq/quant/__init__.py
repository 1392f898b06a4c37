"""Quantizers (pure jax), quantized Flax layers and per-step precision specs."""

from lbq.quant.quantizers import (
    FULL_PRECISION_BITS,
    check_bits,
    quantize_activation,
    quantize_unit,
    quantize_weight,
    round_ste,
)

__all__ = [
    "FULL_PRECISION_BITS",
    "check_bits",
    "quantize_activation",
    "quantize_unit",
    "quantize_weight",
    "round_ste",
]
