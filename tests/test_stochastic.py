"""Stochastic precision: the optax transformation and its use by the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import StepRig, leaves, tiny_config

from lbq.quant.stochastic import (
    ProbabilitySchedule,
    StochasticPrecisionState,
    find_masks,
    reset_for_stage,
    stochastic_precision,
)


def test_transform_passes_updates_and_keeps_key_count_mask():
    tx = stochastic_precision(5, ProbabilitySchedule("constant", 0.5, 1.0), seed=3)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    assert isinstance(state, StochasticPrecisionState)
    assert state.mask.shape == (5,) and state.key.dtype == jnp.uint32
    update = jax.jit(tx.update)
    grads = {"w": jnp.arange(3.0)}
    out, new = update(grads, state)
    np.testing.assert_array_equal(out["w"], grads["w"])
    assert int(new.count) == 1 and not np.array_equal(new.key, state.key)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_share_of_quantized_units_matches_p(p):
    """20,000 Bernoulli(p) draws: the share has standard deviation <= 0.0036, so 5 sigma is
    0.018."""
    units, steps = 100, 200
    tx = stochastic_precision(units, ProbabilitySchedule("constant", p, 1.0), seed=1, horizon=10**6)
    state = tx.init({})

    def body(state, _):
        _, state = tx.update({}, state)
        return state, state.mask

    _, masks = jax.lax.scan(body, state, None, length=steps)
    assert abs(float(jnp.mean(masks)) - p) < 5 * np.sqrt(p * (1 - p) / (units * steps))
    # Units are drawn independently: per-unit shares vary around p too.
    assert float(jnp.std(jnp.mean(masks, axis=0))) > 0


@pytest.mark.parametrize(
    "kind,fractions,want",
    [
        ("linear", [0.0, 0.25, 0.5, 0.9], [0.5, 0.75, 1.0, 1.0]),
        ("constant", [0.0, 0.49, 0.5], [0.5, 0.5, 1.0]),
        ("step", [0.0, 0.13, 0.25, 0.49, 0.5], [0.5, 0.625, 0.75, 0.875, 1.0]),
    ],
)
def test_probability_schedules(kind, fractions, want):
    schedule = ProbabilitySchedule(kind, p_start=0.5, full_at=0.5, num_steps=4)
    got = [float(schedule(jnp.float32(f))) for f in fractions]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_masks_follow_the_stage_horizon_and_reseed():
    tx = stochastic_precision(50, ProbabilitySchedule("linear", 0.0, 0.5))
    state = reset_for_stage(
        tx.init({}),
        horizon=10,
        key=jax.random.key(0),
        schedule=ProbabilitySchedule("linear", 0.0, 0.5),
    )
    assert int(state.horizon) == 10 and float(jnp.mean(state.mask)) == 0.0  # p(0) = 0
    for _ in range(5):
        _, state = tx.update({}, state)
    assert float(jnp.mean(state.mask)) == 1.0  # half of the horizon: p = 1
    linear = ProbabilitySchedule("linear", 0.0, 0.5)
    again = reset_for_stage(tx.init({}), 10, jax.random.key(0), linear)
    other = reset_for_stage(tx.init({}), 10, jax.random.key(1), linear)
    assert np.array_equal(
        again.key,
        reset_for_stage(
            tx.init({}), 10, jax.random.key(0), ProbabilitySchedule("linear", 0.0, 0.5)
        ).key,
    )
    assert not np.array_equal(again.key, other.key)


def test_masks_are_reproducible_from_the_seed():
    def masks(seed):
        tx = stochastic_precision(
            9, ProbabilitySchedule("constant", 0.5, 1.0), seed=seed, horizon=99
        )
        state, out = tx.init({}), []
        for _ in range(10):
            _, state = tx.update({}, state)
            out.append(np.asarray(state.mask))
        return np.stack(out)

    np.testing.assert_array_equal(masks(7), masks(7))
    assert not np.array_equal(masks(7), masks(8))


def _sp_config(p_start=0.5, kind="constant", full_at=1.0, unit="block"):
    config = tiny_config()
    config.stochastic.enabled = True
    config.stochastic.schedule = kind
    config.stochastic.p_start = p_start
    config.stochastic.full_at = full_at
    config.stochastic.unit = unit
    return config


def test_one_compiled_step_serves_twenty_different_masks():
    rig = StepRig(_sp_config())
    state, seen = rig.state, set()
    for _ in range(20):
        seen.add(tuple(np.asarray(find_masks(state.opt_state)[0]).tolist()))
        state, metrics = rig.step(state)
        assert 0.0 <= float(metrics["student/quantized_fraction"]) <= 1.0
    assert len(seen) > 10  # the masks really changed
    assert rig.train_step._cache_size() == 1


def test_layer_units_sample_each_layer():
    rig = StepRig(_sp_config(unit="layer"))
    mask = find_masks(rig.state.opt_state)[0]
    assert mask.shape == (len(rig.networks[0].model.layer_names()),)


@pytest.mark.slow
def test_p_one_equals_the_plain_quantized_step():
    plain = StepRig(tiny_config())
    always = StepRig(_sp_config(p_start=1.0))
    a, ma = plain.step()
    b, mb = always.step()
    assert float(mb["student/quantized_fraction"]) == 1.0
    np.testing.assert_array_equal(ma["loss"], mb["loss"])
    for x, y in zip(leaves(a.params), leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_p_zero_computes_the_full_precision_function():
    """Mask 0 everywhere: clip activations, no rounding: the same as 32-bit everywhere."""
    never = StepRig(_sp_config(p_start=0.0))
    wide = tiny_config()
    wide.quant.w_bits = wide.quant.a_bits = 32
    fp = StepRig(wide)
    _, m0 = never.step()
    _, m32 = fp.step()
    assert float(m0["student/quantized_fraction"]) == 0.0
    np.testing.assert_allclose(m0["loss"], m32["loss"], rtol=1e-6)


@pytest.mark.slow
def test_evaluation_uses_the_fully_quantized_network():
    never = StepRig(_sp_config(p_start=0.0))
    plain = StepRig(tiny_config())
    batch = {**never.batch, "mask": np.ones(len(never.batch["label"]), bool)}
    a = never.eval_step(never.state, batch, never.bits)
    b = plain.eval_step(plain.state, batch, plain.bits)
    np.testing.assert_allclose(a["student/loss"], b["student/loss"], rtol=1e-6)


def test_transform_composes_inside_multi_transform():
    """Chained inside one network's partition of `optax.multi_transform`, as the trainer builds
    it: the state sits in that partition only, the updates are those of the chain without it,
    and the masks are those of the transformation on its own."""
    schedule = ProbabilitySchedule("constant", 0.5, 1.0)
    params = {"student": {"w": jnp.ones(3)}, "teacher": {"w": jnp.ones(2)}}
    labels = {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}

    def sampler():
        return stochastic_precision(6, schedule, seed=4, horizon=100)  # p stays at 0.5

    def combined(with_masks):
        first = [sampler()] if with_masks else []
        student = optax.chain(*first, optax.add_decayed_weights(1e-2), optax.trace(0.9))
        return optax.multi_transform({"student": student, "teacher": optax.trace(0.5)}, labels)

    tx, plain, alone = combined(True), combined(False), sampler()
    state, plain_state, alone_state = tx.init(params), plain.init(params), alone.init({})
    assert isinstance(state, optax.MultiTransformState)
    assert find_masks(state.inner_states["teacher"]) == []
    update = jax.jit(tx.update)
    masks = []
    for step in range(1, 4):
        grads = jax.tree.map(lambda p, step=step: p * step - 0.5, params)
        out, state = update(grads, state, params)
        want, plain_state = plain.update(grads, plain_state, params)
        _, alone_state = alone.update({}, alone_state)
        for got, expected in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(got, expected)
        [mask] = find_masks(state.inner_states["student"])
        np.testing.assert_array_equal(mask, alone_state.mask)
        masks.append(np.asarray(mask))
    assert len({m.tobytes() for m in masks}) > 1  # the masks changed between updates

    # The trainer's optimizer: one mask, in the student's partition.
    rig = StepRig(_sp_config())
    opt_state = rig.state.opt_state
    assert isinstance(opt_state, optax.MultiTransformState)
    assert len(find_masks(opt_state.inner_states["student"])) == len(find_masks(opt_state)) == 1
