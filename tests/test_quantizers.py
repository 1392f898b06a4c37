"""Quantizers against an independent NumPy implementation of the SPEC formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbq.quant import check_bits, quantize_activation, quantize_unit, quantize_weight, round_ste


def np_quantize_unit(z, k):
    levels = 2.0**k - 1
    return np.round(levels * z) / levels


def np_quantize_weight(w, k, per_channel=False):
    t = np.tanh(w)
    if per_channel:
        m = np.abs(t).reshape(-1, t.shape[-1]).max(axis=0)
    else:
        m = np.abs(t).max()
    return 2 * np_quantize_unit(t / (2 * m) + 0.5, k) - 1


def np_quantize_activation(a, k):
    return np_quantize_unit(np.clip(a, 0, 1), k)


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantizers_match_numpy(bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
    a = rng.uniform(-0.5, 1.5, size=(1000,)).astype(np.float32)
    wq = np.asarray(quantize_weight(jnp.asarray(w), bits))
    aq = np.asarray(quantize_activation(jnp.asarray(a), bits))
    np.testing.assert_allclose(wq, np_quantize_weight(w, bits), atol=1e-6)
    np.testing.assert_allclose(aq, np_quantize_activation(a, bits), atol=1e-6)
    assert len(np.unique(wq)) <= 2**bits
    assert len(np.unique(aq)) <= 2**bits
    assert wq.min() >= -1 and wq.max() <= 1


def test_per_channel_weights_match_numpy():
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32)
    w[..., 0] *= 0.01  # a channel whose per-tensor scale would waste most levels
    got = np.asarray(quantize_weight(jnp.asarray(w), 2, per_channel=True))
    np.testing.assert_allclose(got, np_quantize_weight(w, 2, per_channel=True), atol=1e-6)
    assert len(np.unique(got[..., 0])) > 1


def test_32_bits_is_full_precision():
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
    a = jnp.linspace(-2, 2, 101)
    np.testing.assert_array_equal(quantize_weight(w, 32), w)
    np.testing.assert_array_equal(quantize_activation(a, 32), jnp.clip(a, 0, 1))


def test_round_ste_gradient_is_identity():
    x = jnp.linspace(-3, 3, 13)
    g = jax.grad(lambda v: jnp.sum(round_ste(v) * jnp.arange(13.0)))(x)
    np.testing.assert_array_equal(g, jnp.arange(13.0))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activation_gradient_is_straight_through_inside_unit_interval(bits):
    a = jnp.array([-1.0, -0.01, 0.2, 0.5, 0.77, 0.99, 1.01, 3.0])
    g = jax.grad(lambda v: jnp.sum(quantize_activation(v, bits)))(a)
    np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 1, 0, 0])


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
