"""The trainer: a run's parts built from its plan (networks, optimizer, state, the compiled
steps), the global batches those steps take, and one evaluation pass over the eval split.

`build_trainer` is the one builder that the trainer, the benchmark (`lbq.bench`) and the tests
call; how its steps are sharded, and why stages and masks never recompile them, is in
docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lbq import calibrate, report
from lbq import data as lbq_data
from lbq.checkpoint import CheckpointError, load_variables
from lbq.data import DatasetInfo
from lbq.mesh import data_mesh
from lbq.models import get_model
from lbq.plan import RunPlan
from lbq.quant.layers import merge_learned_ranges, split_learned_ranges
from lbq.quant.precision import make_precision, unit_index
from lbq.quant.stochastic import reset_for_stage, stochastic_precision
from lbq.stages import Stage
from lbq.steps import Network, make_eval_step, make_train_step
from lbq.train_state import TrainState
from lbq.validate import ConfigError


def compute_dtype(name: str):
    """bfloat16 on accelerators and float32 on CPU for 'auto' (CPU bf16 convs are slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_networks(plan: RunPlan, num_classes: int) -> tuple[Network, ...]:
    """The student(s) and, with joint distillation, the full-precision teacher."""
    dtype = compute_dtype(plan.compute_dtype)

    def model(quantized: bool):
        return get_model(
            plan.model.name,
            num_classes=num_classes,
            quantized=quantized,
            dtype=dtype,
            **plan.model.kwargs(),
        )

    student = model(plan.model.quantized)
    units = None
    if plan.stochastic.enabled:
        units = unit_index(student.layer_names(), plan.stochastic.unit)[1]
    return tuple(
        Network(spec.name, model(False), True, spec.trainable)
        if spec.teacher
        else Network(spec.name, student, unit_of_layer=units, fixed_bits=spec.fixed_bits)
        for spec in plan.networks
    )


def build_optimizer(plan: RunPlan, networks: tuple[Network, ...]) -> optax.GradientTransformation:
    """One optimizer per trainable network, combined with `optax.multi_transform`.

    The learning rate is not part of it: the train step applies it from data.
    """
    transforms = {}
    for index, net in enumerate(n for n in networks if n.trainable):
        parts = []
        if net.unit_of_layer is not None:
            num_units = int(np.max(net.unit_of_layer)) + 1
            parts.append(
                stochastic_precision(num_units, plan.stochastic.schedule, seed=plan.seed + index)
            )
        opt = plan.optimizer
        if opt.name == "sgd":
            parts += [
                optax.add_decayed_weights(opt.weight_decay),
                optax.trace(decay=opt.momentum, nesterov=opt.nesterov),
            ]
        else:
            parts += [optax.scale_by_adam(), optax.add_decayed_weights(opt.weight_decay)]
        transforms[net.name] = optax.chain(*parts)
    return optax.multi_transform(
        transforms, lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()}
    )


def host_stage_bits(stage: Stage, networks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host-side {student: (w_bits [L], a_bits [L])} for a stage; extra students keep their
    own fixed bit-widths."""
    bits = {}
    for net in networks:
        if net.teacher:
            continue
        if net.fixed_bits is None:
            w, a, blocks = stage.w_bits, stage.a_bits, stage.block_bits
        else:
            (w, a), blocks = net.fixed_bits, {}
        p = make_precision(net.model.layer_names(), w, a, block_bits=blocks)
        bits[net.name] = (p.w_bits, p.a_bits)
    return bits


def _check_shapes(source, target, field: str, path: str, network: str) -> None:
    """One line naming the first parameter whose shape differs (instead of a Flax traceback
    after compiling)."""
    theirs = dict(jax.tree_util.tree_flatten_with_path(source)[0])
    for key, ours in jax.tree_util.tree_flatten_with_path(target)[0]:
        shape = tuple(np.shape(theirs[key]))
        if shape != tuple(ours.shape):
            name = jax.tree_util.keystr(key, simple=True, separator="/")
            raise ConfigError(
                f"{field}={path!r}: {network} parameter {name} has shape {shape} there but "
                f"{tuple(ours.shape)} in this run (another model, classes or image size?)"
            )


def load_into(state: TrainState, path: str, mapping: Mapping[str, str], field: str) -> TrainState:
    """Copies networks' weights from another run: {our network: their network}.

    Learned quantizer ranges (PACT clips, LSQ ranges) are not copied: a full-precision run has
    none, and `lbq.calibrate.start_ranges` sets them for this run; ours keep their values.

    Raises:
      ConfigError: naming ``field`` when the run cannot be read, or its parameters do not fit
        (another structure, or the first parameter whose shape differs, with both shapes).
    """
    try:
        loaded = load_variables(path)
    except CheckpointError as error:
        raise ConfigError(f"{field}: {error}") from None
    params, stats = dict(state.params), dict(state.batch_stats)
    for ours, theirs in mapping.items():
        if theirs not in loaded:
            theirs = "student"
        source = loaded[theirs]
        for target, name in ((params, "params"), (stats, "batch_stats")):
            theirs_tree, ours_tree, ranges = source[name], target[ours], {}
            if name == "params":
                theirs_tree = split_learned_ranges(theirs_tree)[0]
                ours_tree, ranges = split_learned_ranges(ours_tree)
            want = jax.tree.structure(ours_tree)
            if jax.tree.structure(theirs_tree) != want:
                raise ConfigError(f"{field}={path!r}: {name} of {theirs!r} do not match {ours!r}")
            _check_shapes(theirs_tree, ours_tree, field, path, ours)
            copied = jax.tree.map(
                # A copy: two networks loaded from the same saved arrays (the student and the
                # teacher from one full-precision run) must not share a buffer, or donating the
                # state would donate it twice.
                lambda new, old: jax.device_put(jnp.array(new, old.dtype, copy=True), old.sharding),
                theirs_tree,
                ours_tree,
            )
            target[ours] = merge_learned_ranges(copied, ranges) if ranges else copied
    return state.replace(params=params, batch_stats=stats)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled parts of a run and what they run on.

    Attributes:
      plan: the run plan.
      info: the dataset's description (classes, image shape, normalisation).
      networks: students and teacher.
      optimizer: over {name: params} of the trainable networks.
      mesh: the ('data',) device mesh; ``replicated`` and ``batch_sharding`` are its
        shardings for the state and the batches.
      train_step: jitted ``(state, batch, {'lr', 'bits'}) -> (state, metrics)``, the state
        donated.
      eval_step: jitted ``(state, batch, bits) -> sums``.
      batch_stats_step: jitted ``(params, batch_stats, batch, bits) -> {network: the batch's
        BatchNorm statistics}`` (`lbq.calibrate.make_batch_statistics_step`), for BatchNorm
        re-estimation before evaluations.
    """

    plan: RunPlan
    info: DatasetInfo
    networks: tuple[Network, ...]
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    train_step: jax.stages.Wrapped
    eval_step: jax.stages.Wrapped
    batch_stats_step: jax.stages.Wrapped | None = None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    def init_state(self) -> TrainState:
        """Fresh parameters for every network, replicated over the mesh."""
        key = jax.random.key(self.plan.seed)
        shape = (1, *self.info.image_shape)
        params, stats = {}, {}
        for index, net in enumerate(self.networks):
            model = net.model
            precision = make_precision(model.layer_names(), 32, 32) if model.quantized else None
            init = jax.jit(
                lambda k, m=model, p=precision: m.init(k, jnp.zeros(shape), p),
                out_shardings=self.replicated,
            )
            variables = init(jax.random.fold_in(key, index))
            params[net.name] = variables["params"]
            stats[net.name] = variables.get("batch_stats", {})
        trainable = {n.name: params[n.name] for n in self.networks if n.trainable}
        return TrainState(
            step=jax.device_put(jnp.int32(0), self.replicated),
            params=params,
            batch_stats=stats,
            opt_state=jax.device_put(self.optimizer.init(trainable), self.replicated),
            first_nonfinite=jax.device_put(jnp.int32(-1), self.replicated),
        )

    def calibration_inputs(self) -> calibrate.RunInputs:
        """What `lbq.calibrate` reads of this run: `host_stage_bits` of every stage of the plan, in
        order, and `first_batches`."""
        bits = [host_stage_bits(stage, self.networks) for stage in self.plan.stages]
        mean, std = self.info.mean, self.info.std
        return calibrate.RunInputs(self.plan, self.networks, bits, self.first_batches, mean, std)

    def start_stage(self, state: TrainState, stage: Stage) -> TrainState:
        """The state at the first step of ``stage``, the one place a stage starts: its learned
        ranges calibrated (`lbq.calibrate.stage_ranges`), then a fresh optimizer state."""
        state = calibrate.stage_ranges(self.calibration_inputs(), state, stage.index)
        return self.fresh_optimizer_state(state, stage)

    def fresh_optimizer_state(self, state: TrainState, stage: Stage) -> TrainState:
        """The state with the optimizer state that ``stage`` starts with (a per-stage key for
        stochastic precision), replicated like the rest of the state so the compiled step sees
        the same input types."""
        trainable = {n.name: state.params[n.name] for n in self.networks if n.trainable}
        opt_state = self.optimizer.init(trainable)
        if self.plan.stochastic.enabled:
            key = jax.random.fold_in(jax.random.key(self.plan.seed + 1), stage.index)
            opt_state = reset_for_stage(
                opt_state, stage.num_steps, key, self.plan.stochastic.schedule
            )
        return state.replace(opt_state=jax.device_put(opt_state, self.replicated))

    def stage_bits(self, stage: Stage):
        """The bit-widths of ``stage``, on the devices."""
        return jax.device_put(host_stage_bits(stage, self.networks), self.replicated)

    def load_start_weights(self, state: TrainState) -> TrainState:
        """A new run's state with the weights of ``init_from`` and ``distill.teacher_init``,
        and its learned quantizer ranges calibrated (`lbq.calibrate.start_ranges`)."""
        if self.plan.init_from:
            mapping = {n.name: n.name for n in self.networks}
            state = load_into(state, self.plan.init_from, mapping, "init_from")
        distill = self.plan.distill
        if distill.enabled and distill.teacher_init:
            mapping = {"teacher": "teacher"}
            state = load_into(state, distill.teacher_init, mapping, "distill.teacher_init")
        return calibrate.start_ranges(self.calibration_inputs(), state)

    def first_batches(self, count: int) -> list[dict[str, jax.Array]]:
        """The run's first ``count`` training batches (steps 0.. of the data order, with the
        training augmentation), global and sharded like the train step's: what calibration and
        BatchNorm re-estimation read."""
        local_batches = _host_train_batches(self.plan, start_step=0)
        try:
            return [_global(self, local) for local in itertools.islice(local_batches, count)]
        finally:
            local_batches.close()  # stops its decode threads

    def evaluation_state(self, state: TrainState, bits) -> TrainState:
        """The state an evaluation uses: with ``eval.recalibrate_bn_batches`` = N > 0, its
        BatchNorm statistics re-estimated over the run's first N training batches
        (`lbq.calibrate.reestimate_batch_stats`); else ``state``. The train state itself is
        not changed."""
        count = self.plan.calibration.recalibrate_bn_batches
        if not count:
            return state
        batches = self.first_batches(count)
        stats = calibrate.reestimate_batch_stats(self.batch_stats_step, state, batches, bits)
        return state.replace(batch_stats=stats)


def build_trainer(
    plan: RunPlan, info: DatasetInfo, mesh: jax.sharding.Mesh | None = None, donate: bool = True
) -> Trainer:
    """Builds the networks, the optimizer and the jitted steps of ``plan`` (nothing is
    compiled until the steps first run).

    Args:
      plan: from `lbq.plan.parse_config`.
      info: the dataset the steps will see (`lbq.data.get_info`, or a synthetic one).
      mesh: the devices; all of them by default.
      donate: let the train step reuse the input state's buffers (the trainer and the
        benchmark); False keeps the input state readable after a step (tests compare them).
    """
    mesh = mesh or data_mesh()
    networks = build_networks(plan, info.num_classes)
    optimizer = build_optimizer(plan, networks)
    repl, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    train_step = jax.jit(
        make_train_step(
            networks,
            optimizer,
            plan.distill.weights,
            info.mean,
            info.std,
            skip_nonfinite=plan.on_nonfinite == "skip",
        ),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,) if donate else (),
    )
    eval_step = jax.jit(
        make_eval_step(networks, info.mean, info.std),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=repl,
    )
    batch_stats_step = jax.jit(
        calibrate.make_batch_statistics_step(networks, info.mean, info.std),
        in_shardings=(repl, repl, batch_sharding, repl),
        out_shardings=repl,
    )
    return Trainer(plan, info, networks, optimizer, mesh, train_step, eval_step, batch_stats_step)


def check_networks_build(trainer: Trainer) -> None:
    """Every network initialises on the dataset's images (shapes only: nothing is computed).

    Raises:
      ConfigError: naming model.name and the image size, with the model's own reason.
    """
    shape = trainer.info.image_shape
    for net in trainer.networks:
        try:
            report.parameter_count(net.model, shape)
        except Exception as error:  # noqa: BLE001 - any failure here is model vs. input
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"model.name={trainer.plan.model.name!r} cannot be built for "
                f"{shape[0]}x{shape[1]} images (data.image_size={trainer.plan.data.image_size}):"
                f" {type(error).__name__}: {reason}"
            ) from None


# ------------------------------------------------------------------------------------ batches


def _global(trainer: Trainer, local: dict) -> dict:
    """A process's share of a batch as global arrays on the trainer's batch sharding."""
    return {
        k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
        for k, v in local.items()
    }


def train_batches(trainer: Trainer, start_step: int, on_device: bool) -> Iterator[dict]:
    """Global training batches ``{'image': (B, H, W, C) float32, 'label': (B,) int32}`` from
    step ``start_step`` on: the same batches at a given step whether or not the run resumed.

    Each process reads its own share of a batch and ``jax.make_array_from_process_local_data``
    assembles the global array; ``on_device`` (``data_on_device``) holds the whole split in
    device memory instead and samples the batches there (`lbq.data.device_train_batch`).
    """
    if not on_device:
        for local in _host_train_batches(trainer.plan, start_step):
            yield _global(trainer, local)
        return
    plan, info = trainer.plan, trainer.info
    images, labels = lbq_data.load_split_arrays(plan.data, plan.data.train_split)
    images, labels = jax.device_put((images, labels), trainer.replicated)
    key = jax.random.key(plan.seed)
    sample = jax.jit(
        lambda images, labels, step: lbq_data.device_train_batch(
            images,
            labels,
            key,
            step,
            global_batch=plan.batch_size,
            num_train=info.num_train,
            pad=4 if plan.data.augment == "cifar" else 0,
            flip=plan.data.augment != "none",
        ),
        out_shardings=trainer.batch_sharding,
    )
    for step in itertools.count(start_step):
        image, label = sample(images, labels, jnp.int32(step))
        yield {"image": image, "label": label}


def _host_train_batches(plan: RunPlan, start_step: int) -> Iterator[dict]:
    """This process's share of every training batch from ``start_step`` on."""
    return lbq_data.train_iterator(
        plan.data,
        seed=plan.seed,
        global_batch=plan.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def evaluate_split(trainer: Trainer, state, bits) -> dict[str, dict[str, float]]:
    """Top-1, top-5 (fractions) and mean cross-entropy loss of every network on the eval split.

    Args:
      trainer: the built trainer (its ``eval_step`` sums the metrics over a batch).
      state: the train state to evaluate.
      bits: the per-network bit-widths (`Trainer.stage_bits`); students run fully quantized.

    Returns:
      ``{network: {'top1', 'top5', 'loss'}}`` as Python floats, averaged over every image of
      the split (padding excluded).
    """
    totals = None
    for local in lbq_data.eval_iterator(
        trainer.plan.data,
        global_batch=trainer.plan.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        sums = trainer.eval_step(state, _global(trainer, local), bits)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    result: dict[str, dict[str, float]] = {}
    for key, value in totals.items():
        net, metric = key.split("/")
        result.setdefault(net, {})[metric] = float(value) / count
    return result
