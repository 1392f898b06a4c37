"""Calibrated start of the learned quantizer ranges, and BatchNorm re-estimation.

**Calibrated start** (SPEC section 7; the cases, rules and why: docs/learned_ranges.md, "Start
values" and the two bit-width change points). A learned range (PACT clip, LSQ range;
`lbq.quant.layers`) is set from the model's own tensors before its first use: at a new run's
start by `start_ranges` (on ``init_from``, every PACT clip too, as a clip acts at 32 bits; from
scratch by LSQ's rule, Esser et al., section 2.1, on the first batch), at a later stage's start
by `stage_ranges`. Any other range that was used before carries over. A range is computed for
the bit-width at which its layer is first quantized (`first_quantized_bits`), or for the new one
in a bit-width change pass; a statistic that is not positive leaves it at its value. Ranges
stored in the ``init_from`` run are not used.

The activation inputs come from one forward pass per batch of the network as it is (the start
model: full precision with PACT's clips lifted, the plain ReLU network; at a stage start: the
previous stage's precision, or the new one in the activation pass), BatchNorm in eval mode,
recorded with Flax ``sow``. A layer to calibrate for ``b`` bits runs at the bit-width
``32 + b``: every bit-width of 32 or more is full precision (`lbq.quant.quantizers`), and its
quantizer records ``32 + b``, from which ``b`` is read (`calibration_bits`).

**BatchNorm re-estimation** (``eval.recalibrate_bn_batches``; docs/learned_ranges.md):
`reestimate_batch_stats`, for `lbq.trainer.Trainer.evaluation_state`.

Every function here takes networks, a state and batches (`RunInputs`), never the trainer.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from lbq.models import QuantNetwork
from lbq.models.common import BATCH_NORM_MOMENTUM
from lbq.plan import ModelSpec, RunPlan
from lbq.quant.layers import (
    CALIBRATION_COLLECTION,
    SOWN_BITS,
    SOWN_INPUT,
    SOWN_WEIGHT_BITS,
    WEIGHT_RANGE_PARAM,
    lsq_initial_range,
    lsq_level_count,
    merge_learned_ranges,
    split_learned_ranges,
)
from lbq.quant.precision import Precision
from lbq.quant.quantizers import FULL_PRECISION_BITS
from lbq.steps import Network, normalize
from lbq.train_state import TrainState

log = logging.getLogger("lbq")

PERCENTILE_RULE, LSQ_RULE = "percentile", "lsq"

Bits = Mapping[str, tuple[np.ndarray, np.ndarray]]  # {student: (w_bits [L], a_bits [L])}


# ------------------------------------------------------------------------------ bit-widths


def first_quantized_bits(bits_per_stage: Sequence[Bits], name: str, which: int) -> np.ndarray:
    """Per layer [L], the first bit-width below 32 of student ``name``'s weights (``which`` 0)
    or activations (1) over the stages, 32 where a layer is never quantized.

    Args:
      bits_per_stage: for each stage, `lbq.trainer.host_stage_bits`.
    """
    rows = np.stack([np.asarray(s[name][which]) for s in bits_per_stage])
    quantized = rows < FULL_PRECISION_BITS
    first = rows[np.argmax(quantized, axis=0), np.arange(rows.shape[1])]
    return np.where(quantized.any(axis=0), first, FULL_PRECISION_BITS).astype(np.float32)


def calibration_bits(current: np.ndarray, target: np.ndarray, calibrate: np.ndarray) -> np.ndarray:
    """Bit-widths [L] of a calibration pass: ``current`` for a layer that keeps its range,
    ``32 + target`` for one calibrated for ``target`` bits (it must be at full precision now;
    any bit-width >= 32 runs it so). See the module docstring.

    Raises:
      ValueError: when a layer to calibrate is quantized now.
    """
    current, target, calibrate = (np.asarray(x) for x in (current, target, calibrate))
    if np.any(calibrate & (current < FULL_PRECISION_BITS)):
        raise ValueError("only a layer at full precision can be calibrated")
    return np.where(calibrate, FULL_PRECISION_BITS + target, current).astype(np.float32)


def calibration_target(recorded_bits: float) -> float | None:
    """The bit-width a quantizer is calibrated for, from the bit-width it recorded in a
    calibration pass (`calibration_bits`); None when it keeps its range."""
    recorded = float(recorded_bits)
    return recorded - FULL_PRECISION_BITS if recorded > FULL_PRECISION_BITS else None


def _pass_bits(students: Iterable[str], layers: Callable[[str], tuple]) -> dict | None:
    """{student: (w_bits, a_bits)} of a calibration pass: `calibration_bits` of the (current,
    target, marked) that ``layers(student)`` gives for its weights and for its activations; None
    when no layer is marked."""
    out = {}
    for name in students:
        weights, activations = layers(name)
        if weights[2].any() or activations[2].any():
            out[name] = (calibration_bits(*weights), calibration_bits(*activations))
    return out or None


def start_calibration_bits(
    bits_per_stage: Sequence[Bits], model: ModelSpec, from_model: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{student: (w_bits, a_bits)} of the calibration pass at a new run's start (the start
    network is at full precision); None when nothing is calibrated then."""

    def layers(name: str) -> tuple:
        w0, a0 = (np.asarray(b) for b in bits_per_stage[0][name])
        full = np.full_like(w0, FULL_PRECISION_BITS)
        weights = (full, w0, (w0 < FULL_PRECISION_BITS) & (model.weight_quantizer == "lsq"))
        if model.activation_quantizer == "pact":
            first = first_quantized_bits(bits_per_stage, name, 1)
            return weights, (full, first, np.full(a0.shape, from_model))
        lsq = model.activation_quantizer == "lsq"
        return weights, (full, a0, (a0 < FULL_PRECISION_BITS) & lsq)

    return _pass_bits(bits_per_stage[0], layers)


def _stage_pass(
    bits_per_stage: Sequence[Bits], index: int, base: Bits, mark: Callable
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{student: (w_bits, a_bits)} of a calibration pass at the start of stage ``index`` > 0:
    the layers that ``mark(which, last, now)`` marks (``which`` 0 for weights, 1 for
    activations; ``last``: the bit-widths [L] they were last quantized at, 32 if never; ``now``:
    stage ``index``'s) calibrated for ``now``, the others at ``base``'s bit-widths. None when
    none is marked."""

    def layer(name: str, which: int) -> tuple:
        now = np.asarray(bits_per_stage[index][name][which])
        last = first_quantized_bits(bits_per_stage[:index][::-1], name, which)
        marked = mark(which, last, now)
        return np.where(marked, FULL_PRECISION_BITS, base[name][which]), now, marked

    return _pass_bits(bits_per_stage[index], lambda name: (layer(name, 0), layer(name, 1)))


def stage_calibration_bits(
    bits_per_stage: Sequence[Bits], index: int, model: ModelSpec
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{student: (w_bits, a_bits)} of the calibration pass at the start of stage ``index`` > 0:
    the previous stage's precision, and the LSQ layers that this stage quantizes for the first
    time marked for calibration; None when there are none."""

    def first_use(which: int, last: np.ndarray, now: np.ndarray) -> np.ndarray:
        lsq = (model.weight_quantizer, model.activation_quantizer)[which] == "lsq"
        return lsq & (last >= FULL_PRECISION_BITS) & (now < FULL_PRECISION_BITS)

    return _stage_pass(bits_per_stage, index, bits_per_stage[index - 1], first_use)


def _changed(kind: int, which: int, last: np.ndarray, now: np.ndarray) -> np.ndarray:
    """The ``mark`` of `_stage_pass`, ``kind`` bound, for the weights (``kind`` 0) or
    activations (1) quantized at a bit-width other than the one they were last quantized at."""
    quantized = (last < FULL_PRECISION_BITS) & (now < FULL_PRECISION_BITS)
    return (which == kind) & quantized & (last != now)


def changed_weight_bits(
    bits_per_stage: Sequence[Bits], index: int, model: ModelSpec
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{student: (w_bits, a_bits)} of the pass that sets LSQ weight ranges again at the start of
    stage ``index`` > 0 (``quant.weight_range_at_bit_change='lsq_rule'``): the weights whose
    bit-width differs from the one they were last quantized at are marked (and run at full
    precision); everything else runs at the previous stage's precision and keeps its range.
    None when no weight is marked.

    Only the marked kernels are read (LSQ's rule on the weights), so the pass's forward
    values, which the full-precision marked layers change, set nothing."""
    if model.weight_quantizer != "lsq":
        return None
    mark = functools.partial(_changed, 0)
    return _stage_pass(bits_per_stage, index, bits_per_stage[index - 1], mark)


def changed_activation_bits(
    bits_per_stage: Sequence[Bits], index: int, model: ModelSpec
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{student: (w_bits, a_bits)} of the pass that sets PACT/LSQ activation ranges again at
    the start of stage ``index`` > 0 (``quant.activation_range_at_bit_change='calibrate'``):
    the activations whose bit-width differs from the one they were last quantized at are
    marked (and run at full precision, so their inputs are recorded); everything else runs at
    stage ``index``'s own precision, as the stage will train it. None when none is marked."""
    if model.activation_quantizer not in ("pact", "lsq"):
        return None
    mark = functools.partial(_changed, 1)
    return _stage_pass(bits_per_stage, index, bits_per_stage[index], mark)


# ------------------------------------------------------------------------------ statistics


def high_percentile(x: jax.Array, q: float) -> jax.Array:
    """The ``q``-th percentile (0-100) of all of ``x``, as NumPy's default (linear
    interpolation between the two nearest order statistics), float32.

    A high percentile needs only the largest ``n - floor((n - 1) q / 100)`` values, which
    `jax.lax.top_k` finds without sorting the whole tensor (an ImageNet activation batch has
    about 10^8 elements); lower percentiles fall back to `jnp.percentile`.
    """
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    position = (n - 1) * q / 100.0
    low = math.floor(position)
    count = n - low  # order statistics low .. n-1, the largest first
    if count > max(4096, n // 8):
        return jnp.percentile(flat, q)
    # The barrier keeps XLA (CPU, jax 0.10) from turning top_k-then-index into a full sort,
    # which costs 80x more on a CIFAR activation batch.
    largest = jax.lax.optimization_barrier(jax.lax.top_k(flat, count)[0])
    at_low = largest[count - 1]
    at_high = largest[count - 2] if count >= 2 else at_low
    return at_low + (position - low) * (at_high - at_low)


def make_range_statistics(model: QuantNetwork, percentile: float, lift_clips: bool) -> Callable:
    """Builds ``statistics(params, batch_stats, images, w_bits, a_bits) -> {path: values}``.

    One forward pass of ``model`` at ``w_bits``/``a_bits`` [L] (every quantize switch on; see
    `calibration_bits`), BatchNorm in eval mode. With ``lift_clips`` the learned ranges are
    set to +inf, so that a PACT activation at full precision is a plain ReLU (the start model).

    Returns, keyed by the '/'-joined module path: for a quantized activation
    ``{'percentile', 'mean', 'bits'}`` (the ``percentile`` (0-100, linear interpolation as
    NumPy's) and the mean of its input after ReLU, float32 scalars, and the a_bits it ran
    at), for an LSQ weight ``{'bits'}`` (its w_bits). Pure; jit it.
    """

    def statistics(params, batch_stats, images, w_bits, a_bits):
        if lift_clips:
            rest, ranges = split_learned_ranges(params)
            lifted = jax.tree.map(lambda r: jnp.full_like(r, jnp.inf), ranges)
            params = merge_learned_ranges(rest, lifted)
        variables = {"params": params, "batch_stats": batch_stats}
        precision = Precision(w_bits, a_bits, jnp.ones_like(w_bits))
        _, sown = model.apply(
            variables, images, precision, train=False, mutable=[CALIBRATION_COLLECTION]
        )
        # {module path: its sown values}: a conv with LSQ weights records its bit-width, and its
        # ``input_quantizer`` its input, with ``activation_placement='conv_input'``.
        records = {}
        for (*module, key), values in flatten_dict(sown.get(CALIBRATION_COLLECTION, {})).items():
            records.setdefault("/".join(module), {})[key] = values[0]
        out = {}
        for path, record in records.items():
            if SOWN_WEIGHT_BITS in record:
                out[path] = {"bits": record[SOWN_WEIGHT_BITS]}
            else:
                x = jax.nn.relu(record[SOWN_INPUT].astype(jnp.float32))
                out[path] = {
                    "percentile": high_percentile(x, percentile),
                    "mean": jnp.mean(x),
                    "bits": record[SOWN_BITS],
                }
        return out

    return statistics


def average_statistics(per_batch: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict:
    """The mean over batches of every statistic (float64 on the host)."""
    host = jax.device_get(list(per_batch))
    return jax.tree.map(lambda *v: float(np.mean(np.asarray(v, np.float64))), *host)


# ------------------------------------------------------------------------------ the ranges


def lsq_activation_range(mean_after_relu: float, bits: float) -> float:
    """LSQ's initial range for an activation: ``s (2^b - 1)`` with ``s = 2 mean / sqrt(Q_P)``,
    ``Q_P = 2^b - 1`` (so ``2 mean sqrt(2^b - 1)``)."""
    return 2.0 * mean_after_relu * math.sqrt(float(lsq_level_count(bits)))


def calibrated_ranges(
    params: Mapping[str, Any], statistics: Mapping[str, Mapping[str, float]], activation_rule: str
) -> tuple[dict, dict[str, int]]:
    """A network's parameters with the learned ranges that ``statistics`` marks for
    calibration (recorded bit-width above 32, `calibration_target`) set from it.

    Args:
      params: the network's parameters (nested dicts).
      statistics: `average_statistics` of `make_range_statistics`.
      activation_rule: 'percentile' or 'lsq', for the activations' clips and ranges.

    Returns:
      (new parameters, {'weights': n, 'activations': n, 'kept': n}: how many ranges were set,
      and how many marked ones kept their value for want of a positive statistic).
    """
    rest, ranges = split_learned_ranges(params)
    counts = {"weights": 0, "activations": 0, "kept": 0}

    def calibrate(key_path: tuple, old: jax.Array) -> jax.Array:
        *module, name = (key.key for key in key_path)
        values = statistics["/".join(module)]
        bits = calibration_target(values["bits"])
        if bits is None:
            return old
        kind = "weights" if name == WEIGHT_RANGE_PARAM else "activations"
        if kind == "weights":
            kernel = functools.reduce(operator.getitem, (*module, "kernel"), params)
            new = lsq_initial_range(kernel, bits, True, per_channel=old.ndim == 1)
        elif activation_rule == PERCENTILE_RULE:
            new = values["percentile"]
        else:
            new = lsq_activation_range(values["mean"], bits)
        new = np.asarray(new, np.float32).reshape(old.shape)
        usable = bool(np.all(np.isfinite(new) & (new > 0)))
        counts[kind if usable else "kept"] += 1
        return jax.device_put(new, old.sharding) if usable else old

    new_ranges = jax.tree_util.tree_map_with_path(calibrate, ranges)
    return merge_learned_ranges(rest, new_ranges), counts


# ------------------------------------------------------------------------- BatchNorm


def make_batch_statistics_step(networks: Sequence[Network], mean, std) -> Callable:
    """Builds ``step(params, batch_stats, batch, bits) -> {network: this batch's statistics}``.

    Each network runs in train mode as the eval step would run it (students fully quantized at
    ``bits``), from running statistics of zero, so that Flax's update ``m * 0 + (1 - m) * b``
    leaves ``(1 - m)`` times the batch's mean and biased variance ``b``; dividing by ``1 - m``
    recovers them (to float32 rounding). ``batch_stats`` only gives the tree. Pure; jit it.
    """

    def step(params, batch_stats, batch, bits):
        images = normalize(batch["image"], mean, std)
        out = {}
        for net in networks:
            precision = None
            if net.model.quantized:
                w_bits, a_bits = bits[net.name]
                precision = Precision(w_bits, a_bits, jnp.ones_like(w_bits))
            zeros = jax.tree.map(jnp.zeros_like, batch_stats[net.name])
            variables = {"params": params[net.name], "batch_stats": zeros}
            _, new = net.model.apply(
                variables, images, precision, train=True, mutable=["batch_stats"]
            )
            out[net.name] = jax.tree.map(
                lambda s: s / (1.0 - BATCH_NORM_MOMENTUM), new["batch_stats"]
            )
        return out

    return step


def reestimate_batch_stats(step: Callable, state: TrainState, batches: Sequence, bits) -> Any:
    """New BatchNorm statistics: the average over ``batches`` of each batch's mean and biased
    variance (`make_batch_statistics_step`). The state itself is not changed.

    Raises:
      ValueError: for no batches.
    """
    if not batches:
        raise ValueError("BatchNorm re-estimation needs at least one batch")
    stats = (step(state.params, state.batch_stats, batch, bits) for batch in batches)
    total = functools.reduce(functools.partial(jax.tree.map, jnp.add), stats)
    return jax.tree.map(lambda s: s / len(batches), total)


# --------------------------------------------------------------------------------- run level


class RunInputs(NamedTuple):
    """What calibration reads of a run (`lbq.trainer.Trainer.calibration_inputs`).

    Attributes:
      plan: the run plan (its model, calibration and ``init_from``).
      networks: the run's networks; only students are calibrated.
      bits_per_stage: `lbq.trainer.host_stage_bits` of every stage of the run.
      first_batches: ``count -> the run's first count training batches`` ``{'image': (B, H,
        W, C) float32 in 0..255, ...}``.
      mean, std: the input normalisation (per channel, 0..255 units).
    """

    plan: RunPlan
    networks: Sequence[Network]
    bits_per_stage: Sequence[Bits]
    first_batches: Callable[[int], Sequence[Mapping[str, jax.Array]]]
    mean: Sequence[float]
    std: Sequence[float]


def calibrate_ranges(
    run: RunInputs,
    state: TrainState,
    bits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_batches: int,
    *,
    rule: str,
    lift_clips: bool,
    source: str,
) -> TrainState:
    """The state with its students' marked ranges calibrated on the run's first
    ``num_batches`` training batches (`make_range_statistics`, `calibrated_ranges`); logs what
    was set, by which rule, and ``source``.

    Args:
      bits: {student: (w_bits, a_bits)} of the pass (`start_calibration_bits`,
        `stage_calibration_bits`, ...); only the networks named here are calibrated.
    """
    batches = run.first_batches(num_batches)
    percentile = run.plan.calibration.percentile
    params = dict(state.params)
    for net in run.networks:
        if net.name not in bits:
            continue
        statistics = jax.jit(make_range_statistics(net.model, percentile, lift_clips))
        w_bits, a_bits = (jnp.asarray(b) for b in bits[net.name])
        on_batch = functools.partial(statistics, params[net.name], state.batch_stats[net.name])
        images = (normalize(batch["image"], run.mean, run.std) for batch in batches)
        per_batch = [on_batch(x, w_bits, a_bits) for x in images]
        params[net.name], counts = calibrated_ranges(
            params[net.name], average_statistics(per_batch), rule
        )
        log.info("%s", _describe(net.name, percentile, counts, rule, len(batches), source))
    return state.replace(params=params)


def start_ranges(run: RunInputs, state: TrainState) -> TrainState:
    """A new run's state, after its start weights were loaded, with the learned ranges that its
    first stage uses calibrated (module docstring): on ``init_from``'s model, or LSQ's
    first-batch rule from scratch."""
    model = run.plan.model
    if not model.learned_ranges:
        return state
    from_model = run.plan.init_from is not None
    if not from_model and model.activation_quantizer == "pact":
        log.info("PACT clips start at quant.pact_init_clip=%g", model.pact_init_clip)
    bits = start_calibration_bits(run.bits_per_stage, model, from_model)
    if bits is None:
        return state
    if from_model:
        calibration = run.plan.calibration
        rule, count, source = calibration.activation_rule, calibration.batches, "init_from"
    else:
        rule, count, source = LSQ_RULE, 1, "the initial weights"
    return calibrate_ranges(run, state, bits, count, rule=rule, lift_clips=True, source=source)


def stage_ranges(run: RunInputs, state: TrainState, index: int) -> TrainState:
    """The state at the start of stage ``index``: the LSQ ranges that the stage quantizes for
    the first time calibrated on the network as trained so far, then the bit-width change
    passes that ``quant.weight_range_at_bit_change`` and ``quant.activation_range_at_bit_change``
    ask for (`changed_weight_bits`, `changed_activation_bits`)."""
    if index == 0 or not run.plan.model.learned_ranges:
        return state
    calibration, stage = run.plan.calibration, index + 1
    rule = calibration.activation_rule
    passes = [  # (the pass's bit-widths, batches, what is read), in this order
        (stage_calibration_bits, calibration.batches, f"the network at the start of stage {stage}")
    ]
    if calibration.weight_range_at_bit_change == "lsq_rule":  # only the kernels are read
        passes.append((changed_weight_bits, 1, f"the weights at stage {stage}'s new bit-widths"))
    if calibration.activation_range_at_bit_change == "calibrate":
        source = f"the network at stage {stage}'s new bit-widths"
        passes.append((changed_activation_bits, calibration.batches, source))
    for marked_bits, num_batches, source in passes:
        bits = marked_bits(run.bits_per_stage, index, run.plan.model)
        if bits is not None:
            state = calibrate_ranges(
                run, state, bits, num_batches, rule=rule, lift_clips=False, source=source
            )
    return state


def _describe(
    name: str, percentile: float, counts: Mapping[str, int], rule: str, count: int, source: str
) -> str:
    if rule == PERCENTILE_RULE:
        rule_text = f"the {percentile:g}th percentile of the input after ReLU"
    else:
        rule_text = "LSQ's rule 2 mean(relu(x)) / sqrt(Q_P)"
    texts = {
        "weights": "LSQ weight ranges by LSQ's rule 2 mean|w| / sqrt(Q_P)",
        "activations": f"activation ranges by {rule_text}",
        "kept": "kept their value (no positive statistic)",
    }
    parts = [f"{counts[key]} {text}" for key, text in texts.items() if counts[key]]
    batches = f"{count} training batch{'es' if count > 1 else ''}"
    return f"calibrated {name}'s learned ranges on {source} ({batches}): " + "; ".join(parts)
