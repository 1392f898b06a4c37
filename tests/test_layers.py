"""QuantConv and QuantDense against hand-quantized kernels and inputs (NumPy float64, SPEC 1)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbq.quant.layers import QuantConv, QuantDense, activation, full_precision_layer
from lbq.quant.precision import LayerPrecision

BITS = (2, 4, 8, 32)


def np_quantize_unit(z, bits):
    """``Q_k(z) = round((2^k - 1) z) / (2^k - 1)`` in float64; k >= 32 is the identity."""
    if bits >= 32:
        return z
    levels = 2.0**bits - 1
    return np.round(levels * z) / levels


def np_dorefa_weight(w, bits, per_channel):
    """``2 Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` in float64, max over all but the last axis
    when ``per_channel``."""
    w = np.asarray(w, np.float64)
    if bits >= 32:
        return w
    t = np.tanh(w)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    max_abs = np.max(np.abs(t), axis=axes, keepdims=True)
    return 2.0 * np_quantize_unit(t / (2.0 * max_abs) + 0.5, bits) - 1.0


def np_activation(x, bits):
    """``Q_k(clip(x, 0, 1))`` in float64."""
    return np_quantize_unit(np.clip(np.asarray(x, np.float64), 0.0, 1.0), bits)


def precision(w_bits, a_bits, quantize=1.0):
    return LayerPrecision(jnp.float32(w_bits), jnp.float32(a_bits), jnp.float32(quantize))


def init_with_bias(layer, x, seed=0):
    """The layer's variables, with a random (nonzero) bias so that adding it is checked too."""
    variables = flax.core.unfreeze(layer.init(jax.random.key(seed), x))
    params = variables["params"]
    rng = np.random.default_rng(seed)
    params["bias"] = jnp.asarray(rng.normal(size=params["bias"].shape), jnp.float32)
    return variables


def lax_conv(x, kernel, strides, padding):
    """The reference convolution, in float32, on already quantized operands."""
    return jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(kernel, jnp.float32),
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


RNG = np.random.default_rng(0)
IMAGES = RNG.normal(0.4, 0.7, size=(2, 9, 9, 3)).astype(np.float32)  # many values in (0, 1)
FEATURES = RNG.normal(0.4, 0.7, size=(4, 6)).astype(np.float32)
GEOMETRIES = {  # (strides, padding)
    "same-stride2": ((2, 2), "SAME"),
    "explicit-pads": ((1, 1), ((1, 0), (0, 2))),
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("bits", BITS)
def test_conv_equals_lax_conv_on_the_hand_quantized_kernel(bits, per_channel, geometry):
    strides, padding = GEOMETRIES[geometry]
    layer = QuantConv(5, (3, 3), strides, padding, use_bias=True, per_channel=per_channel)
    variables = init_with_bias(layer, IMAGES)
    got = layer.apply(variables, IMAGES, precision(bits, 32))
    params = variables["params"]
    kernel = np_dorefa_weight(params["kernel"], bits, per_channel)
    if bits < 32:
        assert len(np.unique(kernel)) <= 2**bits  # the reference really quantizes
    want = lax_conv(IMAGES, kernel, strides, padding) + params["bias"]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("bits", BITS)
def test_dense_equals_matmul_on_the_hand_quantized_kernel(bits, per_channel):
    layer = QuantDense(3, per_channel=per_channel)
    variables = init_with_bias(layer, FEATURES)
    got = layer.apply(variables, FEATURES, precision(bits, 32))
    params = variables["params"]
    kernel = np_dorefa_weight(params["kernel"], bits, per_channel)
    want = FEATURES.astype(np.float64) @ kernel + np.asarray(params["bias"], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_channel_scales_each_output_channel_by_its_own_max():
    """A kernel whose channels differ in scale: per tensor, the small channel collapses to the
    middle levels; per channel, each channel reaches +-1."""
    layer = QuantDense(2, use_bias=False, per_channel=True)
    kernel = np.stack([np.linspace(-1.0, 1.0, 6), np.linspace(-0.01, 0.01, 6)], axis=1)
    variables = {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    eye = np.eye(6, dtype=np.float32)  # x @ kernel = the quantized kernel itself
    per_channel = np.asarray(layer.apply(variables, eye, precision(2, 32)))
    per_tensor = np.asarray(layer.clone(per_channel=False).apply(variables, eye, precision(2, 32)))
    np.testing.assert_allclose(per_channel, np_dorefa_weight(kernel, 2, True), atol=1e-6)
    np.testing.assert_allclose(per_tensor, np_dorefa_weight(kernel, 2, False), atol=1e-6)
    assert np.abs(per_channel[:, 1]).max() == 1.0
    assert np.abs(per_tensor[:, 1]).max() < 1.0


@pytest.mark.parametrize("w_bits,a_bits", [(4, 2), (2, 4), (8, 32)])
def test_quantize_input_applies_the_activation_quantizer_to_the_input(w_bits, a_bits):
    """Input: ``Q_a(clip(x, 0, 1))`` with the activation bit-width; kernel: the weight bits."""
    conv = QuantConv(4, (3, 3), use_bias=True, quantize_input=True)
    variables = init_with_bias(conv, IMAGES)
    got = conv.apply(variables, IMAGES, precision(w_bits, a_bits))
    params = variables["params"]
    kernel = np_dorefa_weight(params["kernel"], w_bits, False)
    want = lax_conv(np_activation(IMAGES, a_bits), kernel, (1, 1), "SAME") + params["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    dense = QuantDense(3, quantize_input=True)
    variables = init_with_bias(dense, FEATURES)
    got = dense.apply(variables, FEATURES, precision(w_bits, a_bits))
    kernel = np_dorefa_weight(variables["params"]["kernel"], w_bits, False)
    want = np_activation(FEATURES, a_bits) @ kernel + np.asarray(variables["params"]["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_quantize_input_without_a_precision_leaves_the_input_alone():
    conv = QuantConv(4, (3, 3), quantize_input=True)
    variables = conv.init(jax.random.key(0), IMAGES)
    want = lax_conv(IMAGES, variables["params"]["kernel"], (1, 1), "SAME")
    np.testing.assert_allclose(conv.apply(variables, IMAGES), want, rtol=1e-5, atol=1e-5)


def test_switch_zero_gives_the_full_precision_result():
    """quantize=0 at 2 bits: the raw kernel; a quantized input keeps only its clip."""
    switched_off = precision(2, 2, quantize=0.0)
    conv = QuantConv(4, (3, 3), use_bias=True)
    variables = init_with_bias(conv, IMAGES)
    off = conv.apply(variables, IMAGES, switched_off)
    np.testing.assert_array_equal(off, conv.apply(variables, IMAGES, None))
    want = lax_conv(IMAGES, variables["params"]["kernel"], (1, 1), "SAME")
    np.testing.assert_allclose(off, want + variables["params"]["bias"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(off, conv.apply(variables, IMAGES, precision(2, 2)), atol=1e-3)

    dense = QuantDense(3, quantize_input=True)
    variables = init_with_bias(dense, FEATURES)
    got = dense.apply(variables, FEATURES, switched_off)
    params = variables["params"]
    want = np.clip(FEATURES, 0.0, 1.0) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_activation_is_relu_without_precision_and_clip_then_quantize_with_it():
    x = jnp.asarray(np.linspace(-1.5, 1.5, 31), jnp.float32)
    np.testing.assert_array_equal(activation(x, None), np.maximum(np.asarray(x), 0.0))
    np.testing.assert_array_equal(activation(x, full_precision_layer()), np.clip(x, 0.0, 1.0))
    np.testing.assert_allclose(activation(x, precision(32, 2)), np_activation(x, 2), atol=1e-7)


@pytest.mark.parametrize("layer_type", [QuantConv, QuantDense])
def test_bfloat16_layers_compute_in_bfloat16_on_the_quantized_kernel(layer_type):
    """bf16 compute: the reference uses the same bf16-rounded operands; the tolerance is two
    bf16 steps (8 significant bits) at the largest output, for the bf16 roundings in the sum."""
    x = IMAGES if layer_type is QuantConv else FEATURES
    layer = layer_type(4, use_bias=True, quantize_input=True, dtype=jnp.bfloat16)
    variables = init_with_bias(layer, x)
    got = layer.apply(variables, x, precision(2, 4))
    assert got.dtype == jnp.bfloat16

    def bf16(a):
        return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)

    params = variables["params"]
    kernel = bf16(np_dorefa_weight(params["kernel"], 2, False))
    inputs = bf16(np_activation(x, 4))
    if layer_type is QuantConv:
        product = np.asarray(lax_conv(inputs, kernel, (1, 1), "SAME"), np.float64)
    else:
        product = inputs @ kernel
    want = product + bf16(params["bias"])
    tolerance = 2.0**-6 * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tolerance)


@pytest.mark.parametrize("layer_type", [QuantConv, QuantDense])
def test_a_traced_bit_width_change_does_not_recompile(layer_type):
    x = IMAGES if layer_type is QuantConv else FEATURES
    layer = layer_type(4, quantize_input=True)
    variables = layer.init(jax.random.key(0), x)
    traces = []

    @jax.jit
    def apply(variables, x, precision):
        traces.append(1)  # runs once per trace, i.e. once per compilation
        return layer.apply(variables, x, precision)

    settings = [(2, 2, 1.0), (4, 8, 1.0), (8, 4, 1.0), (32, 32, 1.0), (2, 2, 0.0)]
    outputs = [np.asarray(apply(variables, x, precision(*s))) for s in settings]
    assert len(traces) == 1 and apply._cache_size() == 1
    quantized, switched_off = outputs[:-1], outputs[-1]
    for i, a in enumerate(quantized):  # each bit-width really changed the result
        for b in quantized[i + 1 :]:
            assert np.abs(a - b).max() > 1e-4
    np.testing.assert_array_equal(switched_off, outputs[3])  # switch 0 = 32 bits
    np.testing.assert_allclose(outputs[0], layer.apply(variables, x, precision(2, 2)), atol=1e-6)
