"""Stochastic precision (SPEC section 3) as an optax transformation.

At each step every unit (a residual block, or a single layer) runs quantized with probability
``p(t)``, independently; the others run in full precision. The transformation's state holds the
PRNG key, the step count and the mask of the current step. It passes updates through unchanged
and draws the next step's mask on each update, so the train step simply reads the mask from the
optimizer state, and a checkpoint of the optimizer state makes the masks resume exactly.

``p(t)`` is a function of the fraction of the stage done, ``count / horizon``. The horizon lives in
the state, not in the Python closure, so the same transformation (and the same compiled step)
serves stages of any length: `reset_for_stage` sets it when a stage begins.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "step")


@dataclasses.dataclass(frozen=True)
class ProbabilitySchedule:
    """The probability ``p(t)`` that a unit runs quantized, over a stage.

    Attributes:
      kind: 'constant' (``p_start`` until ``full_at``), 'linear' (from ``p_start`` to 1 at
        ``full_at``) or 'step' (``num_steps`` equal steps from ``p_start`` to 1 at ``full_at``).
      p_start: the probability at the start of the stage.
      full_at: fraction of the stage from which every unit is quantized; the last part of
        training then runs the network that is evaluated, with matching BN statistics.
      num_steps: number of increments for 'step'.
    """

    kind: str = "linear"
    p_start: float = 0.5
    full_at: float = 0.5
    num_steps: int = 4

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"stochastic.schedule={self.kind!r} is not one of {SCHEDULES}")
        if not 0.0 <= self.p_start <= 1.0:
            raise ValueError(f"stochastic.p_start={self.p_start} is not in [0, 1]")
        if not 0.0 <= self.full_at <= 1.0:
            raise ValueError(f"stochastic.full_at={self.full_at} is not in [0, 1]")
        if self.num_steps < 1:
            raise ValueError(f"stochastic.num_steps={self.num_steps} is not >= 1")

    def __call__(self, fraction: jax.Array) -> jax.Array:
        """``p`` at ``fraction`` (traced) of the stage."""
        progress = jnp.clip(fraction / max(self.full_at, 1e-9), 0.0, 1.0)
        if self.kind == "constant":
            p = jnp.full_like(progress, self.p_start)
        elif self.kind == "linear":
            p = self.p_start + (1.0 - self.p_start) * progress
        else:
            p = (
                self.p_start
                + (1.0 - self.p_start) * jnp.floor(progress * self.num_steps) / self.num_steps
            )
        return jnp.where(fraction >= self.full_at, 1.0, p)


class StochasticPrecisionState(NamedTuple):
    """State of `stochastic_precision`.

    Attributes:
      count: steps taken in this stage.
      horizon: the stage's length in steps.
      key: raw PRNG key data (uint32), so that checkpoints store plain arrays.
      mask: float32 [num_units], 1 where the unit runs quantized at the current step.
    """

    count: jax.Array
    horizon: jax.Array
    key: jax.Array
    mask: jax.Array


def _sample(key: jax.Array, schedule: ProbabilitySchedule, count, horizon, num_units):
    key, draw = jax.random.split(jax.random.wrap_key_data(key))
    p = schedule(count / jnp.maximum(horizon, 1).astype(jnp.float32))
    mask = jax.random.bernoulli(draw, p, (num_units,)).astype(jnp.float32)
    return jax.random.key_data(key), mask


def stochastic_precision(
    num_units: int, schedule: ProbabilitySchedule, seed: int = 0, horizon: int = 1
) -> optax.GradientTransformation:
    """An identity transformation that samples per-unit quantize masks.

    Args:
      num_units: how many independently sampled units (blocks or layers).
      schedule: ``p(t)`` over the stage.
      seed: seed of the mask stream; `reset_for_stage` reseeds it per stage.
      horizon: the stage's length in steps; `reset_for_stage` sets it per stage, so the trainer
        leaves the default.

    Returns:
      An `optax.GradientTransformation` whose state is a `StochasticPrecisionState`.
    """

    def init(params):
        del params
        key = jax.random.key_data(jax.random.key(seed))
        return _state_at_start(key, horizon, schedule, num_units)

    def update(updates, state, params=None):
        del params
        count = state.count + 1
        key, mask = _sample(state.key, schedule, count, state.horizon, num_units)
        return updates, StochasticPrecisionState(count, state.horizon, key, mask)

    return optax.GradientTransformation(init, update)


def _state_at_start(key, horizon, schedule, num_units) -> StochasticPrecisionState:
    count = jnp.int32(0)
    key, mask = _sample(key, schedule, count, horizon, num_units)
    return StochasticPrecisionState(count, jnp.asarray(horizon, jnp.int32), key, mask)


def _is_state(node) -> bool:
    return isinstance(node, StochasticPrecisionState)


def reset_for_stage(
    opt_state: optax.OptState, horizon: int, key: jax.Array, schedule: ProbabilitySchedule
) -> optax.OptState:
    """Sets the horizon and a fresh key in every stochastic-precision state of ``opt_state``.

    Args:
      opt_state: a freshly initialised optimizer state.
      horizon: the stage's length in steps.
      key: a typed PRNG key for this stage; each state found gets its own fold of it.
      schedule: the schedule, to draw the stage's first mask.
    """
    index = iter(range(1 << 30))

    def reset(node):
        if not _is_state(node):
            return node
        node_key = jax.random.key_data(jax.random.fold_in(key, next(index)))
        return _state_at_start(node_key, horizon, schedule, node.mask.shape[0])

    return jax.tree.map(reset, opt_state, is_leaf=_is_state)


def find_masks(opt_state: optax.OptState) -> list[jax.Array]:
    """The current masks of every stochastic-precision state in ``opt_state``, in tree order."""
    nodes = jax.tree.leaves(opt_state, is_leaf=_is_state)
    return [node.mask for node in nodes if _is_state(node)]
