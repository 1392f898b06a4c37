"""DoReFa quantizers (SPEC section 1) against float64 NumPy and exact rational references.

The references: the level index from float64 arithmetic (exact for these inputs: a product
of a <= 24-bit input and an 8-bit level count), and the nearest value of each dtype to each
exact level, found with `fractions.Fraction`.
"""

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lbq.quant import check_bits, quantize_activation, quantize_unit, quantize_weight, round_ste

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BITS = range(1, 9)
ULP32 = 2.0**-23
_UINT = {2: np.uint16, 4: np.uint32}


def nearest_in_dtype(value: Fraction, dtype) -> float:
    """The value of ``dtype`` nearest to ``value`` (ties to even), found exactly."""
    dtype = np.dtype(dtype)
    guess = np.asarray(float(value)).astype(dtype)
    bits = guess.view(_UINT[dtype.itemsize])
    neighbours = np.asarray([bits - 1, bits, bits + 1], _UINT[dtype.itemsize]).view(dtype)
    finite = [c for c in neighbours if np.isfinite(c)]
    best = min(abs(Fraction(float(c)) - value) for c in finite)
    winners = [c for c in finite if abs(Fraction(float(c)) - value) == best]
    even = [c for c in winners if int(np.asarray(c).view(_UINT[dtype.itemsize])) % 2 == 0]
    return float((even or winners)[0])


@functools.cache
def level_values(bits: int, dtype, signed: bool) -> np.ndarray:
    """Nearest ``dtype`` value of every exact level: n / L, or (2n - L) / L for weights."""
    count = 2**bits - 1
    exact = [Fraction(2 * n - count if signed else n, count) for n in range(count + 1)]
    return np.asarray([nearest_in_dtype(v, dtype) for v in exact])


def ulp32(x) -> np.ndarray:
    return np.abs(np.spacing(np.asarray(x, np.float32)))


def np_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)


def every_value_in(dtype, low: float, high: float) -> np.ndarray:
    """Every finite value of a 16-bit float dtype in [low, high]."""
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np_dtype(dtype))
    with np.errstate(invalid="ignore"):  # the NaN bit patterns
        as64 = values.astype(np.float64)
    return values[np.isfinite(as64) & (as64 >= low) & (as64 <= high)]


def near_level_boundaries(bits_range, ulps: int = 3) -> np.ndarray:
    """float32 inputs within a few ulps of each boundary (n + 1/2) / (2^k - 1)."""
    points = []
    for bits in bits_range:
        count = 2**bits - 1
        boundary = ((np.arange(count) + 0.5) / count).astype(np.float32)
        for step in range(-ulps, ulps + 1):
            points.append(boundary + np.float32(step) * np.spacing(boundary))
    return np.concatenate(points)


_activation = jax.jit(quantize_activation)


def check_activation_levels(a: np.ndarray, dtype, bits: int) -> None:
    got = np.asarray(_activation(jnp.asarray(a, dtype), jnp.float32(bits)).astype(jnp.float32))
    count = 2**bits - 1
    index = np.round(np.clip(np.asarray(a, np.float64), 0, 1) * count).astype(int)
    if dtype == jnp.float32:
        # float32 levels come out as n * fl(1/L) (XLA turns a division by a broadcast scalar
        # into a multiplication); they must still be the exact level, within one ulp.
        exact = index / count
        assert np.all(np.abs(got - exact) <= ulp32(exact))
        np.testing.assert_array_equal(np.round(got.astype(np.float64) * count), index)
    else:
        np.testing.assert_array_equal(got, level_values(bits, np_dtype(dtype), False)[index])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_activation_gives_the_exact_level_for_every_16_bit_input(dtype):
    a = every_value_in(DTYPES[dtype], -0.25, 1.25)
    assert a.size > 20_000
    for bits in BITS:
        check_activation_levels(a, DTYPES[dtype], bits)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_activation_gives_the_exact_level_near_every_boundary(dtype):
    a = near_level_boundaries(BITS)
    rng = np.random.default_rng(0)
    a = np.concatenate([a, rng.uniform(-0.25, 1.25, 100_000).astype(np.float32)])
    a = a.astype(np_dtype(DTYPES[dtype]))
    for bits in BITS:
        check_activation_levels(a, DTYPES[dtype], bits)


@pytest.mark.parametrize(
    "value, dtype, bits, level",
    [
        (0.1669921875, "bfloat16", 2, Fraction(1, 3)),  # bfloat16 product rounded to 0.5: level 0
        (0.6328125, "bfloat16", 4, Fraction(9, 15)),  # bfloat16 product rounded to 10: 0.668
        (13981014 * 2.0**-24, "float32", 2, Fraction(3, 3)),  # 3z = 2.5 + 2^-23 rounds to 2.5
    ],
)
def test_activation_regressions_pick_the_exact_level(value, dtype, bits, level):
    a = jnp.asarray([value], DTYPES[dtype])
    assert float(a[0]) == value  # the input is exactly representable
    got = float(quantize_activation(a, bits)[0])
    assert got == nearest_in_dtype(level, np_dtype(DTYPES[dtype]))
    assert float(_activation(a, jnp.float32(bits))[0]) == got


def test_unit_quantizer_counts_levels_exactly_at_every_bit_width():
    """2^k - 1 is exact: XLA's exp2(13) is 8191.999, which made round(1 * L) / L != 1."""
    ones, halves = jnp.ones(3), jnp.full(3, 0.5)
    for bits in range(1, 32):
        assert np.all(np.asarray(quantize_unit(ones, bits)) == 1.0), bits
        assert np.all(np.asarray(jax.jit(quantize_unit)(ones, jnp.float32(bits))) == 1.0), bits
        want = round(0.5 * (2 ** min(bits, 24) - 1)) / (2 ** min(bits, 24) - 1)
        np.testing.assert_allclose(quantize_unit(halves, bits), want, rtol=ULP32)


def np_weight_levels(w: np.ndarray, bits: int, per_channel: bool):
    """float64 reference: level index and the distance (in levels) of the pre-rounding value
    from the nearest rounding boundary."""
    t = np.tanh(w.astype(np.float64))
    if per_channel:
        m = np.abs(t).reshape(-1, t.shape[-1]).max(axis=0)
    else:
        m = np.abs(t).max()
    pre = (t / (2 * m) + 0.5) * (2**bits - 1)
    return np.round(pre).astype(int), np.abs(pre - np.floor(pre) - 0.5)


_weight = jax.jit(quantize_weight, static_argnums=2)

# float32 weights are 2 (n / L) - 1 with n / L computed as n fl(1/L) (XLA): two roundings of
# a value below 1, doubled, then the subtraction's own rounding.
WEIGHT_LEVEL_ERROR_32 = 2.0**-22 + 2.0**-24


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_gives_the_exact_level(dtype, per_channel):
    """Exact except where float64's pre-rounding value is within float32 rounding (tanh,
    quotient, product: 8 float32 ulps of the level count) of a rounding boundary. Those are
    counted: no more than twice as many as such a band holds on average."""
    rng = np.random.default_rng(1)
    kernels = [rng.normal(size=(3, 3, 16, 32)) * scale for scale in (0.02, 0.3, 1.0, 3.0)]
    near_total = expected = 0.0
    for kernel in kernels:
        w = np.asarray(jnp.asarray(kernel, DTYPES[dtype]).astype(jnp.float32))
        for bits in BITS:
            got = _weight(jnp.asarray(w, DTYPES[dtype]), jnp.float32(bits), per_channel)
            got = np.asarray(got.astype(jnp.float32))
            index, distance = np_weight_levels(w, bits, per_channel)
            band = 8 * ULP32 * (2**bits - 1)
            near = distance < band
            want = level_values(bits, np_dtype(DTYPES[dtype]), True)[index]
            if dtype == "float32":  # 2 (n / L) - 1 in float32: see WEIGHT_LEVEL_ERROR_32
                far = ~near & (np.abs(got - want) > WEIGHT_LEVEL_ERROR_32)
            else:
                far = ~near & (got != want)
            assert not far.any(), (bits, w[far][:3], got[far][:3], want[far][:3])
            near_total += int(near.sum())
            expected += 2 * band * w.size  # boundaries are one level apart
    assert near_total <= 2 * expected + 10, (near_total, expected)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weight_outputs_every_level_as_the_nearest_value(dtype):
    """Every level 0..2^k - 1 of a kernel spanning them all comes out as the nearest value of
    the dtype to (2n - L) / L (float32: within WEIGHT_LEVEL_ERROR_32)."""
    for bits in BITS:
        count = 2**bits - 1
        # tanh is odd and increasing; this kernel's normalised values are the exact levels,
        # repeated to one shape for every bit-width (one compile).
        targets = (2 * np.arange(count + 1) - count) / count
        w = np.resize(np.arctanh(targets * np.tanh(1.0)), 256)
        w = jnp.asarray(w, DTYPES[dtype])
        got = np.asarray(_weight(w, jnp.float32(bits), False).astype(jnp.float32))
        index, _ = np_weight_levels(np.asarray(w.astype(jnp.float32), np.float64), bits, False)
        want = level_values(bits, np_dtype(DTYPES[dtype]), True)[index]
        if dtype == "float32":
            assert np.all(np.abs(got - want) <= WEIGHT_LEVEL_ERROR_32)
        else:
            np.testing.assert_array_equal(got, want)


def test_per_channel_weights_match_numpy():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32)
    w[..., 0] *= 0.01  # a channel whose per-tensor scale would waste most levels
    got = np.asarray(quantize_weight(jnp.asarray(w), 2, per_channel=True))
    index, _ = np_weight_levels(w, 2, per_channel=True)
    np.testing.assert_allclose(got, (2 * index - 3) / 3, rtol=2 * ULP32)
    assert len(np.unique(got[..., 0])) > 1


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_32_bits_is_full_precision(dtype):
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4)).astype(DTYPES[dtype])
    a = jnp.linspace(-2, 2, 101).astype(DTYPES[dtype])
    for bits in (32, 40):
        np.testing.assert_array_equal(quantize_weight(w, bits), w)
        np.testing.assert_array_equal(quantize_activation(a, bits), jnp.clip(a, 0, 1))
        assert quantize_weight(w, bits).dtype == w.dtype
        assert quantize_activation(a, bits).dtype == a.dtype


def test_round_ste_gradient_is_identity():
    x = jnp.linspace(-3, 3, 13)
    g = jax.grad(lambda v: jnp.sum(round_ste(v) * jnp.arange(13.0)))(x)
    np.testing.assert_array_equal(g, jnp.arange(13.0))


@jax.jit
def _activation_grad(a, bits, cotangent):
    return jax.grad(lambda v: jnp.sum(quantize_activation(v, bits) * cotangent))(a)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_activation_gradient_is_straight_through_on_the_closed_unit_interval(dtype, bits):
    """Both bounds pass the gradient (as torch.clamp and tf.clip_by_value); jnp.clip gave 1/2."""
    a = jnp.asarray([-1.0, -0.01, -1e-30, 0.0, 1e-30, 0.2, 0.5, 0.99, 1.0, 1.01, 3.0], dtype)
    cotangent = jnp.arange(1.0, 12.0)
    g = _activation_grad(a, jnp.float32(bits), cotangent)
    assert g.dtype == a.dtype
    inside = (np.asarray(a, np.float64) >= 0) & (np.asarray(a, np.float64) <= 1)
    # (g / L) L, as round_ste's autodiff computes it: within an ulp of the cotangent.
    want = np.where(inside, cotangent, 0)
    np.testing.assert_allclose(np.asarray(g, np.float32), want, rtol=2 * ULP32, atol=0)
    assert inside.sum() == 6  # 0, 1e-30, 0.2, 0.5, 0.99 and 1: both bounds are in


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_gradient_is_autograd_with_round_as_identity(per_channel):
    """Hand derivation: with round replaced by the identity, w_q = tanh(w) / max|tanh(w)|."""
    w = jax.random.normal(jax.random.key(3), (3, 3, 2, 4))
    cotangent = jax.random.normal(jax.random.key(4), w.shape)

    def reference(v):
        t = jnp.tanh(v)
        axes = (0, 1, 2) if per_channel else None
        return t / jnp.max(jnp.abs(t), axis=axes, keepdims=per_channel)

    got = jax.grad(lambda v: jnp.sum(quantize_weight(v, 2, per_channel) * cotangent))(w)
    want = jax.grad(lambda v: jnp.sum(reference(v) * cotangent))(w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnums=2)
def weight_grad(w, bits, per_channel, cotangent):
    return jax.grad(lambda v: jnp.sum(quantize_weight(v, bits, per_channel) * cotangent))(w)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
def test_zero_kernel_has_the_straight_through_gradient(dtype, bits):
    """Issue 14 item 1: this was NaN everywhere. A zero kernel has no scale to differentiate;
    it gets d w_q / d w = 1 - tanh(w)^2 = 1 and quantizes to level round(L / 2)."""
    w = jnp.zeros((3, 3, 4, 8), DTYPES[dtype])
    cotangent = jax.random.normal(jax.random.key(0), w.shape).astype(DTYPES[dtype])
    for per_channel in (False, True):
        g = weight_grad(w, jnp.float32(bits), per_channel, cotangent)
        assert g.dtype == w.dtype
        # (g / L) L, as round_ste's autodiff computes it: within an ulp of the cotangent.
        np.testing.assert_allclose(
            g.astype(jnp.float32), cotangent.astype(jnp.float32), rtol=2 * ULP32
        )
    if bits < 32:
        index = round((2**bits - 1) / 2)  # Python rounds half to even, as jnp.round does
        want = level_values(bits, np_dtype(DTYPES[dtype]), True)[index]
        got = np.asarray(_weight(w, jnp.float32(bits), False).astype(jnp.float32))
        tolerance = WEIGHT_LEVEL_ERROR_32 if dtype == "float32" else 0.0
        assert np.all(np.abs(got - want) <= tolerance)


def test_zero_channel_keeps_the_other_channels_gradients():
    w = np.random.default_rng(2).normal(size=(3, 3, 4, 8)).astype(np.float32)
    w[..., 3] = 0.0
    cotangent = np.random.default_rng(3).normal(size=w.shape).astype(np.float32)
    got = np.asarray(weight_grad(jnp.asarray(w), jnp.float32(2), True, cotangent))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[..., 3], cotangent[..., 3], rtol=2 * ULP32)
    others = np.delete(np.arange(8), 3)
    alone = weight_grad(jnp.asarray(w[..., others]), jnp.float32(2), True, cotangent[..., others])
    np.testing.assert_array_equal(got[..., others], np.asarray(alone))


@pytest.mark.parametrize("per_channel", [False, True])
def test_underflowing_kernels_keep_exact_levels_and_finite_gradients(per_channel):
    """max|tanh(w)| below sqrt(tiny) = 2^-63: levels as for the same kernel scaled by a power of
    two into normal range (tanh(x) = x there, so the exact levels are the same), and the
    straight-through gradient. Just above 2^-63 autodiff's own (huge, finite) gradient."""
    w = np.random.default_rng(4).normal(size=(3, 3, 4, 8)).astype(np.float32)
    cotangent = np.ones_like(w)
    two = jnp.float32(2)
    reference = _weight(jnp.asarray(w * 2.0**-40), two, per_channel)
    for exponent in (-100, -110):  # every element stays a normal number
        tiny = jnp.asarray(w * np.float32(2.0**exponent))
        np.testing.assert_array_equal(_weight(tiny, two, per_channel), reference)
        g = weight_grad(tiny, two, per_channel, cotangent)
        np.testing.assert_allclose(g, cotangent, rtol=2 * ULP32)
    for exponent in (-62, -140):  # -140: subnormal, read as zero
        g = weight_grad(jnp.asarray(w * np.float32(2.0**exponent)), two, per_channel, cotangent)
        assert np.all(np.isfinite(g)), exponent


def test_traced_bits_compile_once():
    traces = []

    @jax.jit
    def f(w, a, bits):
        traces.append(1)
        return quantize_weight(w, bits), quantize_activation(a, bits)

    w = jax.random.normal(jax.random.key(0), (8, 8))
    a = jnp.linspace(-1, 2, 50)
    levels = []
    for bits in (2, 4, 8, 32):
        _, aq = f(w, a, jnp.float32(bits))
        levels.append(len(np.unique(np.asarray(aq))))
    assert len(traces) == 1
    assert f._cache_size() == 1
    assert levels[0] < levels[1] < levels[3]  # the bit-width really changed


def test_unit_quantizer_at_24_bits_and_zero_kernel_are_finite():
    z = jnp.linspace(0, 1, 7)
    assert np.all(np.isfinite(quantize_unit(z, 31)))
    assert np.all(np.isfinite(quantize_weight(jnp.zeros((3, 3)), 2)))


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, "4", None, True])
def test_check_bits_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"w_bits=.*1\.\.32"):
        check_bits(bad, "w_bits")


def test_check_bits_accepts_whole_numbers():
    assert check_bits(4.0, "a_bits") == 4
    assert check_bits(32, "a_bits") == 32
