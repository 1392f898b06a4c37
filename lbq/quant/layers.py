"""Flax Linen layers whose precision is chosen at call time, as data.

A layer's precision is a `LayerPrecision` of three scalars (weight bits, activation bits,
quantize switch). They are ordinary (possibly traced) arrays, so progressive stages and
stochastic precision change them between steps without recompiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lbq.quant.precision import LayerPrecision
from lbq.quant.quantizers import FULL_PRECISION_BITS, quantize_activation, quantize_weight

Dtype = Any

# He initialisation over fan-out, as torchvision and the authors' ResNets use.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def effective_bits(bits: jax.Array, quantize: jax.Array) -> jax.Array:
    """Bit-width actually applied: ``bits`` when quantizing, full precision otherwise."""
    return jnp.where(jnp.asarray(quantize) > 0, bits, FULL_PRECISION_BITS)


def full_precision_layer() -> LayerPrecision:
    """A `LayerPrecision` that quantizes nothing (32 bits, switch off)."""
    fp = jnp.float32(FULL_PRECISION_BITS)
    return LayerPrecision(fp, fp, jnp.float32(0.0))


def activation(x: jax.Array, precision: LayerPrecision | None) -> jax.Array:
    """The network's nonlinearity.

    Args:
      x: pre-activation.
      precision: None for a full-precision network (plain ReLU); otherwise clip(0, 1) then
        ``a_bits`` quantization, where a switched-off layer keeps only the clip.
    """
    if precision is None:
        return nn.relu(x)
    return quantize_activation(x, effective_bits(precision.a_bits, precision.quantize))


def _quantized_kernel(
    kernel: jax.Array, precision: LayerPrecision | None, per_channel: bool, dtype: Dtype
) -> jax.Array:
    if precision is not None:
        bits = effective_bits(precision.w_bits, precision.quantize)
        kernel = quantize_weight(kernel, bits, per_channel=per_channel)
    return kernel.astype(dtype)


def _quantized_input(x: jax.Array, precision: LayerPrecision | None, enabled: bool) -> jax.Array:
    if not enabled or precision is None:
        return x
    return activation(x, precision)


class QuantConv(nn.Module):
    """2-D convolution (NHWC) with DoReFa-quantized weights.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: 'SAME', 'VALID' or explicit pairs.
      use_bias: add a full-precision bias.
      per_channel: scale weights per output channel instead of per tensor.
      quantize_input: also apply the activation quantizer to the input. The lbq networks
        quantize activations where they are produced (in place of ReLU), so they leave
        this off; it is there for models that want AQT-style input quantization.
      dtype: compute dtype.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = False
    per_channel: bool = False
    quantize_input: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, precision: LayerPrecision | None = None) -> jax.Array:
        """Applies the convolution; ``precision=None`` means full precision."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, kernel_shape, jnp.float32)
        kernel = _quantized_kernel(kernel, precision, self.per_channel, self.dtype)
        x = _quantized_input(x, precision, self.quantize_input).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(self.strides),
            padding=self.padding if isinstance(self.padding, str) else tuple(self.padding),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class QuantDense(nn.Module):
    """Dense layer with DoReFa-quantized weights and a full-precision bias.

    Attributes mirror `QuantConv`.
    """

    features: int
    use_bias: bool = True
    per_channel: bool = False
    quantize_input: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, precision: LayerPrecision | None = None) -> jax.Array:
        """Applies the layer; ``precision=None`` means full precision."""
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        kernel = _quantized_kernel(kernel, precision, self.per_channel, self.dtype)
        x = _quantized_input(x, precision, self.quantize_input).astype(self.dtype)
        y = x @ kernel
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
