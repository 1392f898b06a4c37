"""Pure-jax quantizers: DoReFa (SPEC section 1), PACT and LSQ (SPEC section 7).

Every bit-width argument may be a traced array, so one compiled function serves every
precision: 2, 4, 8 and 32 bits all go through the same trace. A bit-width of 32 (or more)
means full precision. Bit-widths 25..31 quantize like 24 bits (2^24 - 1 levels, the most that
float32 counts exactly).

Dtypes: inputs may be float32, bfloat16 or float16 (float64 where jax's x64 mode is on). The
level is chosen in float32 (float64 for float64 inputs) from the input converted exactly, and
the result is cast back to the input's dtype: choosing it in bfloat16 picked a neighbouring
level (a bfloat16 product ``(2^k - 1) z`` keeps 8 significant bits).
- `quantize_unit` / `quantize_activation` pick, for every input dtype, the level that exact
  arithmetic on the input gives (ties to even). bfloat16 and float16 results are the nearest
  value of the dtype to that level; float32 results are within an ulp of it (XLA computes
  ``n / L`` as ``n * (1 / L)``; lbq's float32 training runs are pinned to those values).
- `quantize_weight` computes tanh and the normalisation in float32, so its level is the exact
  one unless the exact pre-rounding value lies within a few float32 roundings of a level
  boundary; the same holds for PACT and LSQ, which divide by a learned clip or step.
Subnormal inputs read as zero (XLA flushes them on CPU and GPU).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

FULL_PRECISION_BITS = 32

# 2^24 - 1 is the most levels that float32 counts exactly; wider bit-widths use it.
_MAX_EXACT_BITS = 24

# Positive floor on a learned step size or clip value (see `learned_range`).
LEARNED_RANGE_FLOOR = 1e-8

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


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 for bfloat16/float16 (and integers), the dtype itself for float32/float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _result_dtype(dtype) -> jnp.dtype:
    return dtype if jnp.issubdtype(dtype, jnp.floating) else _compute_dtype(dtype)


def _power_of_two(bits: ArrayLike, dtype=jnp.float32) -> jax.Array:
    """``2^min(bits, 24)``, exact. XLA's exp2 is exp(x ln 2): 2^21 came out as 2097153."""
    exponent = jnp.minimum(jnp.asarray(bits), _MAX_EXACT_BITS).astype(jnp.int32)
    return jnp.left_shift(jnp.int32(1), exponent).astype(dtype)


def _level_count(bits: ArrayLike, dtype=jnp.float32) -> jax.Array:
    """``2^k - 1`` for bit-width k, exact; 32 bits gives 2^24 - 1 (the unused branch)."""
    return _power_of_two(bits, dtype) - 1.0


def _round_product(z: jax.Array, levels: jax.Array, power: jax.Array) -> jax.Array:
    """``round(z * levels)`` as exact arithmetic gives it, for ``levels = power - 1``, ``power``
    a power of two and ``|z * levels| < 2^24`` (ties to even, like `jnp.round`).

    The float product rounds; that matters only when it lands exactly on a half-integer
    ``h`` (elsewhere rounding is monotone and cannot cross one). Then ``z * power`` is exact
    and, being close to ``h + z``, so is ``z * power - h`` (Sterbenz), and comparing it with
    ``z`` tells on which side of ``h`` the exact product ``z * power - z`` lies.
    """
    product = z * levels
    nearest = jnp.round(product)
    half = jnp.floor(product) + 0.5
    # Above 2^23 no half-integer is representable (and floor + 0.5 itself rounds).
    landed_on_half = (product == half) & (jnp.abs(product) < 2.0**23)
    excess = z * power - half
    resolved = jnp.where(excess > z, half + 0.5, jnp.where(excess < z, half - 0.5, nearest))
    return jnp.where(landed_on_half, resolved, nearest)


@jax.custom_vjp
def _level_index_ste(z: jax.Array, index: jax.Array, levels: jax.Array) -> jax.Array:
    """``index``, the level index of ``z``, with the gradient of ``round_ste(z * levels)``
    with respect to ``z`` (the straight-through estimator); ``index`` gets no gradient."""
    return index


def _level_index_ste_fwd(z, index, levels):
    return index, levels


def _level_index_ste_bwd(levels, g):
    # The cotangent of round_ste(z * levels) with respect to z, computed as autodiff does.
    return g * levels, None, None


_level_index_ste.defvjp(_level_index_ste_fwd, _level_index_ste_bwd)


def quantize_unit(z: jax.Array, bits: ArrayLike) -> jax.Array:
    """Uniform k-bit quantizer on [0, 1]: ``round((2^k - 1) z) / (2^k - 1)`` (SPEC section 1).

    Args:
      z: values in [0, 1], any shape, a float dtype.
      bits: bit-width k (scalar, may be traced). k >= 32 returns ``z`` unchanged.

    Returns:
      The quantized values, same shape and dtype as ``z``: the level exact arithmetic gives
      (ties to even), as the nearest value of ``z``'s dtype (float32: within an ulp, see the
      module docstring). The gradient is the identity (straight-through estimator on
      ``round``, computed as ``(g / L) L``).
    """
    dtype = z.dtype
    x = z.astype(_compute_dtype(dtype))
    power = _power_of_two(bits, x.dtype)
    levels = power - 1.0
    quantized = _level_index_ste(x, _round_product(x, levels, power), levels) / levels
    return jnp.where(_is_full_precision(bits), z, quantized.astype(_result_dtype(dtype)))


def _smallest_normalisable(dtype) -> float:
    """``sqrt(tiny)`` (2^-63 in float32): below it, autodiff of ``t / m`` forms ``m^-2 = inf``."""
    return math.sqrt(float(jnp.finfo(dtype).tiny))


def _lifted_ratio(t: jax.Array, max_abs: jax.Array) -> jax.Array:
    """``t / (2 max_abs)`` for a tiny ``max_abs``, as for the kernel scaled to normal numbers.

    Scaling by a power of two is exact and lifts ``max_abs`` to a normal number (a kernel of
    zeros keeps a divisor of 1).
    """
    lift = 1.0 / _smallest_normalisable(t.dtype)
    lifted = max_abs * lift
    return (t * lift) / (2.0 * jnp.where(lifted > 0, lifted, 1.0))


def quantize_weight(w: jax.Array, bits: ArrayLike, per_channel: bool = False) -> jax.Array:
    """DoReFa weight quantizer: ``2 Q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (SPEC section 1).

    Args:
      w: a kernel, any shape; the output channels are on the last axis (Flax layout).
      bits: bit-width k (may be traced). k >= 32 returns ``w`` unchanged.
      per_channel: take the max per output channel instead of over the whole kernel.

    Returns:
      Quantized weights in [-1, 1], same shape and dtype as ``w``, computed in float32 for
      narrower dtypes (levels: see the module docstring). Gradients flow through ``tanh``
      and ``max`` as usual; only ``round`` is straight-through. A kernel (or a channel, with
      ``per_channel``) whose max|tanh(w)| is zero or below sqrt(tiny) (1.1e-19 in float32)
      keeps its exact levels but gets the straight-through gradient ``1 - tanh(w)^2``
      (autodiff's is NaN or inf there); a zero kernel quantizes to level
      ``round((2^k - 1) / 2)``, as the formula gives.
    """
    dtype = w.dtype
    t = jnp.tanh(w.astype(_compute_dtype(dtype)))
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    max_abs = jnp.max(jnp.abs(t), axis=axes, keepdims=per_channel)
    # Autodiff of t / m forms -g t / m^2: inf or NaN for m below sqrt(tiny) (a kernel of zeros,
    # or one whose max|tanh| underflows). Double where: the division that autodiff sees uses
    # m = 1 for such kernels (so their gradient is the straight-through one and the select
    # drops the max path), while their levels come from the exact quotient, fed to the
    # rounding as a value without gradient. Normal kernels keep autodiff's graph unchanged.
    normalisable = max_abs >= _smallest_normalisable(t.dtype)
    z = t / (2.0 * jnp.where(normalisable, max_abs, 1.0)) + 0.5
    exact_z = jnp.where(normalisable, z, _lifted_ratio(t, max_abs) + 0.5)
    # The level comes from the float32 product: t and the quotient carry float32 rounding
    # already, so resolving the product's own ties (as quantize_unit does) would not make it
    # exact; exact_z * levels as computed is as close as float32 tanh allows.
    levels = _level_count(bits, t.dtype)
    index = _level_index_ste(z, jnp.round(exact_z * levels), levels)
    if dtype == t.dtype:
        # 2 (n / L) - 1 loses up to 2^-23 near 0 to cancellation. float32 keeps this form:
        # training runs are compared bit for bit against it.
        quantized = 2.0 * (index / levels) - 1.0
    else:
        # The narrower dtype rounds once more: the level must be accurate to float32 first.
        quantized = (2.0 * index - levels) / levels
    # One full-precision select for the whole quantizer: quantize_unit's own select would be
    # redundant here, and dropping it cut the W2A2 ResNet-20 step's CPU compile time by ~10%.
    return jnp.where(_is_full_precision(bits), w, quantized.astype(_result_dtype(dtype)))


@jax.custom_vjp
def _clip_unit_interval(a: jax.Array) -> jax.Array:
    return jnp.clip(a, 0.0, 1.0)


def _clip_unit_interval_fwd(a):
    return jnp.clip(a, 0.0, 1.0), a


def _clip_unit_interval_bwd(a, g):
    # Both bounds pass the gradient, as torch.clamp and tf.clip_by_value do; jnp.clip's
    # autodiff gives 1/2 at a bound (jax.numpy's max/min split ties).
    return (jnp.where((a >= 0.0) & (a <= 1.0), g, jnp.zeros_like(g)),)


_clip_unit_interval.defvjp(_clip_unit_interval_fwd, _clip_unit_interval_bwd)


def quantize_activation(a: jax.Array, bits: ArrayLike) -> jax.Array:
    """Activation quantizer: ``Q_k(clip(a, 0, 1))``; it replaces ReLU in a quantized network.

    SPEC section 1 (the authors' code). At k >= 32 only the clip remains.

    Args:
      a: pre-activations, any shape, a float dtype.
      bits: bit-width k (scalar, may be traced).

    Returns:
      Same shape and dtype as ``a``: the level exact arithmetic gives, as in `quantize_unit`.
      The gradient is 1 for ``0 <= a <= 1`` (both bounds included, as torch.clamp and
      tf.clip_by_value pass it) and 0 outside.
    """
    return quantize_unit(_clip_unit_interval(a), bits)


# ----------------------------------------------------------------------- learned ranges


def learned_range(raw: ArrayLike) -> jax.Array:
    """The step size or clip value that a learned parameter stands for: ``max(|raw|, 1e-8)``.

    A large update can push a learned step or clip through zero (reported for other LSQ code,
    ZouJiu1/LSQplus#12). The magnitude keeps the range positive and the training going: the
    gradient reaching ``raw`` is ``sign(raw)`` times the range's, so a parameter pushed to
    ``-r`` acts as ``r`` and keeps learning; the floor `LEARNED_RANGE_FLOOR` keeps it away
    from zero (there its gradient is 0). Unlike a log parametrisation, the parameter is the
    step or clip itself (PACT's and LSQ's gradients, initialisations and L2 apply unchanged).

    Returns:
      Float32 (float64 for float64 input), shape of ``raw``.
    """
    raw = jnp.asarray(raw)
    raw = raw.astype(_compute_dtype(raw.dtype))
    return jnp.maximum(jnp.abs(raw), LEARNED_RANGE_FLOOR)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``x`` over the axes that broadcasting ``shape`` to ``x.shape`` added or stretched."""
    lead = x.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=tuple(range(lead)) + stretched, keepdims=False).reshape(shape)


@jax.custom_vjp
def _pact(x: jax.Array, clip: jax.Array, levels: jax.Array, full: jax.Array) -> jax.Array:
    return _pact_forward(x, clip, levels, full)


def _pact_forward(x, clip, levels, full):
    clipped = jnp.clip(x, 0.0, clip)
    quantized = jnp.round(clipped * levels / clip) * clip / levels
    return jnp.where(full, clipped, quantized)


def _pact_fwd(x, clip, levels, full):
    return _pact_forward(x, clip, levels, full), (x, clip)


def _pact_bwd(residuals, g):
    x, clip = residuals
    zero = jnp.zeros_like(g)
    grad_x = jnp.where((x >= 0.0) & (x <= clip), g, zero)
    grad_clip = _sum_to_shape(jnp.where(x >= clip, g, zero), clip.shape)
    return grad_x, grad_clip, None, None


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact_activation(x: jax.Array, clip_value: ArrayLike, bits: ArrayLike) -> jax.Array:
    """PACT activation quantizer (Choi et al., arXiv 1805.06085, eqs. 1-3; SPEC section 7).

    Forward: ``y = clip(x, 0, alpha)``, ``y_q = round(y n / alpha) alpha / n``, ``n = 2^k - 1``.
    At k >= 32 only the clip remains.

    Gradients, as the paper's eq. 3 and the SPEC give them: ``d y_q / d x = 1`` for
    ``0 <= x <= alpha``, else 0; ``d y_q / d alpha = 1`` for ``x >= alpha``, else 0. The paper
    takes ``y_q ~ y`` (straight-through) before differentiating, so the in-range term that
    straight-through rounding of the full formula would add, ``(y_q - y) / alpha``, is left out
    (LSQ keeps that term; use `lsq_quantize` for it).

    Args:
      x: pre-activations, any shape, a float dtype.
      clip_value: the learned clip ``alpha``, a scalar (one per layer) or an array that
        broadcasts to ``x``; used through `learned_range`, so it acts as ``max(|alpha|, 1e-8)``.
      bits: bit-width k >= 1 (scalar, may be traced).

    Returns:
      Same shape and dtype as ``x``, in ``[0, alpha]``, computed in float32 for narrower
      dtypes (levels: see the module docstring); the gradient for ``clip_value`` has its
      shape and is float32.
    """
    dtype = x.dtype
    clip = learned_range(clip_value)
    compute = jnp.promote_types(_compute_dtype(dtype), clip.dtype)
    levels = _level_count(bits, compute)
    out = _pact(x.astype(compute), clip.astype(compute), levels, _is_full_precision(bits))
    return out.astype(_result_dtype(dtype))


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: ArrayLike) -> jax.Array:
    """The identity, whose backward pass multiplies the gradient by ``scale`` (LSQ's ``g``).

    Args:
      x: any array.
      scale: a scalar or an array that broadcasts to ``x`` (may be traced); it gets no gradient.

    Returns:
      ``x`` itself. Source: Esser et al., "Learned Step Size Quantization", section 2.2.
    """
    return x


def _scale_gradient_fwd(x, scale):
    return x, scale


def _scale_gradient_bwd(scale, g):
    return (g * scale).astype(g.dtype), jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def lsq_bounds(bits: ArrayLike, signed: bool) -> tuple[jax.Array, jax.Array]:
    """LSQ's integer range ``(Q_N, Q_P)`` for bit-width b (SPEC section 7), float32 scalars.

    Unsigned (activations): ``(0, 2^b - 1)``. Signed (weights): ``(2^(b-1), 2^(b-1) - 1)``,
    which needs b >= 2 (see `check_lsq_weight_bits`). ``bits`` may be traced; b >= 24 gives
    the 24-bit range.
    """
    power = _power_of_two(bits)
    if signed:
        return power / 2.0, power / 2.0 - 1.0
    return jnp.zeros_like(power), power - 1.0


def lsq_gradient_scale(num_features: ArrayLike, bits: ArrayLike, signed: bool) -> jax.Array:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N Q_P)`` (Esser et al., section 2.2).

    Args:
      num_features: N, the number of weights of the layer, or the number of features of an
        activation (elements per example).
      bits: bit-width b (may be traced).
      signed: weights (True) or activations (False).

    Returns:
      A float32 scalar. ``Q_P`` is taken as at least 1, so a 1-bit signed call stays finite.
    """
    _, q_p = lsq_bounds(bits, signed)
    return jax.lax.rsqrt(jnp.asarray(num_features, jnp.float32) * jnp.maximum(q_p, 1.0))


@jax.custom_vjp
def _lsq(v: jax.Array, step: jax.Array, q_n: jax.Array, q_p: jax.Array) -> jax.Array:
    return _lsq_forward(v, step, q_n, q_p)


def _lsq_forward(v, step, q_n, q_p):
    return jnp.round(jnp.clip(v / step, -q_n, q_p)) * step


def _lsq_fwd(v, step, q_n, q_p):
    return _lsq_forward(v, step, q_n, q_p), (v, step, q_n, q_p)


def _lsq_bwd(residuals, g):
    v, step, q_n, q_p = residuals
    q = v / step
    below = q <= -q_n
    above = q >= q_p
    inside = ~(below | above)
    grad_v = jnp.where(inside, g, jnp.zeros_like(g))
    # Esser et al., eq. 3: -v/s + round(v/s) inside; -Q_N at or below, Q_P at or above.
    dstep = jnp.where(inside, jnp.round(q) - q, jnp.where(below, -q_n, q_p))
    return grad_v, _sum_to_shape(g * dstep, step.shape), None, None


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_quantize(
    v: jax.Array,
    step_size: ArrayLike,
    bits: ArrayLike,
    *,
    signed: bool,
    grad_scale: ArrayLike,
) -> jax.Array:
    """LSQ quantizer ``v_q = round(clip(v / s, -Q_N, Q_P)) s`` (Esser et al., ICLR 2020,
    arXiv 1902.08153, eqs. 1-3; SPEC section 7).

    Gradients (straight-through on round): ``d v_q / d v = 1`` inside ``(-Q_N, Q_P)``, else 0;
    ``d v_q / d s = -v/s + round(v/s)`` inside, ``-Q_N`` at or below the low end, ``Q_P`` at
    or above the high end; the gradient reaching ``s`` is then multiplied by ``grad_scale``
    (`scale_gradient`). At b >= 32 the quantizer is the identity (signed, weights) or ReLU
    (unsigned, activations), and ``s`` gets no gradient.

    Args:
      v: weights or pre-activations, any shape, a float dtype.
      step_size: the learned step ``s``: a scalar (per tensor), or an array that broadcasts
        to ``v`` (per output channel: shape ``(C,)`` for channels on the last axis). Used
        through `learned_range`, so it acts as ``max(|s|, 1e-8)``.
      bits: bit-width b (scalar, may be traced); signed needs b >= 2.
      signed: True for weights (``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``), False for
        activations (``Q_N = 0``, ``Q_P = 2^b - 1``).
      grad_scale: ``g``, usually `lsq_gradient_scale` (``1 / sqrt(N Q_P)``).

    Returns:
      Same shape and dtype as ``v``, computed in float32 for narrower dtypes (levels: see the
      module docstring); the gradient for ``step_size`` has its shape and is float32.
    """
    dtype = v.dtype
    step = scale_gradient(learned_range(step_size), grad_scale)
    compute = jnp.promote_types(_compute_dtype(dtype), step.dtype)
    x = v.astype(compute)
    q_n, q_p = lsq_bounds(bits, signed)
    quantized = _lsq(x, step.astype(compute), q_n.astype(compute), q_p.astype(compute))
    full = x if signed else jax.nn.relu(x)
    return jnp.where(_is_full_precision(bits), full, quantized).astype(_result_dtype(dtype))


def lsq_initial_step(
    v: jax.Array, bits: ArrayLike, signed: bool, axes: int | tuple[int, ...] | None = None
) -> jax.Array:
    """LSQ's initial step ``s = 2 mean(|v|) / sqrt(Q_P)`` (Esser et al., section 2.1).

    Args:
      v: the weights, or the first batch of an activation.
      bits: bit-width b (may be traced).
      signed: weights (True) or activations (False).
      axes: the axes to average over; None averages everything (per-tensor step). For a
        per-output-channel step of a Flax kernel, all axes but the last: the result has shape
        ``(C,)`` and broadcasts to the kernel.

    Returns:
      Float32 (float64 for float64 ``v``). It is 0 for an all-zero ``v``; the quantizers then
      use `LEARNED_RANGE_FLOOR`. ``Q_P`` is taken as at least 1.
    """
    x = v.astype(_compute_dtype(v.dtype))
    _, q_p = lsq_bounds(bits, signed)
    return 2.0 * jnp.mean(jnp.abs(x), axis=axes) / jnp.sqrt(jnp.maximum(q_p, 1.0))


def lsq_rescale_step(step_size: ArrayLike, old_bits: ArrayLike, new_bits: ArrayLike) -> jax.Array:
    """The step that keeps LSQ's clipped range when the bit-width changes (SPEC section 7).

    ``s_new = s_old (2^b_old - 1) / (2^b_new - 1)``: the range, ``s (Q_N + Q_P)`` (signed) or
    ``s Q_P`` (unsigned), is ``s (2^b - 1)`` in both cases, so it is kept. When
    either bit-width is full precision (>= 32) the step is returned unchanged: at full
    precision the step is unused and has no range to keep. Bit-widths may be traced.

    Returns:
      Float32 (float64 for float64 input), shape of ``step_size``.
    """
    step = jnp.asarray(step_size)
    step = step.astype(_compute_dtype(step.dtype))
    ratio = _level_count(old_bits, step.dtype) / _level_count(new_bits, step.dtype)
    either_full = _is_full_precision(old_bits) | _is_full_precision(new_bits)
    return jnp.where(either_full, step, step * ratio)


# ------------------------------------------------------------------------ static checks


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


def check_lsq_weight_bits(value: object, field: str) -> int:
    """Validates a static weight bit-width for LSQ, which needs at least 2 bits.

    Signed LSQ at 1 bit has ``Q_P = 2^0 - 1 = 0``: one non-negative level and a gradient
    scale ``1 / sqrt(N Q_P)`` that is infinite (SPEC section 7).

    Returns:
      The bit-width as an int.

    Raises:
      ValueError: when ``value`` is not a whole number in 2..32, naming ``field``.
    """
    bits = check_bits(value, field)
    if bits < 2:
        raise ValueError(
            f"{field}={value!r} is too few bits for LSQ weights: signed LSQ needs at least "
            f"2 bits (at 1 bit Q_P = 0); use 2..{FULL_PRECISION_BITS} or the dorefa quantizer"
        )
    return bits
