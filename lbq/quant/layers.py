"""Flax Linen layers whose precision is chosen at call time, as data.

A layer's precision is a `LayerPrecision` of three scalars (weight bits, activation bits,
quantize switch). They are ordinary (possibly traced) arrays, so progressive stages and
stochastic precision change them between steps without recompiling.

Quantizers (static choices of a layer; SPEC sections 1 and 7):

- weights: ``'dorefa'`` (the paper's, the default) or ``'lsq'`` (learned step size);
- activations: ``'dorefa'`` (clip(0, 1), the default), ``'pact'`` (learned clip) or ``'lsq'``.

Learned ranges live in the parameters, as the **range** itself, never as a step size:

- PACT: the clip value ``alpha`` (parameter ``clip`` of a `QuantActivation`);
- LSQ: the width of the clipped range, ``r = s (Q_N + Q_P) = s (2^b - 1)`` (parameter
  ``range`` of a `QuantActivation`, ``weight_range`` of a `QuantConv` / `QuantDense`). The step
  ``s = r / (2^b - 1)`` is computed from the traced bit-width at every call.

Why the range: the bit-width is data and changes between stages and stochastic masks; a
parameter that is the range keeps the clipped interval when it does. For LSQ that is SPEC
section 7's rescale ``s_new = s_old (2^b_old - 1) / (2^b_new - 1)`` (`lsq_rescale_step`), for
activations and weights alike (for weights ``Q_N + Q_P = 2^b - 1`` too); for PACT the clip is
the range already. In a full-precision unit (32 bits, or a stochastic-precision switch of 0)
PACT keeps its clip (and learns it), LSQ activations are a ReLU and LSQ weights the identity;
their range parameter then gets no gradient and is kept for the next quantized step.

LSQ's training dynamics are kept exactly (`lsq_range_quantize`): the gradient reaching ``r`` is
scaled so that an SGD step on ``r`` (with momentum, Nesterov and weight decay) is ``2^b - 1``
times LSQ's SGD step on ``s``. Positivity: a range acts as ``max(|raw|, 1e-8)``
(`lbq.quant.quantizers.learned_range`), so a step that pushes it through zero flips its sign and
training goes on with a positive range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lbq.quant.precision import LayerPrecision
from lbq.quant.quantizers import (
    FULL_PRECISION_BITS,
    lsq_bounds,
    lsq_gradient_scale,
    lsq_initial_step,
    lsq_quantize,
    pact_activation,
    quantize_activation,
    quantize_weight,
)

Dtype = Any

ACTIVATION_QUANTIZERS = ("dorefa", "pact", "lsq")
WEIGHT_QUANTIZERS = ("dorefa", "lsq")
DEFAULT_QUANTIZER = "dorefa"
# PACT's initial clip when training from scratch (Choi et al., section 3).
PACT_INITIAL_CLIP = 10.0
# Bit-width of the LSQ rule that initialises a weight range when the layer is initialised at
# full precision (lbq's trainer then sets every range by `lbq.calibrate` before the first step).
LSQ_FALLBACK_INIT_BITS = 2
# Names of the learned-range parameters (see the module docstring).
CLIP_PARAM, RANGE_PARAM, WEIGHT_RANGE_PARAM = "clip", "range", "weight_range"
LEARNED_RANGE_PARAMS = (CLIP_PARAM, RANGE_PARAM, WEIGHT_RANGE_PARAM)
# What a quantizer with a learned range records with `sow` for calibration (`lbq.calibrate`):
# the collection, an activation's input and nominal bit-width, a weight's nominal bit-width.
CALIBRATION_COLLECTION = "intermediates"
SOWN_INPUT, SOWN_BITS, SOWN_WEIGHT_BITS = "quantizer_input", "quantizer_bits", "weight_bits"

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
    """The network's nonlinearity with the DoReFa activation quantizer (no parameters).

    Args:
      x: pre-activation.
      precision: None for a full-precision network (plain ReLU); otherwise clip(0, 1) then
        ``a_bits`` quantization, where a switched-off layer keeps only the clip.
    """
    if precision is None:
        return nn.relu(x)
    return quantize_activation(x, effective_bits(precision.a_bits, precision.quantize))


# ------------------------------------------------------------------- LSQ with a learned range


def lsq_level_count(bits: jax.typing.ArrayLike) -> jax.Array:
    """``Q_N + Q_P = 2^b - 1`` (signed and unsigned alike), float32; b >= 24 gives 2^24 - 1."""
    q_n, q_p = lsq_bounds(bits, signed=False)
    return q_n + q_p


def lsq_range_quantize(
    v: jax.Array,
    value_range: jax.typing.ArrayLike,
    bits: jax.typing.ArrayLike,
    *,
    signed: bool,
    num_features: int,
) -> jax.Array:
    """LSQ (Esser et al., ICLR 2020, eqs. 1-3; SPEC section 7) parametrised by its range.

    The step is ``s = r / L`` with ``L = 2^b - 1`` and ``r = value_range``; the forward pass and
    the gradient for ``v`` are `lbq.quant.quantizers.lsq_quantize`'s with that step.

    Gradient for ``r``: LSQ updates ``s`` with ``g dLoss/ds``, ``g = 1 / sqrt(N Q_P)``. Here the
    gradient reaching ``r`` is ``g L dLoss/ds`` (= ``g L^2 dLoss/dr``, since ``dLoss/dr =
    dLoss/ds / L``). An optimizer step that is linear in the gradient and in the parameter
    (SGD, momentum, Nesterov, weight decay ``wd r``) then gives ``r' = r - lr (g L dLoss/ds +
    wd r) = L (s - lr (g dLoss/ds + wd s)) = L s'``: exactly LSQ's update of ``s``, scaled by
    ``L``. (Adam normalises the gradient, so there the two parametrisations differ.)

    Args:
      v: weights (``signed=True``) or pre-activations (``signed=False``), a float dtype.
      value_range: ``r``, a scalar or an array that broadcasts to ``v`` (per output channel:
        shape ``(C,)``); it acts as ``max(|r|, 1e-8 L)`` (positivity, see `learned_range`).
      bits: bit-width b (scalar, may be traced); b >= 32 gives the identity (weights) or ReLU
        (activations), and ``r`` gets no gradient.
      signed: weights (``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``) or activations (``0``,
        ``2^b - 1``).
      num_features: N of LSQ's gradient scale: the number of weights that share one step (the
        kernel, or one output channel of it), or the features of an activation per example.

    Returns:
      Same shape and dtype as ``v``.
    """
    levels = lsq_level_count(bits)
    grad_scale = lsq_gradient_scale(num_features, bits, signed) * jnp.square(levels)
    step = jnp.asarray(value_range, jnp.float32) / levels
    return lsq_quantize(v, step, bits, signed=signed, grad_scale=grad_scale)


def lsq_initial_range(
    v: jax.Array, bits: jax.typing.ArrayLike, signed: bool, per_channel: bool = False
) -> jax.Array:
    """The range ``r = s (2^b - 1)`` of LSQ's initial step ``s = 2 mean|v| / sqrt(Q_P)``.

    Args:
      v: a kernel (channels on the last axis) or a batch of activation inputs.
      bits: bit-width b (may be traced).
      signed: weights (True) or activations (False; ``v`` is then taken after ReLU, the values
        the unsigned quantizer keeps, as LSQ initialises from the ReLU output).
      per_channel: one range per output channel (shape ``(C,)``), else a scalar.

    Returns:
      Float32.
    """
    values = v if signed else jax.nn.relu(v)
    axes = tuple(range(v.ndim - 1)) if per_channel else None
    return lsq_initial_step(values, bits, signed, axes) * lsq_level_count(bits)


# ------------------------------------------------------------------------------- activation


class QuantActivation(nn.Module):
    """A quantized activation with a learned range (it replaces ReLU; SPEC section 7).

    ``'pact'``: ``clip(x, 0, alpha)`` rounded to ``2^b - 1`` levels, parameter ``clip``
    (shape ``()``, float32), initialised to ``init_range``; at full precision only the clip
    remains. ``'lsq'``: unsigned LSQ with parameter ``range`` = ``s (2^b - 1)``, initialised to
    ``init_range`` (lbq's trainer sets it by `lbq.calibrate` before the first step); at full
    precision a ReLU. ``'dorefa'``: the parameter-free `activation`.

    For calibration (`lbq.calibrate`), the input and the nominal bit-width (``a_bits``, before
    the quantize switch) are recorded with ``sow`` in the ``'intermediates'`` collection (names
    ``'quantizer_input'``, ``'quantizer_bits'``) when that collection is mutable; otherwise
    the call records nothing.

    Attributes:
      quantizer: 'dorefa', 'pact' or 'lsq'.
      init_range: initial clip or range (> 0).
    """

    quantizer: str = DEFAULT_QUANTIZER
    init_range: float = PACT_INITIAL_CLIP

    @nn.compact
    def __call__(self, x: jax.Array, precision: LayerPrecision | None) -> jax.Array:
        """Quantizes ``x``; ``precision=None`` means a plain ReLU (no parameter is made)."""
        if precision is None:
            return nn.relu(x)
        self.sow(CALIBRATION_COLLECTION, SOWN_INPUT, x)
        self.sow(CALIBRATION_COLLECTION, SOWN_BITS, precision.a_bits)
        bits = effective_bits(precision.a_bits, precision.quantize)
        if self.quantizer == "dorefa":
            return quantize_activation(x, bits)
        init = nn.initializers.constant(self.init_range)
        if self.quantizer == "pact":
            return pact_activation(x, self.param(CLIP_PARAM, init, (), jnp.float32), bits)
        if self.quantizer == "lsq":
            value_range = self.param(RANGE_PARAM, init, (), jnp.float32)
            features = math.prod(x.shape[1:])
            return lsq_range_quantize(x, value_range, bits, signed=False, num_features=features)
        raise ValueError(
            f"activation_quantizer={self.quantizer!r} is not one of {ACTIVATION_QUANTIZERS}"
        )


def quantized_activation(
    x: jax.Array,
    precision: LayerPrecision | None,
    quantizer: str,
    init_range: float,
    name: str,
) -> jax.Array:
    """The activation of a quantized network (call inside a compact method): ReLU for
    ``precision=None``, the parameter-free DoReFa `activation`, or a `QuantActivation` submodule
    called ``name`` for PACT and LSQ (DoReFa networks keep their parameter tree unchanged)."""
    if precision is None or quantizer == "dorefa":
        return activation(x, precision)
    return QuantActivation(quantizer, init_range, name=name)(x, precision)


# ----------------------------------------------------------------------------------- weights


def _check_weight_quantizer(name: str) -> None:
    if name not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weight_quantizer={name!r} is not one of {WEIGHT_QUANTIZERS}")


def _lsq_range_param(module: nn.Module, kernel: jax.Array, bits: jax.Array, per_channel: bool):
    """The ``weight_range`` parameter, initialised by LSQ's rule on the kernel at the
    initialisation's bit-width (`LSQ_FALLBACK_INIT_BITS` when that is full precision)."""

    def init(_key, shape, dtype):
        init_bits = jnp.where(bits >= FULL_PRECISION_BITS, LSQ_FALLBACK_INIT_BITS, bits)
        return lsq_initial_range(kernel, init_bits, True, per_channel).reshape(shape).astype(dtype)

    shape = (kernel.shape[-1],) if per_channel else ()
    return module.param(WEIGHT_RANGE_PARAM, init, shape, jnp.float32)


def _quantized_kernel(
    module: nn.Module, kernel: jax.Array, precision: LayerPrecision | None
) -> jax.Array:
    """The kernel as the layer uses it, in its compute dtype (see `QuantConv`)."""
    _check_weight_quantizer(module.weight_quantizer)
    if precision is not None:
        bits = effective_bits(precision.w_bits, precision.quantize)
        if module.weight_quantizer == "lsq":
            module.sow(CALIBRATION_COLLECTION, SOWN_WEIGHT_BITS, precision.w_bits)
            value_range = _lsq_range_param(module, kernel, bits, module.per_channel)
            shared = kernel.shape[-1] if module.per_channel else 1
            kernel = lsq_range_quantize(
                kernel, value_range, bits, signed=True, num_features=kernel.size // shared
            )
        else:
            kernel = quantize_weight(kernel, bits, per_channel=module.per_channel)
    return kernel.astype(module.dtype)


def _quantized_input(module: nn.Module, x: jax.Array, precision: LayerPrecision | None):
    if not module.quantize_input or precision is None:
        return x
    return quantized_activation(
        x, precision, module.activation_quantizer, module.init_range, "input_quantizer"
    )


class QuantConv(nn.Module):
    """2-D convolution (NHWC) with quantized weights (DoReFa or LSQ).

    Parameters: ``kernel`` (kh, kw, in, out), optional ``bias`` (out,), and for LSQ weights
    ``weight_range`` (shape () per tensor, (out,) per channel; the module docstring explains
    the range). LSQ's gradient scale takes N = the weights that share a step. LSQ weights
    record their nominal bit-width ``w_bits`` with ``sow`` (``'weight_bits'``) for calibration.

    Attributes:
      features: output channels.
      kernel_size: (kh, kw).
      strides: (sh, sw).
      padding: 'SAME', 'VALID' or explicit pairs.
      use_bias: add a full-precision bias.
      per_channel: scale weights per output channel instead of per tensor.
      weight_quantizer: 'dorefa' or 'lsq'.
      quantize_input: also apply the activation quantizer to the input (a submodule
        ``input_quantizer`` for PACT and LSQ) at the layer's ``a_bits``. The lbq networks set
        it with ``activation_placement='conv_input'`` (SPEC section 9); with
        ``'block_output'`` they quantize activations where they are produced instead.
      activation_quantizer, init_range: the input's quantizer (`QuantActivation`).
      dtype: compute dtype.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "SAME"
    use_bias: bool = False
    per_channel: bool = False
    weight_quantizer: str = DEFAULT_QUANTIZER
    quantize_input: bool = False
    activation_quantizer: str = DEFAULT_QUANTIZER
    init_range: float = PACT_INITIAL_CLIP
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, precision: LayerPrecision | None = None) -> jax.Array:
        """Applies the convolution; ``precision=None`` means full precision."""
        kernel_shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, kernel_shape, jnp.float32)
        kernel = _quantized_kernel(self, kernel, precision)
        x = _quantized_input(self, x, precision).astype(self.dtype)
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
    """Dense layer with quantized weights (DoReFa or LSQ) and a full-precision bias.

    Attributes mirror `QuantConv`.
    """

    features: int
    use_bias: bool = True
    per_channel: bool = False
    weight_quantizer: str = DEFAULT_QUANTIZER
    quantize_input: bool = False
    activation_quantizer: str = DEFAULT_QUANTIZER
    init_range: float = PACT_INITIAL_CLIP
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, precision: LayerPrecision | None = None) -> jax.Array:
        """Applies the layer; ``precision=None`` means full precision."""
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
        )
        kernel = _quantized_kernel(self, kernel, precision)
        x = _quantized_input(self, x, precision).astype(self.dtype)
        y = x @ kernel
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


# ------------------------------------------------------------------- learned-range parameters


def split_learned_ranges(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """Splits a parameter tree into (everything else, the learned ranges).

    Both are nested dicts shaped like ``params``; modules left empty are dropped. A learned
    range is a leaf named ``clip``, ``range`` or ``weight_range`` (`LEARNED_RANGE_PARAMS`).
    """
    rest, ranges = {}, {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub_rest, sub_ranges = split_learned_ranges(value)
            if sub_rest:
                rest[key] = sub_rest
            if sub_ranges:
                ranges[key] = sub_ranges
        elif key in LEARNED_RANGE_PARAMS:
            ranges[key] = value
        else:
            rest[key] = value
    return rest, ranges


def merge_learned_ranges(rest: Mapping[str, Any], ranges: Mapping[str, Any]) -> dict:
    """The inverse of `split_learned_ranges`: one nested dict holding both trees' leaves."""
    merged = dict(rest)
    for key, value in ranges.items():
        if isinstance(value, Mapping):
            merged[key] = merge_learned_ranges(merged.get(key, {}), value)
        else:
            merged[key] = value
    return merged
