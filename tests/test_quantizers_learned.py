"""PACT and LSQ (SPEC section 7) against float64 NumPy references and hand-derived gradients.

PACT and LSQ divide by a learned clip or step, in float32: the level is the exact one except
where the exact quotient lies within a few float32 roundings of a half-integer. Those inputs
are counted (and bounded by the width of that band), and for them either neighbour passes.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from lbq.quant.quantizers import (
    LEARNED_RANGE_FLOOR,
    check_lsq_weight_bits,
    learned_range,
    lsq_bounds,
    lsq_gradient_scale,
    lsq_initial_step,
    lsq_quantize,
    lsq_rescale_step,
    pact_activation,
    scale_gradient,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BITS = range(1, 9)
ULP32 = 2.0**-24  # relative rounding error of one float32 operation
BAND = 8 * ULP32  # float32 roundings on the way to the quotient, with room to spare


def np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)


def every_bfloat16_in(low: float, high: float) -> np.ndarray:
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(invalid="ignore"):  # the NaN bit patterns
        as64 = values.astype(np.float64)
    return values[np.isfinite(as64) & (as64 >= low) & (as64 <= high)]


def inputs(dtype, low: float, high: float, seed: int) -> np.ndarray:
    """Every bfloat16 value in [low, high], or 100,000 uniform float32 values."""
    if dtype == jnp.bfloat16:
        return every_bfloat16_in(low, high)
    return np.random.default_rng(seed).uniform(low, high, 100_000).astype(np.float32)


def np_lsq_bounds(bits, signed):
    return (2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0**bits - 1)


def check_levels(got, exact_quotient, scale, divisor, dtype):
    """``got`` holds the level n that rounds ``exact_quotient`` (float64), as the nearest value
    of ``dtype`` to ``n scale / divisor``, except within `BAND` of a half-integer, where either
    neighbour passes.

    Returns:
      (inputs in the band, the band's expected share of inputs).
    """
    frac = exact_quotient - np.floor(exact_quotient)
    band = BAND * np.maximum(np.abs(exact_quotient), 1.0)
    near = np.abs(frac - 0.5) < band
    options = [np.round(exact_quotient), np.floor(exact_quotient), np.ceil(exact_quotient)]
    matches = []
    for level in options:
        exact = level * scale / divisor
        nearest = exact.astype(np_dtype(dtype)).astype(np.float64)
        if dtype == jnp.float32:  # one or two roundings after the level: within 2 ulps
            matches.append(np.abs(got - exact) <= 2 * np.abs(np.spacing(exact.astype(np.float32))))
        else:  # the float32 value rounds to the nearest bfloat16 unless within 2^-22 of a tie
            midpoint = (got + nearest) / 2
            close_to_tie = np.abs(exact - midpoint) <= 4 * ULP32 * np.abs(exact)
            matches.append((got == nearest) | ((got != nearest) & close_to_tie))
    exact_ok = matches[0]
    either_ok = matches[1] | matches[2]
    bad = ~np.where(near, either_ok, exact_ok)
    assert not bad.any(), (got[bad][:4], exact_quotient[bad][:4])
    return int(near.sum()), float(np.sum(2 * band))


_pact = jax.jit(pact_activation)
_lsq = jax.jit(lsq_quantize, static_argnames="signed")


@jax.jit
def pact_grads(x, clip, bits, cotangent):
    """(d/dx, d/dclip) of sum(pact_activation(x, clip, bits) * cotangent)."""

    def loss(v, a):
        return jnp.sum(pact_activation(v, a, bits).astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=(0, 1))(x, clip)


@functools.partial(jax.jit, static_argnames="signed")
def lsq_grads(v, step, bits, cotangent, *, signed, grad_scale=1.0):
    """(d/dv, d/dstep) of sum(lsq_quantize(v, step, bits) * cotangent)."""

    def loss(x, s):
        out = lsq_quantize(x, s, bits, signed=signed, grad_scale=grad_scale)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.grad(loss, argnums=(0, 1))(v, step)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pact_matches_float64(dtype):
    in_band = expected = 0.0
    # Clips and steps that are not short binary fractions: with 0.3 or 2.5, bfloat16 inputs such
    # as 0.75 = 2.5 x 0.3 sit within a float32 rounding of a half-integer by construction.
    for clip in (0.37, 1.13, 2.71, 5.93):
        x = inputs(DTYPES[dtype], -0.5, 1.5 * clip, seed=int(clip * 10))
        alpha = np.float64(np.float32(clip))
        y = np.clip(x.astype(np.float64), 0.0, alpha)
        for bits in BITS:
            count = 2**bits - 1
            got = _pact(jnp.asarray(x), jnp.float32(clip), jnp.float32(bits))
            assert got.dtype == DTYPES[dtype]
            got = np.asarray(got.astype(jnp.float32), np.float64)
            n, e = check_levels(got, y * count / alpha, alpha, count, DTYPES[dtype])
            in_band, expected = in_band + n, expected + e
    assert in_band <= 2 * expected + 10, (in_band, expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_matches_float64(dtype, signed):
    in_band = expected = 0.0
    for step in (0.0513, 1.6967):
        s = np.float64(np.float32(step))
        for bits in range(2 if signed else 1, 9):
            q_n, q_p = np_lsq_bounds(bits, signed)
            v = inputs(DTYPES[dtype], -(q_n + 2) * s, (q_p + 2) * s, seed=bits)
            got = _lsq(
                jnp.asarray(v), jnp.float32(step), jnp.float32(bits), signed=signed, grad_scale=1.0
            )
            assert got.dtype == DTYPES[dtype]
            got = np.asarray(got.astype(jnp.float32), np.float64)
            quotient = np.clip(v.astype(np.float64) / s, -q_n, q_p)
            n, e = check_levels(got, quotient, s, 1.0, DTYPES[dtype])
            in_band, expected = in_band + n, expected + e
    assert in_band <= 2 * expected + 10, (in_band, expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pact_gradients_are_the_papers(dtype):
    """Choi et al. eq. 3: d/dx = 1 on [0, alpha] (both ends), d/dalpha = 1 for x >= alpha."""
    alpha = 2.0
    x = jnp.asarray([-1.0, -1e-3, 0.0, 0.3, 1.0, 1.99, 2.0, 2.01, 7.0], DTYPES[dtype])
    cotangent = jnp.arange(1.0, 10.0)
    for bits in (1, 2, 4, 8, 32):
        gx, galpha = pact_grads(x, jnp.float32(alpha), jnp.float32(bits), cotangent)
        assert gx.dtype == x.dtype and galpha.dtype == jnp.float32 and galpha.shape == ()
        x64 = np.asarray(x, np.float64)
        c64 = np.asarray(cotangent, np.float64)
        np.testing.assert_array_equal(
            np.asarray(gx, np.float64), np.where((x64 >= 0) & (x64 <= alpha), c64, 0)
        )
        assert float(galpha) == np.sum(c64[x64 >= alpha]) == 7 + 8 + 9


def test_pact_at_32_bits_is_the_clip():
    x = jnp.linspace(-3.0, 9.0, 1001)
    np.testing.assert_array_equal(pact_activation(x, 2.5, 32), jnp.clip(x, 0.0, 2.5))
    assert len(np.unique(np.asarray(pact_activation(x, 2.5, 2)))) == 4


def lsq_reference_gradients(v, step, bits, signed, cotangent):
    """Esser et al. eq. 3 in float64: d/dv, and d/ds summed over the elements of each step."""
    q_n, q_p = np_lsq_bounds(bits, signed)
    q = v / step
    inside = (q > -q_n) & (q < q_p)
    dstep = np.where(inside, np.round(q) - q, np.where(q <= -q_n, -q_n, q_p))
    return np.where(inside, cotangent, 0.0), cotangent * dstep


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_gradients_match_the_hand_derivation(dtype, signed):
    """Per output channel. Inputs whose quotient lies near a half-integer or an end of the
    range (where d/ds jumps) get a zero cotangent, so float32's rounding cannot move them."""
    rng = np.random.default_rng(7)
    for bits in range(2, 9):
        q_n, q_p = np_lsq_bounds(bits, signed)
        step = np.asarray([0.02, 0.1, 0.5, 1.3], np.float32)
        v = rng.uniform(-(q_n + 2), q_p + 2, size=(64, 4)) * step
        v = np.asarray(jnp.asarray(v, DTYPES[dtype]).astype(jnp.float32), np.float64)
        cotangent = rng.normal(size=v.shape)
        q = v / step
        jumps = np.abs(q - np.floor(q) - 0.5) < 1e-4
        cotangent = np.where(
            jumps | np.isin(np.round(q), [-q_n, q_p]) & (np.abs(q - np.round(q)) < 1e-4),
            0.0,
            cotangent,
        )
        cotangent = np.asarray(
            jnp.asarray(cotangent, DTYPES[dtype]).astype(jnp.float32), np.float64
        )
        grad_scale = 0.125
        gv, gs = lsq_grads(
            jnp.asarray(v, DTYPES[dtype]),
            jnp.asarray(step),
            jnp.float32(bits),
            jnp.asarray(cotangent, jnp.float32),
            signed=signed,
            grad_scale=grad_scale,
        )
        assert gv.dtype == DTYPES[dtype] and gs.dtype == jnp.float32 and gs.shape == (4,)
        want_v, want_s = lsq_reference_gradients(
            v, step.astype(np.float64), bits, signed, cotangent
        )
        np.testing.assert_array_equal(np.asarray(gv.astype(jnp.float32), np.float64), want_v)
        # float32's v / s is off by a few roundings, which round(q) - q passes on.
        error = grad_scale * np.sum(np.abs(cotangent * q), axis=0) * BAND
        difference = np.abs(np.asarray(gs, np.float64) - grad_scale * want_s.sum(axis=0))
        assert np.all(difference <= error + 1e-6), (bits, difference, error)


def test_lsq_gradients_at_the_ends_of_the_range():
    """Exact ends (a power-of-two step): d/dv is 0 at and beyond both ends; d/ds is -Q_N at or
    below the low end, Q_P at or above the high end."""
    step = 0.25
    for signed, bits in ((True, 2), (True, 4), (False, 2), (False, 4)):
        q_n, q_p = np_lsq_bounds(bits, signed)
        q = np.asarray([-q_n - 3, -q_n, -q_n + 1, q_p - 1, q_p, q_p + 3], np.float64)
        v = jnp.asarray(q * step, jnp.float32)
        ones = jnp.ones_like(v)
        gv, gs = lsq_grads(v, jnp.float32(step), jnp.float32(bits), ones, signed=signed)
        inside = [0, 0, 1, 1, 0, 0]  # strictly between the ends
        np.testing.assert_array_equal(gv, inside)
        assert float(gs) == -q_n * 2 + 0 + 0 + q_p * 2


def test_gradient_scale_scales_only_the_step_gradient():
    v = jnp.linspace(-1.0, 1.0, 101)

    def grads(g):
        return lsq_grads(v, jnp.float32(0.3), jnp.float32(3), v, signed=True, grad_scale=g)

    gv1, gs1 = grads(1.0)
    for g in (0.5, 0.01, jnp.float32(0.2)):
        gv, gs = grads(g)
        np.testing.assert_array_equal(gv, gv1)
        np.testing.assert_allclose(gs, float(gs1) * float(g), rtol=2 * ULP32)
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(scale_gradient(x, 3.0), x)
    np.testing.assert_array_equal(
        jax.grad(lambda y: jnp.sum(scale_gradient(y, 3.0) * y))(x), x * 3.0 + x
    )


@pytest.mark.parametrize("signed", [False, True])
def test_lsq_gradient_scale_is_one_over_sqrt_n_qp(signed):
    for bits in range(2, 9):
        _, q_p = np_lsq_bounds(bits, signed)
        for n in (9, 4608, 16 * 32 * 32):
            got = float(lsq_gradient_scale(n, bits, signed))
            np.testing.assert_allclose(got, 1.0 / np.sqrt(n * q_p), rtol=2 * ULP32)


def test_lsq_at_32_bits_is_identity_or_relu_and_leaves_the_step_alone():
    v = jnp.linspace(-3.0, 3.0, 61)
    for signed, want in ((True, v), (False, jax.nn.relu(v))):
        out = lsq_quantize(v, 0.1, 32, signed=signed, grad_scale=1.0)
        np.testing.assert_array_equal(out, want)
        ones = jnp.ones_like(v)
        gv, gs = lsq_grads(v, jnp.float32(0.1), jnp.float32(32), ones, signed=signed)
        np.testing.assert_array_equal(gv, np.ones(61) if signed else np.asarray(v) > 0)
        assert float(gs) == 0.0


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_lsq_initial_step(dtype):
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 16)) * 0.1, DTYPES[dtype])
    k64 = np.asarray(kernel.astype(jnp.float32), np.float64)
    traces = []

    @functools.partial(jax.jit, static_argnames=("signed", "axes"))
    def init(v, bits, signed, axes=None):
        traces.append(1)
        return lsq_initial_step(v, bits, signed, axes)

    for bits in (2, 4, 8):
        for signed in (False, True):
            _, q_p = np_lsq_bounds(bits, signed)
            got = init(kernel, jnp.float32(bits), signed=signed)
            np.testing.assert_allclose(got, 2 * np.abs(k64).mean() / np.sqrt(q_p), rtol=1e-6)
            per_channel = init(kernel, jnp.float32(bits), signed=signed, axes=(0, 1, 2))
            assert per_channel.shape == (16,)
            want = 2 * np.abs(k64).reshape(-1, 16).mean(axis=0) / np.sqrt(q_p)
            np.testing.assert_allclose(per_channel, want, rtol=1e-6)
    assert len(traces) == 4  # signed x axes; the bit-width is data


def test_lsq_rescale_keeps_the_range():
    traces = []

    @jax.jit
    def rescale(step, old_bits, new_bits):
        traces.append(1)
        return lsq_rescale_step(step, old_bits, new_bits)

    step = jnp.asarray([0.01, 0.2, 3.0], jnp.float32)
    for old, new in ((8, 4), (4, 2), (2, 4), (3, 3), (5, 1)):
        got = rescale(step, jnp.float32(old), jnp.float32(new))
        np.testing.assert_allclose(
            got, np.asarray(step, np.float64) * (2**old - 1) / (2**new - 1), rtol=2 * ULP32
        )
        np.testing.assert_allclose(got * (2**new - 1), step * (2**old - 1), rtol=4 * ULP32)
    for old, new in ((32, 2), (2, 32), (32, 32)):  # full precision has no range to keep
        np.testing.assert_array_equal(rescale(step, jnp.float32(old), jnp.float32(new)), step)
    assert len(traces) == 1


def test_learned_range_is_positive():
    raw = jnp.asarray([2.0, 1e-3, 0.0, -1e-12, -0.5, -40.0])
    floor = LEARNED_RANGE_FLOOR
    want = np.asarray([2.0, 1e-3, floor, floor, 0.5, 40.0], np.float32)
    np.testing.assert_array_equal(learned_range(raw), want)
    g = jax.grad(lambda r: jnp.sum(learned_range(r) * jnp.arange(1.0, 7.0)))(raw)
    np.testing.assert_array_equal(g, [1.0, 2.0, 0.0, 0.0, -5.0, -6.0])


def test_learned_ranges_stay_positive_under_a_huge_learning_rate():
    """An SGD step large enough to push the raw step and clip through zero (LSQplus#12)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256,)), jnp.float32)
    target = jnp.zeros_like(x)
    params = {"clip": jnp.float32(1.0), "step": jnp.float32(0.1)}
    optimizer = optax.sgd(learning_rate=1e4)
    state = optimizer.init(params)

    def outputs(p):
        scale = lsq_gradient_scale(x.size, 2, True)
        return pact_activation(x, p["clip"], 2), lsq_quantize(
            x, p["step"], 2, signed=True, grad_scale=scale
        )

    def loss(p):
        pact, lsq = outputs(p)
        return jnp.sum((pact - target) ** 2) + jnp.sum((lsq - target) ** 2)

    @jax.jit
    def train_step(p, opt_state):
        grads = jax.grad(loss)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, grads

    crossed = set()
    for _ in range(3):
        params, state, grads = train_step(params, state)
        assert all(np.isfinite(float(g)) for g in grads.values())
        crossed |= {name for name, value in params.items() if float(value) < 0}
        for name, value in params.items():
            assert float(learned_range(value)) > 0, name
        pact, lsq = jax.jit(outputs)(params)
        assert np.all(np.isfinite(pact)) and np.all(pact >= 0)
        assert np.all(np.isfinite(lsq))
    assert crossed == {"clip", "step"}  # the test really pushed both through zero


def test_one_compile_serves_every_bit_width():
    traces = []

    @jax.jit
    def f(x, clip, step, bits):
        traces.append(1)
        scale = lsq_gradient_scale(x.size, bits, False)
        return (
            pact_activation(x, clip, bits),
            lsq_quantize(x, step, bits, signed=False, grad_scale=scale),
            lsq_quantize(x, step, bits, signed=True, grad_scale=scale),
            jax.grad(lambda c: jnp.sum(pact_activation(x, c, bits)))(clip),
            jax.grad(lambda s: jnp.sum(lsq_quantize(x, s, bits, signed=True, grad_scale=scale)))(
                step
            ),
            lsq_initial_step(x, bits, True),
            lsq_rescale_step(step, bits, 2),
        )

    x = jnp.linspace(-2.0, 3.0, 20001)
    distinct = []
    for bits in (2, 4, 8, 32):
        out = f(x, jnp.float32(2.0), jnp.float32(0.1), jnp.float32(bits))
        distinct.append([len(np.unique(np.asarray(o))) for o in out[:3]])
    assert len(traces) == 1 and f._cache_size() == 1
    assert np.all(np.diff(np.asarray(distinct), axis=0) > 0)  # the bit-width really changed


def test_lsq_bounds():
    for bits in (2, 3, 8):
        assert tuple(map(float, lsq_bounds(bits, True))) == np_lsq_bounds(bits, True)
        assert tuple(map(float, lsq_bounds(bits, False))) == np_lsq_bounds(bits, False)


@pytest.mark.parametrize("bad", [1, 1.0])
def test_lsq_weights_need_two_bits(bad):
    with pytest.raises(ValueError, match=r"^quant\.w_bits=1(\.0)? is too few bits for LSQ weights"):
        check_lsq_weight_bits(bad, "quant.w_bits")


def test_lsq_weight_bits_pass_through_check_bits():
    assert check_lsq_weight_bits(2, "w_bits") == 2
    assert check_lsq_weight_bits(32.0, "w_bits") == 32
    with pytest.raises(ValueError, match=r"w_bits='4' is not a valid bit-width"):
        check_lsq_weight_bits("4", "w_bits")
