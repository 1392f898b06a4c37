"""Learned quantizer ranges (PACT, LSQ; SPEC section 7), their calibration and BatchNorm
re-estimation.

The layers are checked against NumPy float64 references in float32 and bfloat16; LSQ's
dynamics under the range parametrisation against LSQ on the step itself (optax SGD); one
compile for every quantizer; calibration and re-estimation against NumPy on the tensors that
Flax shows; bad configs; and tiny runs of the quantizer configs, with joint distillation,
stochastic precision, progressive stages and a resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import REPO, tiny_config

from lbq import calibrate, resume
from lbq.configs import default
from lbq.data import get_info
from lbq.mesh import data_mesh
from lbq.models import get_model
from lbq.plan import parse_config
from lbq.quant.layers import (
    LayerPrecision,
    QuantActivation,
    QuantConv,
    QuantDense,
    lsq_range_quantize,
    merge_learned_ranges,
    split_learned_ranges,
)
from lbq.quant.precision import Precision, make_precision
from lbq.quant.quantizers import lsq_gradient_scale, lsq_quantize, lsq_rescale_step
from lbq.stages import lay_out
from lbq.steps import normalize
from lbq.trainer import build_trainer, load_into
from lbq.validate import ConfigError

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

BITS = (2, 4, 8, 32)
RNG = np.random.default_rng(0)
X = RNG.normal(0.5, 1.5, size=(4, 40)).astype(np.float32)  # activations, beyond every range
GOLDEN_RUN = os.path.join(REPO, "tests", "golden", "resume_run")  # a DoReFa resnet20 run


def precision(w_bits, a_bits, quantize=1.0):
    return LayerPrecision(jnp.float32(w_bits), jnp.float32(a_bits), jnp.float32(quantize))


def np_pact(x, clip, bits):
    """PACT (Choi et al., eqs. 1-2) in float64: clip to [0, alpha], then 2^k - 1 levels."""
    y = np.clip(np.asarray(x, np.float64), 0.0, clip)
    if bits >= 32:
        return y
    n = 2.0**bits - 1
    return np.round(y * n / clip) * clip / n


def np_lsq(v, value_range, bits, signed):
    """LSQ (Esser et al., eq. 1) in float64 with step ``range / (2^b - 1)``; per output channel
    when ``value_range`` is a vector (channels on the last axis)."""
    v = np.asarray(v, np.float64)
    if bits >= 32:
        return v if signed else np.maximum(v, 0.0)
    levels = 2.0**bits - 1
    q_n, q_p = (2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1) if signed else (0.0, levels)
    step = np.asarray(value_range, np.float64) / levels
    return np.round(np.clip(v / step, -q_n, q_p)) * step


def as_bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


# ---------------------------------------------------------------------- layers vs NumPy


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("quantizer", ["pact", "lsq"])
def test_activation_quantizers_match_numpy(quantizer, dtype):
    layer = QuantActivation(quantizer, init_range=2.7)
    x = jnp.asarray(X, dtype)
    variables = layer.init(jax.random.key(0), x, precision(32, 2))
    (name,) = variables["params"]
    assert name == {"pact": "clip", "lsq": "range"}[quantizer]
    reference = np_pact if quantizer == "pact" else lambda x, r, b: np_lsq(x, r, b, False)
    for bits in BITS:
        got = layer.apply(variables, x, precision(32, bits))
        assert got.dtype == dtype
        want = reference(np.asarray(x.astype(jnp.float32)), 2.7, bits)
        if dtype == jnp.bfloat16:
            np.testing.assert_allclose(np.asarray(got, np.float64), as_bf16(want), atol=2**-7)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        if bits < 32:
            assert len(np.unique(np.asarray(got))) <= 2**bits  # the reference really quantizes
    # A switched-off unit (stochastic precision) is the 32-bit one: PACT keeps its clip.
    off = layer.apply(variables, x, precision(32, 2, quantize=0.0))
    np.testing.assert_array_equal(off, layer.apply(variables, x, precision(32, 32)))
    if quantizer == "pact":
        assert float(jnp.max(off)) == pytest.approx(2.7, rel=2**-8)  # bf16: 8 bits


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_lsq_weights_match_numpy(per_channel, dtype):
    dense = QuantDense(3, per_channel=per_channel, weight_quantizer="lsq", dtype=dtype)
    variables = dense.init(jax.random.key(1), X, precision(2, 32))
    params = dict(variables["params"])
    value_range = np.asarray([0.9, 1.7, 0.4]) if per_channel else np.asarray(1.3)
    params["weight_range"] = jnp.asarray(value_range, jnp.float32)
    params["bias"] = jnp.asarray(RNG.normal(size=3), jnp.float32)
    kernel = np.asarray(params["kernel"], np.float64)
    for bits in BITS:
        got = dense.apply({"params": params}, X, precision(bits, 32))
        grid = np_lsq(kernel, value_range, bits, True)
        if dtype == jnp.bfloat16:
            want = as_bf16(X) @ as_bf16(grid) + as_bf16(params["bias"])
            np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=0.1)
        else:
            want = X.astype(np.float64) @ grid + np.asarray(params["bias"], np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    conv = QuantConv(3, (3, 3), per_channel=per_channel, weight_quantizer="lsq")
    images = RNG.normal(size=(2, 6, 6, 4)).astype(np.float32)
    variables = conv.init(jax.random.key(2), images, precision(4, 32))
    kernel = np_lsq(variables["params"]["kernel"], variables["params"]["weight_range"], 4, True)
    want = jax.lax.conv_general_dilated(
        images, jnp.asarray(kernel, jnp.float32), (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    got = conv.apply(variables, images, precision(4, 32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lsq_weight_range_starts_by_lsqs_rule_at_the_initial_bit_width():
    """``r = (2^b - 1) 2 mean|w| / sqrt(Q_P)``; a full-precision init uses 2 bits."""
    for bits, rule_bits in ((4, 4), (32, 2)):
        dense = QuantDense(5, weight_quantizer="lsq")
        params = dense.init(jax.random.key(3), X, precision(bits, 32))["params"]
        q_p = 2.0 ** (rule_bits - 1) - 1
        want = (2.0**rule_bits - 1) * 2 * np.mean(np.abs(params["kernel"])) / math.sqrt(q_p)
        assert float(params["weight_range"]) == pytest.approx(want, rel=1e-6)


def test_dorefa_networks_keep_their_parameters_and_pact_lsq_add_one_range_per_quantizer():
    x = jnp.zeros((1, 32, 32, 3))
    trees = {}
    for w, a in (("dorefa", "dorefa"), ("lsq", "pact"), ("dorefa", "lsq")):
        model = get_model("resnet20", num_classes=10, weight_quantizer=w, activation_quantizer=a)
        shapes = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), x, make_precision(m.layer_names(), 2, 2))
        )
        trees[w, a] = shapes["params"]
    plain = get_model("resnet20", num_classes=10, quantized=False)
    fp_shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x))["params"]
    assert jax.tree.structure(trees["dorefa", "dorefa"]) == jax.tree.structure(fp_shapes)
    rest, ranges = split_learned_ranges(trees["lsq", "pact"])
    assert jax.tree.structure(rest) == jax.tree.structure(fp_shapes)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(ranges)[0]]
    assert sum(n.endswith("['weight_range']") for n in names) == 18  # one per quantized conv
    assert sum(n.endswith("['clip']") for n in names) == 18  # stem + 2 per block - the last
    assert len(jax.tree.leaves(split_learned_ranges(trees["dorefa", "lsq"])[1])) == 18
    merged = merge_learned_ranges(rest, ranges)
    assert jax.tree.structure(merged) == jax.tree.structure(trees["lsq", "pact"])


# ------------------------------------------------------------------- range carry-over


@pytest.mark.parametrize("quantizer", ["pact", "lsq"])
def test_a_bit_width_change_keeps_the_range_and_rescales_lsqs_step(quantizer):
    """The learned parameter is the range: at any bit-width the outputs span [0, r], and the
    step goes from r/15 at 4 bits to r/3 at 2 bits, SPEC 7's rescale (`lsq_rescale_step`)."""
    layer = QuantActivation(quantizer, init_range=1.8)
    x = jnp.linspace(-1.0, 3.0, 4001)
    variables = layer.init(jax.random.key(0), x, precision(32, 4))
    steps = {}
    for bits in (4, 2):
        levels = np.unique(np.asarray(layer.apply(variables, x, precision(32, bits))))
        assert levels.max() == pytest.approx(1.8, rel=1e-6)
        steps[bits] = float(np.min(np.diff(levels)))
    assert steps[2] == pytest.approx(float(lsq_rescale_step(steps[4], 4, 2)), rel=1e-5)
    assert steps[2] == pytest.approx(1.8 / 3, rel=1e-5)


def test_lsq_weight_steps_follow_the_rescale_rule_between_bit_widths():
    dense = QuantDense(1, use_bias=False, weight_quantizer="lsq")
    kernel = jnp.linspace(-2.0, 2.0, 2001)[:, None]
    params = {"kernel": kernel, "weight_range": jnp.float32(2.1)}
    eye = jnp.eye(2001)
    steps = {}
    for bits in (8, 4, 2):
        levels = np.unique(np.asarray(dense.apply({"params": params}, eye, precision(bits, 32))))
        assert len(levels) == 2**bits  # -Q_N .. Q_P
        steps[bits] = float(np.min(np.diff(levels)))
    for old, new in ((8, 4), (4, 2)):
        assert steps[new] == pytest.approx(float(lsq_rescale_step(steps[old], old, new)), rel=1e-5)


# ------------------------------------------------------------- LSQ's dynamics, exactly


@pytest.mark.parametrize("signed", [True, False], ids=["weights", "activations"])
def test_sgd_on_the_range_is_lsqs_sgd_on_the_step(signed):
    """Two steps of the optimizer lbq builds (weight decay, Nesterov momentum, lr) on ``r``
    give ``(2^b - 1)`` times the same steps of LSQ on ``s`` (Esser et al., gradient scale g)."""
    bits, num_features = 3, X.size
    levels = 2.0**bits - 1
    target = jnp.asarray(RNG.normal(size=X.shape), jnp.float32)

    def loss(quantized):
        return jnp.sum((quantized - target) ** 2)

    def on_range(params):
        q = lsq_range_quantize(X, params, bits, signed=signed, num_features=num_features)
        return loss(q)

    def on_step(params):
        g = lsq_gradient_scale(num_features, bits, signed)
        return loss(lsq_quantize(X, params, bits, signed=signed, grad_scale=g))

    optimizer = optax.chain(
        optax.add_decayed_weights(1e-2), optax.trace(0.9, nesterov=True), optax.scale(-0.05)
    )
    value_range = jnp.float32(2.5)
    step = value_range / levels
    range_state, step_state = optimizer.init(value_range), optimizer.init(step)
    for _ in range(2):
        grad = jax.grad(on_range)(value_range)
        updates, range_state = optimizer.update(grad, range_state, value_range)
        value_range = optax.apply_updates(value_range, updates)
        updates, step_state = optimizer.update(jax.grad(on_step)(step), step_state, step)
        step = optax.apply_updates(step, updates)
    assert abs(float(step) - 2.5 / levels) > 1e-3  # it learned
    assert float(value_range) / levels == pytest.approx(float(step), rel=1e-5)


@pytest.mark.parametrize("quantizer", ["pact", "lsq", "lsq_weights"])
def test_a_range_pushed_through_zero_stays_positive_and_keeps_learning(quantizer):
    """An SGD step with a learning rate 1.5 / gradient drives the raw parameter from 1 to -0.5;
    the range acts as its magnitude (floored at 1e-8): the outputs are those of range 0.5, and
    the gradient still shrinks the range (it is the mirror image of range 0.5's)."""
    if quantizer == "lsq_weights":
        layer, name = QuantDense(4, use_bias=False, weight_quantizer="lsq"), "weight_range"
        at = precision(2, 32)
    else:
        layer = QuantActivation(quantizer, init_range=1.0)
        name, at = {"pact": "clip", "lsq": "range"}[quantizer], precision(32, 2)
    params = {**layer.init(jax.random.key(0), X, at)["params"], name: jnp.float32(1.0)}

    def loss(params):
        return jnp.sum(layer.apply({"params": params}, X, at) ** 2)  # wants a small range

    gradient = float(jax.grad(loss)(params)[name])
    assert gradient > 0
    params = {**params, name: params[name] - (1.5 / gradient) * gradient}
    assert float(params[name]) == pytest.approx(-0.5)
    out = layer.apply({"params": params}, X, at)
    mirrored = {**params, name: jnp.float32(0.5)}
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(out, layer.apply({"params": mirrored}, X, at))
    pushed, mirror = jax.grad(loss)(params)[name], jax.grad(loss)(mirrored)[name]
    assert float(mirror) > 0 and float(pushed) == -float(mirror)


# ------------------------------------------------------------------ one compile for all


@pytest.mark.parametrize(
    ("weights", "activations"),
    [("dorefa", "pact"), ("dorefa", "lsq"), ("lsq", "dorefa"), ("lsq", "pact"), ("lsq", "lsq")],
)
def test_bit_widths_and_masks_never_recompile_the_gradient(weights, activations):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, p):
            x = QuantConv(4, (3, 3), weight_quantizer=weights, name="conv")(x, p)
            x = calibrate_free_activation(activations, x, p)
            return QuantDense(2, weight_quantizer=weights, name="dense")(x.reshape(2, -1), p)

    images = jnp.asarray(RNG.normal(size=(2, 5, 5, 3)), jnp.float32)
    net = Net()
    variables = net.init(jax.random.key(0), images, precision(2, 2))
    traces = []

    @jax.jit
    def grad(variables, p):
        traces.append(1)
        return jax.grad(lambda v: jnp.sum(net.apply(v, images, p) ** 2))(variables)

    settings = [(2, 2, 1.0), (4, 4, 1.0), (8, 8, 1.0), (32, 32, 1.0), (2, 2, 0.0), (4, 8, 1.0)]
    grads = [grad(variables, precision(*s)) for s in settings]
    assert len(traces) == 1 and grad._cache_size() == 1
    flat = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(x)]) for x in grads]
    for i in range(3):  # each bit-width really changed the computation
        assert np.abs(flat[i] - flat[i + 1]).max() > 1e-6
    np.testing.assert_array_equal(flat[4], flat[3])  # switch 0 = 32 bits


def calibrate_free_activation(quantizer, x, p):
    if quantizer == "dorefa":
        from lbq.quant.layers import activation

        return activation(x, p)
    return QuantActivation(quantizer, init_range=3.0, name="act")(x, p)


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant.weight_quantizer": "pact"}, "quant.weight_quantizer='pact' is not one of"),
        ({"quant.activation_quantizer": "apot"}, "quant.activation_quantizer='apot' is not"),
        ({"quant.pact_init_clip": 0.0}, "quant.pact_init_clip=0.0 must be > 0"),
        ({"quant.pact_init_clip": -1.0}, "quant.pact_init_clip=-1.0 must be > 0"),
        ({"quant.calibration_percentile": 0.0}, "quant.calibration_percentile=0.0 must be in"),
        ({"quant.calibration_batches": 0}, "quant.calibration_batches=0 must be >= 1"),
        ({"quant.activation_calibration": "max"}, "quant.activation_calibration='max'"),
        ({"eval.recalibrate_bn_batches": -1}, "eval.recalibrate_bn_batches=-1 must be >= 0"),
        ({"eval.recalibrate": 2}, "eval.recalibrate is not a config field"),
        (
            {"quant.weight_range_at_bit_change": "lsq"},
            "quant.weight_range_at_bit_change='lsq' is not one of",
        ),
        (
            {"quant.weight_quantizer": "lsq", "quant.w_bits": 1},
            "quant.w_bits=1 is too few bits for LSQ weights",
        ),
        (
            {"quant.activation_range_at_bit_change": "lsq_rule"},
            "quant.activation_range_at_bit_change='lsq_rule' is not one of",
        ),
        (
            {"model.activation_placement": "conv_output"},
            "model.activation_placement='conv_output' is not one of",
        ),
    ],
)
def test_bad_quantizer_fields_name_the_field(change, message):
    config = tiny_config()
    for field, value in change.items():
        section, name = field.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        parse_config(config)


def test_lsq_weight_bits_below_two_name_the_stage_block_or_student():
    config = tiny_config()
    config.quant.weight_quantizer = "lsq"
    config.stages = [default.stage("a", steps=1, w_bits=1)]
    with pytest.raises(ConfigError, match=r"^stages\[0\] \(a\)\.w_bits=1 is too few bits"):
        parse_config(config)
    config.stages = [default.stage("a", steps=1, block_bits={"stage1_block0": (1, 4)})]
    with pytest.raises(ConfigError, match=r"^stages\[0\] \(a\)\.block_bits\['stage1_block0'\]=1"):
        parse_config(config)
    config.stages = [default.stage("a", steps=1, w_bits=32)]  # 32 bits: full precision
    config.distill.enabled = True
    config.distill.extra_students = ((1, 4),)
    with pytest.raises(ConfigError, match=r"^distill\.extra_students\[0\]=1 is too few bits"):
        parse_config(config)
    config.quant.weight_quantizer = "dorefa"
    parse_config(config)  # DoReFa takes 1 bit


# ------------------------------------------------------------------------ calibration


@pytest.fixture(scope="module")
def lsq_pact():
    """A trainer (LSQ weights, PACT activations, one W4A2 stage, on the digits data) and a
    fresh state, shared by the calibration and re-estimation tests."""
    config = tiny_config()
    config.quant.weight_quantizer, config.quant.activation_quantizer = "lsq", "pact"
    config.quant.calibration_batches = 2
    config.quant.activation_calibration = "percentile"
    config.quant.calibration_percentile = 99.0
    config.eval.recalibrate_bn_batches = 2
    config.stages = [default.stage("a", steps=1, w_bits=4, a_bits=2)]
    plan = parse_config(config)
    trainer = build_trainer(plan, get_info(plan.data), data_mesh(1), donate=False)
    return trainer, trainer.init_state()


def _fp_outputs(params, batch_stats, images, names):
    """The outputs of BatchNorm layers ``names`` in the plain-ReLU network (Flax's
    capture_intermediates), from the same weights without their learned ranges."""
    plain = get_model("resnet20", num_classes=10, quantized=False)
    rest, _ = split_learned_ranges(params)
    _, state = plain.apply(
        {"params": rest, "batch_stats": batch_stats},
        images,
        capture_intermediates=lambda module, method: module.name in names,
    )
    return {n: np.asarray(state["intermediates"][n]["__call__"][0], np.float64) for n in names}


def _start_ranges(trainer, state):
    """`calibrate.start_ranges` with the trainer's plan, networks and first batches."""
    return calibrate.start_ranges(trainer.calibration_inputs(), state)


def test_calibration_from_a_trained_run_sets_every_range_from_its_tensors(lsq_pact):
    """init_from the committed DoReFa run: weights and BatchNorm statistics are copied, the
    ranges are not (that run has none); then each PACT clip is the 99th percentile of its
    input after ReLU over the calibration batches (per batch, averaged) and each LSQ weight
    range is LSQ's rule on the copied kernel."""
    trainer, fresh = lsq_pact
    loaded = load_into(fresh, GOLDEN_RUN, {"student": "student"}, "init_from")
    np.testing.assert_array_equal(
        split_learned_ranges(loaded.params["student"])[1]["stem_act"]["clip"], 10.0
    )  # kept for calibration: the run has no clips
    trainer = dataclasses.replace(
        trainer, plan=dataclasses.replace(trainer.plan, init_from=GOLDEN_RUN)
    )
    state = _start_ranges(trainer, loaded)
    params, stats = state.params["student"], state.batch_stats["student"]
    info = trainer.info
    names = ("stem_bn", "stage2_block1_bn1")
    per_batch = [
        _fp_outputs(params, stats, np.asarray(normalize(b["image"], info.mean, info.std)), names)
        for b in trainer.first_batches(2)
    ]
    acts = {"stem_bn": "stem_act", "stage2_block1_bn1": "stage2_block1_act1"}
    for bn, act in acts.items():
        want = np.mean([np.percentile(np.maximum(o[bn], 0), 99.0) for o in per_batch])
        assert float(params[act]["clip"]) == pytest.approx(want, rel=1e-5)
    kernel = np.asarray(params["stage1_block0_conv1"]["kernel"], np.float64)
    want = 15 * 2 * np.mean(np.abs(kernel)) / math.sqrt(7)  # 4 bits: Q_P = 7
    assert float(params["stage1_block0_conv1"]["weight_range"]) == pytest.approx(want, rel=1e-5)
    rest, _ = split_learned_ranges(params)
    theirs = split_learned_ranges(loaded.params["student"])[0]
    for ours, want in zip(jax.tree.leaves(rest), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(ours, want)  # only the ranges changed


@pytest.mark.parametrize("quantizer, rule", [("lsq", "lsq"), ("pact", "percentile")])
def test_conv_input_calibration_sets_each_convs_input_range_from_its_input(quantizer, rule):
    """activation_placement='conv_input': each quantized conv's own input quantizer is
    calibrated from that conv's input in the start model (the ReLU output before it), by the
    rule asked for; the LSQ weight ranges as with block outputs."""
    config = tiny_config()
    config.model.activation_placement = "conv_input"
    config.quant.weight_quantizer, config.quant.activation_quantizer = "lsq", quantizer
    config.quant.activation_calibration = rule
    config.quant.calibration_batches = 2
    config.quant.calibration_percentile = 99.0
    config.stages = [default.stage("a", steps=1, w_bits=4, a_bits=2)]
    config.init_from = GOLDEN_RUN
    plan = parse_config(config)
    trainer = build_trainer(plan, get_info(plan.data), data_mesh(1), donate=False)
    loaded = load_into(trainer.init_state(), GOLDEN_RUN, {"student": "student"}, "init_from")
    state = _start_ranges(trainer, loaded)
    params, stats = state.params["student"], state.batch_stats["student"]
    info = trainer.info
    # conv input -> the BatchNorm whose ReLU output it reads in the start model
    inputs = {"stage1_block0_conv1": "stem_bn", "stage2_block1_conv2": "stage2_block1_bn1"}
    per_batch = [
        _fp_outputs(params, stats, np.asarray(normalize(b["image"], info.mean, info.std)), names)
        for b in trainer.first_batches(2)
        for names in [tuple(inputs.values())]
    ]
    param = "range" if quantizer == "lsq" else "clip"
    for conv, bn in inputs.items():
        relu = [np.maximum(o[bn], 0) for o in per_batch]
        if rule == "lsq":
            want = 2 * np.mean([r.mean() for r in relu]) * math.sqrt(3)  # 2 bits: Q_P = 3
        else:
            want = np.mean([np.percentile(r, 99.0) for r in relu])
        got = float(params[conv]["input_quantizer"][param])
        assert got == pytest.approx(want, rel=1e-5), conv
    assert not any(name.endswith("_act1") for name in params)  # every activation is a ReLU
    kernel = np.asarray(params["stage1_block0_conv1"]["kernel"], np.float64)
    want = 15 * 2 * np.mean(np.abs(kernel)) / math.sqrt(7)  # 4 bits: Q_P = 7
    assert float(params["stage1_block0_conv1"]["weight_range"]) == pytest.approx(want, rel=1e-5)


def test_probe_starts_each_quantizer_as_init_from_does_and_matches_evaluate(tmp_path):
    """lbq.experiments.probe: at the run's own quantizer and bits its top-1 is what
    lbq.evaluate gives for the same checkpoint; a PACT network is calibrated and evaluated."""
    from lbq import evaluate as evaluate_cli
    from lbq.experiments import probe

    out = tmp_path / "probe.json"
    args = ["--start_from", GOLDEN_RUN, "--out", str(out), "--bits=2"]
    assert probe.main([*args, "--quantizers=dorefa/dorefa,dorefa/pact"]) == 0
    results = json.loads(out.read_text())
    assert list(results) == [
        "plain-ReLU network w32a32",
        "dorefa/dorefa w2a2",
        "dorefa/pact w2a2",
    ]
    for values in results.values():
        assert set(values) == {"top1", "top1_bn_reestimated"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    evaluated = tmp_path / "evaluate.json"
    assert evaluate_cli.main(["--workdir", GOLDEN_RUN, "--output", str(evaluated)]) == 0
    want = json.loads(evaluated.read_text())["results"]["student"]["top1"]
    assert results["dorefa/dorefa w2a2"]["top1"] == pytest.approx(want, abs=1e-6)


def test_calibration_bits_mark_only_full_precision_layers():
    bits = calibrate.calibration_bits(
        np.array([32.0, 2, 32]), np.array([4.0, 2, 32]), np.array([True, False, False])
    )
    np.testing.assert_array_equal(bits, [36, 2, 32])
    assert [calibrate.calibration_target(b) for b in bits] == [4.0, None, None]
    with pytest.raises(ValueError, match="full precision"):
        calibrate.calibration_bits(np.array([2.0]), np.array([4.0]), np.array([True]))


def _stage(w_bits, a_bits):
    """`host_stage_bits` of a one-student stage of three layers, all at the same bit-widths."""
    return {"student": (np.full(3, float(w_bits)), np.full(3, float(a_bits)))}


def test_stages_mark_first_used_ranges_and_lsq_rule_marks_only_weights_at_new_bit_widths():
    """A ladder w32a32 -> w4a32 -> w4a4 -> w2a2 -> w2a2 of LSQ layers: a range is
    marked (32 + target, at full precision in the pass) when first quantized; the weights are
    marked again (`changed_weight_bits`, 'lsq_rule') where their bit-width changes, with every
    activation at the previous stage's bits and unmarked."""
    model = dataclasses.replace(
        parse_config(tiny_config()).model, weight_quantizer="lsq", activation_quantizer="lsq"
    )
    ladder = [_stage(32, 32), _stage(4, 32), _stage(4, 4), _stage(2, 2), _stage(2, 2)]
    first = [calibrate.stage_calibration_bits(ladder, i, model) for i in range(1, 5)]
    changed = [calibrate.changed_weight_bits(ladder, i, model) for i in range(1, 5)]
    full = np.full(3, 32.0)
    np.testing.assert_array_equal(first[0]["student"][0], full + 4)  # weights first used
    np.testing.assert_array_equal(first[0]["student"][1], full)
    np.testing.assert_array_equal(first[1]["student"][0], np.full(3, 4.0))  # kept
    np.testing.assert_array_equal(first[1]["student"][1], full + 4)  # activations first used
    assert first[2] is None and first[3] is None
    assert changed[0] is None and changed[1] is None and changed[3] is None
    np.testing.assert_array_equal(changed[2]["student"][0], full + 2)  # 4 -> 2
    np.testing.assert_array_equal(changed[2]["student"][1], np.full(3, 4.0))  # not marked
    dorefa = dataclasses.replace(model, weight_quantizer="dorefa")
    assert calibrate.changed_weight_bits(ladder, 3, dorefa) is None


def _lsq_w4a32_then_w2a2(rule: str):
    """A trainer of LSQ weights and activations with stages w4a32 -> w2a2 (2 steps each), the
    stages laid out, and the state after its start (ranges calibrated for stage 1)."""
    config = tiny_config()
    config.quant.weight_quantizer = config.quant.activation_quantizer = "lsq"
    config.quant.weight_range_at_bit_change = rule
    config.stages = [
        default.stage("w4a32", steps=2, w_bits=4, a_bits=32),
        default.stage("w2a2", steps=2, w_bits=2, a_bits=2),
    ]
    plan = parse_config(config)
    trainer = build_trainer(plan, get_info(plan.data), data_mesh(1), donate=False)
    stages = lay_out(plan.stages, plan.steps_per_epoch(trainer.info.num_train))
    return trainer, stages, trainer.load_start_weights(trainer.init_state())


def _ranges_scaled(params, factor: float):
    """Every network's parameters with its learned ranges times ``factor``."""
    out = {}
    for name, tree in params.items():
        rest, ranges = split_learned_ranges(tree)
        out[name] = merge_learned_ranges(rest, jax.tree.map(lambda r: r * factor, ranges))
    return out


def _assert_same_leaves(ours, want):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_bit_width_drop_keeps_lsq_weight_ranges_or_sets_them_by_lsqs_rule():
    """Stage w4a32 -> w2a2 through the trainer: under both rules the activation ranges, first
    used now, are calibrated alike; 'keep' leaves the weight ranges as they were, 'lsq_rule'
    sets each to (2^2 - 1) * 2 mean|w| / sqrt(1) on its kernel; nothing else changes. A resume
    inside the stage that starts a fresh optimizer calibrates nothing again."""
    after, before = {}, {}
    for rule in ("keep", "lsq_rule"):
        trainer, stages, before[rule] = _lsq_w4a32_then_w2a2(rule)
        after[rule] = trainer.start_stage(before[rule], stages[1])
        trained = _ranges_scaled(jax.device_get(after[rule].params), 1.5)  # as if trained
        batch_stats = jax.device_get(after[rule].batch_stats)
        saved = {"step": stages[1].start_step + 1, "params": trained, "batch_stats": batch_stats}
        resumed = resume._with_new_optimizer(trainer, before[rule], saved, stages[1])
        _assert_same_leaves(resumed.params, trained)
    _assert_same_leaves(before["keep"].params, before["lsq_rule"].params)
    rest_before, ranges_before = split_learned_ranges(before["keep"].params["student"])
    ranges = {}
    for rule, state in after.items():
        rest, ranges[rule] = split_learned_ranges(state.params["student"])
        _assert_same_leaves(rest, rest_before)
    weights = activations = 0
    for name, module in ranges["lsq_rule"].items():
        for param, value in module.items():
            old, kept = float(ranges_before[name][param]), float(ranges["keep"][name][param])
            if param != "weight_range":
                assert float(value) == kept, (name, param)  # calibrated alike
                activations += kept != old
                continue
            kernel = np.asarray(before["keep"].params["student"][name]["kernel"], np.float64)
            want = 3 * 2 * np.mean(np.abs(kernel)) / math.sqrt(1)  # 2 bits: Q_P = 1
            assert float(value) == pytest.approx(want, rel=1e-5), name
            assert kept == old != pytest.approx(want, rel=1e-2), name
            weights += 1
    assert weights == 18  # ResNet-20's quantized convs and dense layers
    assert activations == 18  # and their input activations, first quantized by stage w2a2


def _activation_inputs(model, variables, images, precision) -> dict:
    """The input of every `QuantActivation` call, by its parent module's name and its own
    (Flax intercept)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, QuantActivation) and context.method_name == "__call__":
            seen[context.module.name] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images, precision)
    return seen


@pytest.mark.parametrize("quantizer", ["lsq", "pact"])
def test_a_bit_width_drop_calibrates_activation_ranges_again_when_asked(quantizer):
    """Stages w4a4 -> w2a2 with quant.activation_range_at_bit_change: 'keep' leaves every
    activation range as stage 1 ended it; 'calibrate' sets each to LSQ's rule at 2 bits,
    2 sqrt(3) mean(relu(x)), on its input x in the network at w2 with the activations at full
    precision (averaged over the calibration batches); weights and everything else are kept."""
    after, start = {}, {}
    for rule in ("keep", "calibrate"):
        config = tiny_config()
        config.quant.weight_quantizer, config.quant.activation_quantizer = "lsq", quantizer
        config.quant.activation_calibration = "lsq"
        config.quant.weight_range_at_bit_change = "keep"  # only the activations' rule acts
        config.quant.activation_range_at_bit_change = rule
        config.quant.calibration_batches = 2
        config.stages = [
            default.stage("w4a4", steps=2, w_bits=4, a_bits=4),
            default.stage("w2a2", steps=2, w_bits=2, a_bits=2),
        ]
        plan = parse_config(config)
        trainer = build_trainer(plan, get_info(plan.data), data_mesh(1), donate=False)
        stages = lay_out(plan.stages, plan.steps_per_epoch(trainer.info.num_train))
        start[rule] = trainer.load_start_weights(trainer.init_state())
        after[rule] = trainer.start_stage(start[rule], stages[1])
    _assert_same_leaves(after["keep"].params, start["keep"].params)  # keep: nothing changes
    params, stats = start["calibrate"].params["student"], start["calibrate"].batch_stats["student"]
    model = trainer.networks[0].model
    names = model.layer_names()
    fp_activations = Precision(
        jnp.full((len(names),), 2.0), jnp.full((len(names),), 32.0), jnp.ones((len(names),))
    )
    info = trainer.info
    per_batch = [
        _activation_inputs(
            model,
            {"params": params, "batch_stats": stats},
            normalize(b["image"], info.mean, info.std),
            fp_activations,
        )
        for b in trainer.first_batches(2)
    ]
    param = "range" if quantizer == "lsq" else "clip"
    rest_before, _ = split_learned_ranges(params)
    rest, ranges = split_learned_ranges(after["calibrate"].params["student"])
    _assert_same_leaves(rest, rest_before)
    checked = 0
    for module, values in ranges.items():
        if param not in values:
            np.testing.assert_array_equal(values["weight_range"], params[module]["weight_range"])
            continue
        mean = np.mean([np.maximum(batch[module], 0).mean() for batch in per_batch])
        assert float(values[param]) == pytest.approx(2 * math.sqrt(3) * mean, rel=1e-5), module
        checked += 1
    assert checked == 18  # the stem's and the blocks' activations, all at a new bit-width


# -------------------------------------------------------------- BatchNorm re-estimation


def _bn_inputs(model, params, images, p):
    """The input of every BatchNorm call in a train-mode forward pass (Flax intercept)."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            seen[context.module.name] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(params, images, p, train=True, mutable=["batch_stats"])
    return seen


def test_batch_norm_reestimation_averages_each_batchs_statistics_and_changes_nothing_else(
    lsq_pact,
):
    trainer, state = lsq_pact
    stale = jax.tree.map(lambda s: s + 3.0, state.batch_stats)  # running stats from elsewhere
    state = state.replace(batch_stats=stale)
    bits = trainer.stage_bits(trainer.plan.stages[0])
    evaluated = trainer.evaluation_state(state, bits)
    assert evaluated.params is state.params and evaluated.opt_state is state.opt_state
    assert evaluated.step is state.step and state.batch_stats is stale

    net = trainer.networks[0]
    w, a = bits["student"]
    p = Precision(w, a, jnp.ones_like(w))
    means, variances = {}, {}
    for batch in trainer.first_batches(2):
        images = normalize(batch["image"], trainer.info.mean, trainer.info.std)
        variables = {"params": state.params["student"], "batch_stats": stale["student"]}
        for name, x in _bn_inputs(net.model, variables, images, p).items():
            means.setdefault(name, []).append(x.mean(axis=(0, 1, 2)))
            variances.setdefault(name, []).append(x.var(axis=(0, 1, 2)))
    got = evaluated.batch_stats["student"]
    assert set(got) == set(means)
    for name in means:
        np.testing.assert_allclose(got[name]["mean"], np.mean(means[name], 0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            got[name]["var"], np.mean(variances[name], 0), rtol=1e-4, atol=1e-5
        )


# ------------------------------------------------------------------------- tiny runs

VARIANTS = ("cifar100_w2a2_lsq", "cifar100_w2a2_pact", "imagenet_w2a2_lsq", "imagenet_w2a2_pact")
# The CIFAR variants (progressive 32 -> 4 -> 2 with a joint teacher) also get stochastic
# precision and BatchNorm re-estimation, the LSQ one an extra W4A4 student, and are stopped in
# their second stage and resumed.
RESUMED = {"cifar100_w2a2_lsq": 3, "cifar100_w2a2_pact": 3}


def variant_config(name: str):
    import importlib

    config = importlib.import_module(f"lbq.configs.{name}").get_config("tiny")
    for entry in config.stages:
        entry.steps = 2
    if name in RESUMED:
        config.stochastic.enabled = True
        config.eval.recalibrate_bn_batches = 1
        config.quant.calibration_batches = 2
    if name == "cifar100_w2a2_lsq":
        config.distill.extra_students = ((4, 4),)
    return config


def run_variants(workdir: str, names: list[str]) -> dict:
    """Runs the variants ``names`` (stopping and resuming those in `RESUMED`, and running the
    LSQ one again uninterrupted); returns what the tests check, as JSON-ready values."""
    import logging

    from lbq.checkpoint import load_variables
    from lbq.train import train_and_evaluate

    logger = logging.getLogger("lbq")  # the calibration log lines, as lbq.main shows them
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    results = {}
    for name in names:
        run_dir = os.path.join(workdir, name)
        config = variant_config(name)
        record = {}
        if name in RESUMED:
            stopped = train_and_evaluate(config, run_dir, stop_at_step=RESUMED[name])
            record["stopped"] = [stopped.status, stopped.step]
        result = train_and_evaluate(config, run_dir)
        ranges = [
            float(np.min(np.abs(leaf)))
            for net in load_variables(run_dir).values()
            for leaf in jax.tree.leaves(split_learned_ranges(net["params"])[1])
        ]
        record.update(
            status=result.status,
            step=result.step,
            compilations=result.train_step_compilations,
            stages=result.stages,
            final=result.final,
            num_ranges=len(ranges),
            min_range=min(ranges),
        )
        if name == "cifar100_w2a2_lsq":
            again = train_and_evaluate(variant_config(name), os.path.join(workdir, "again"))
            record["uninterrupted_final"] = again.final
        results[name] = record
    return results


# Two groups of about equal CPU time, run side by side on the two cores.
GROUPS = (["cifar100_w2a2_lsq", "imagenet_w2a2_pact"], ["cifar100_w2a2_pact", "imagenet_w2a2_lsq"])


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    """`run_variants` in two subprocesses (with the test processes' XLA flags, `runs.FAST_XLA`)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    }
    jobs = []
    for index, names in enumerate(GROUPS):
        workdir = tmp_path_factory.mktemp(f"variants{index}")
        out = workdir / "results.json"
        code = (
            "import json; import test_learned_ranges as t; "
            f"json.dump(t.run_variants({str(workdir)!r}, {names!r}), open({str(out)!r}, 'w'))"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        jobs.append((proc, out))
    results, output = {}, ""
    for proc, out in jobs:
        text, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, text[-3000:]
        output += text
        with open(out) as f:
            results.update(json.load(f))
    return results, output


@pytest.mark.parametrize("name", VARIANTS)
def test_quantizer_config_tiny_variants_train_with_their_quantizers(variant_runs, name):
    results, output = variant_runs
    run = results[name]
    weights, activations = ("lsq", "lsq") if name.endswith("lsq") else ("dorefa", "pact")
    assert run["status"] == "completed" and run["compilations"] == 1
    assert run["step"] == 2 * len(run["stages"])
    for stage in run["stages"]:
        assert (stage["weight_quantizer"], stage["activation_quantizer"]) == (weights, activations)
    assert {"student", "teacher"} <= set(run["final"])
    assert run["num_ranges"] > 0 and run["min_range"] > 0
    assert f"quantizers: weights {weights}, activations {activations}" in output
    # The learned-range recipes quantize each conv's input, the placement that measured best.
    assert variant_config(name).model.activation_placement == "conv_input"


def test_joint_stochastic_progressive_runs_resume_to_the_uninterrupted_result(variant_runs):
    results, output = variant_runs
    for name, stop in RESUMED.items():
        assert results[name]["stopped"] == ["preempted", stop]
        assert results[name]["status"] == "completed"
    lsq = results["cifar100_w2a2_lsq"]
    assert set(lsq["final"]) == {"student", "student_w4a4", "teacher"}
    assert lsq["final"] == lsq["uninterrupted_final"]
    # The LSQ ranges first used by the W4A4 stage were calibrated on the trained network.
    assert "calibrated student's learned ranges on the network at the start of stage 2" in output
    # ... and, the recipe's rule at conv inputs, its activation ranges again at the 4 -> 2 drop.
    again = "calibrated student's learned ranges on the network at stage 3's new bit-widths"
    assert again in output
