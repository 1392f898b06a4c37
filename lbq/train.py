"""The training loop: `train_and_evaluate(config, workdir)`.

One global step counter runs through the stages of the config. The train step is compiled
once with `jax.jit` over a ('data',) mesh: batches are sharded, parameters and optimizer state
are replicated, and the state is donated. BatchNorm statistics are therefore computed over the
global batch (synchronised BatchNorm). Learning rates, bit-widths and stochastic masks are data,
so stages and masks never recompile the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lbq import data as lbq_data
from lbq import metrics as lbq_metrics
from lbq.checkpoint import CheckpointError, Checkpoints, load_variables
from lbq.models import get_model
from lbq.quant.precision import ProbabilitySchedule, start_stage, stochastic_precision
from lbq.quant.spec import make_precision, unit_index
from lbq.schedules import Stage, build_stages, stage_at
from lbq.steps import LossWeights, Network, TrainState, make_eval_step, make_train_step
from lbq.validate import ConfigError, validate_config

log = logging.getLogger("lbq")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: rerun the same command to resume
# Fields that may differ when a run resumes: they do not change what is computed.
RESUMABLE_CHANGES = (
    "progress",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_epochs",
    "eval_batch_size",
    "data.workers",
    "data.cache",  # batches are bit-identical with and without the cache
    "data.data_dir",
    "distributed",
    "on_config_change",
    "on_nonfinite",
)


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` returns.

    Attributes:
      status: 'completed' or 'preempted'.
      step: the global step reached.
      stages: per stage, {'name', 'w_bits', 'a_bits', 'steps', 'eval': {network: metrics}}.
      final: the last evaluation, {network: {'top1', 'top5', 'loss'}}.
      images_per_second: mean training throughput of this invocation.
      train_step_compilations: how many times the train step was compiled (1 when bit-widths,
        stages and masks all flowed through as data).
    """

    status: str
    step: int
    stages: list[dict[str, Any]]
    final: dict[str, dict[str, float]]
    images_per_second: float
    train_step_compilations: int = 0


# ----------------------------------------------------------------------------- setup


def maybe_initialize_distributed(config) -> None:
    """Calls `jax.distributed.initialize()` when the config or LBQ_DISTRIBUTED asks for it.

    With LBQ_COORDINATOR_ADDRESS, LBQ_NUM_PROCESSES and LBQ_PROCESS_ID all set (launch/local.sh,
    launch/gpu_slurm.sh), they are passed explicitly and JAX's cluster detection is switched
    off, so every local device stays visible to the process. Otherwise JAX detects the cluster
    itself (Cloud TPU, SLURM, Open MPI).
    """
    wanted = config.distributed or os.environ.get("LBQ_DISTRIBUTED", "") not in ("", "0")
    if not wanted or _distributed_is_initialized():
        return
    names = ("LBQ_COORDINATOR_ADDRESS", "LBQ_NUM_PROCESSES", "LBQ_PROCESS_ID")
    given = [os.environ.get(name, "") for name in names]
    if not any(given):
        jax.distributed.initialize()
        return
    if not all(given):
        missing = ", ".join(n for n, v in zip(names, given, strict=True) if not v)
        raise ConfigError(f"distributed run: {missing} unset; set all of {', '.join(names)}")
    try:
        count, index = int(given[1]), int(given[2])
    except ValueError:
        raise ConfigError(
            f"distributed run: LBQ_NUM_PROCESSES={given[1]!r} and LBQ_PROCESS_ID={given[2]!r} "
            "must be integers"
        ) from None
    jax.distributed.initialize(
        coordinator_address=given[0],
        num_processes=count,
        process_id=index,
        cluster_detection_method="deactivate",
    )


def _distributed_is_initialized() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except (ImportError, AttributeError):
        return False


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over all devices, in Auto mode: shardings are given to `jax.jit`
    (batches split, state replicated) rather than carried in array types."""
    count = num_devices or jax.device_count()
    return jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def compute_dtype(name: str):
    """bfloat16 on accelerators and float32 on CPU for 'auto' (CPU bf16 convs are slow)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def _model_kwargs(config) -> dict[str, Any]:
    kwargs = {"per_channel": config.model.per_channel, "logit_scale": config.model.logit_scale}
    if config.model.name in ("resnet20", "resnet32", "resnet56", "preresnet20"):
        kwargs["shortcut"] = config.model.shortcut
    return kwargs


def build_networks(config, info: lbq_data.DatasetInfo) -> tuple[Network, ...]:
    """The student(s) and, with joint distillation, the full-precision teacher."""
    dtype = compute_dtype(config.compute_dtype)

    def model(quantized: bool):
        return get_model(
            config.model.name,
            num_classes=info.num_classes,
            quantized=quantized,
            dtype=dtype,
            **_model_kwargs(config),
        )

    student = model(config.model.quantized)
    units = None
    if config.stochastic.enabled:
        units = unit_index(student.layer_names(), config.stochastic.unit)[1]
    networks = [Network("student", student, unit_of_layer=units)]
    if config.distill.enabled:
        for w_bits, a_bits in config.distill.extra_students:
            networks.append(Network(f"student_w{w_bits}a{a_bits}", student, unit_of_layer=units))
        networks.append(
            Network(
                "teacher", model(False), teacher=True, trainable=config.distill.teacher == "joint"
            )
        )
    return tuple(networks)


def build_optimizer(config, networks: tuple[Network, ...]) -> optax.GradientTransformation:
    """One optimizer per trainable network, combined with `optax.multi_transform`.

    The learning rate is not part of it: the train step applies it from data.
    """
    schedule = probability_schedule(config)
    transforms = {}
    for index, net in enumerate(n for n in networks if n.trainable):
        parts = []
        if net.unit_of_layer is not None:
            num_units = int(np.max(net.unit_of_layer)) + 1
            parts.append(stochastic_precision(num_units, schedule, seed=config.seed + index))
        opt = config.optimizer
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


def probability_schedule(config) -> ProbabilitySchedule:
    s = config.stochastic
    return ProbabilitySchedule(s.schedule, float(s.p_start), float(s.full_at), int(s.num_steps))


def build_run_stages(config, networks, steps_per_epoch: int) -> list[Stage]:
    """The stages on the global step counter, validated against the student's blocks."""
    s = config.schedule
    lr_defaults = {n.name: float(s.teacher_lr if n.teacher else s.lr) for n in networks}
    defaults = {
        "w_bits": config.quant.w_bits,
        "a_bits": config.quant.a_bits,
        "lr": lr_defaults,
        "lr_schedule": s.lr_schedule,
        "lr_boundaries": tuple(s.lr_boundaries),
        "lr_decay": s.lr_decay,
        "warmup_epochs": s.warmup_epochs,
    }
    try:
        stages = build_stages(
            list(config.stages),
            defaults=defaults,
            networks=[n.name for n in networks if n.trainable],
            steps_per_epoch=steps_per_epoch,
        )
        names = networks[0].model.layer_names()
        for stage in stages:
            make_precision(names, stage.w_bits, stage.a_bits, block_bits=stage.block_bits)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return stages


def stage_bits(stage: Stage, networks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host-side {student: (w_bits [L], a_bits [L])} for a stage."""
    bits = {}
    for net in networks:
        if net.teacher:
            continue
        if net.name == "student":
            w, a, blocks = stage.w_bits, stage.a_bits, stage.block_bits
        else:  # extra students keep the bits in their name
            w, a = (int(v) for v in net.name.removeprefix("student_w").split("a"))
            blocks = {}
        p = make_precision(net.model.layer_names(), w, a, block_bits=blocks)
        bits[net.name] = (p.w_bits, p.a_bits)
    return bits


def jit_train_step(config, networks, optimizer, weights, info, mesh):
    """The compiled train step: batch sharded over ``mesh``, state replicated and donated."""
    repl, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(
        make_train_step(
            networks,
            optimizer,
            weights,
            info.mean,
            info.std,
            skip_nonfinite=config.on_nonfinite == "skip",
        ),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def init_state(config, networks, optimizer, info, sharding) -> TrainState:
    """Fresh parameters for every network, placed with ``sharding``."""
    key = jax.random.key(config.seed)
    shape = (1, *info.image_shape)
    params, stats = {}, {}
    for index, net in enumerate(networks):
        precision = None
        if net.model.quantized:
            precision = make_precision(net.model.layer_names(), 32, 32)
        init = jax.jit(
            lambda k, net=net, p=precision: net.model.init(k, jnp.zeros(shape), p),
            out_shardings=sharding,
        )
        variables = init(jax.random.fold_in(key, index))
        params[net.name] = variables["params"]
        stats[net.name] = variables.get("batch_stats", {})
    trainable = {n.name: params[n.name] for n in networks if n.trainable}
    opt_state = jax.device_put(optimizer.init(trainable), sharding)
    return TrainState(
        step=jax.device_put(jnp.int32(0), sharding),
        params=params,
        batch_stats=stats,
        opt_state=opt_state,
        first_nonfinite=jax.device_put(jnp.int32(-1), sharding),
    )


def _load_into(state: TrainState, path: str, mapping: dict[str, str], field: str) -> TrainState:
    """Copies networks' weights from another run: {our network: their network}."""
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
            want = jax.tree.structure(target[ours])
            if jax.tree.structure(source[name]) != want:
                raise ConfigError(f"{field}={path!r}: {name} of {theirs!r} do not match {ours!r}")
            target[ours] = jax.tree.map(
                lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                source[name],
                target[ours],
            )
    return state.replace(params=params, batch_stats=stats)


def fresh_optimizer_state(config, optimizer, state: TrainState, networks, stage: Stage, sharding):
    """A new optimizer state for a stage, with a per-stage key for stochastic precision,
    placed like the rest of the state (so the compiled step sees the same input types)."""
    trainable = {n.name: state.params[n.name] for n in networks if n.trainable}
    opt_state = optimizer.init(trainable)
    if config.stochastic.enabled:
        key = jax.random.fold_in(jax.random.key(config.seed + 1), stage.index)
        opt_state = start_stage(opt_state, stage.num_steps, key, probability_schedule(config))
    return jax.device_put(opt_state, sharding)


# ----------------------------------------------------------------------------- workdir


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], dict):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))  # stages[0].w_bits
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for each field that differs and matters for the computation."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if json.dumps(va, default=str) != json.dumps(vb, default=str):
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def prepare_workdir(config, workdir: str, is_host0: bool) -> None:
    """Checks the workdir's recorded config against this one; writes it for a new run."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"{path} is unreadable ({error}); delete it to resume the run in "
                f"{workdir} with the current config"
            ) from None
        diffs = config_differences(previous, current)
        if diffs and config.on_config_change == "refuse":
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config ("
                + "; ".join(diffs)
                + "). Rerun with --config.on_config_change=continue to resume it with the new "
                "config, or =overwrite to start over."
            )
        if diffs and config.on_config_change == "overwrite" and is_host0:
            log.warning("overwriting the run in %s", workdir)
            for name in ("checkpoints", "checkpoints_unreadable", "metrics.jsonl", "tensorboard"):
                target = os.path.join(workdir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
    if is_host0:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:  # write and rename: a kill never leaves half a file
            json.dump(current, f, indent=2)
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- signals


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT into a flag that the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without a checkpoint
        log.warning(
            "received %s: saving a checkpoint at the next step boundary",
            signal.Signals(signum).name,
        )
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self, sync: bool) -> bool:
        """Whether to stop now; with several processes all of them must agree (at ``sync``)."""
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))


# ----------------------------------------------------------------------------- loop


def _batches(config, info, batch_sharding, repl, start_step: int) -> Iterator[dict]:
    """Global, sharded training batches from the host pipeline or from device memory."""
    if config.data.on_device:
        images, labels = lbq_data.load_split_arrays(config.data, config.data.train_split)
        images, labels = jax.device_put((images, labels), repl)
        key = jax.random.key(config.seed)
        sample = jax.jit(
            lambda images, labels, step: lbq_data.device_train_batch(
                images,
                labels,
                key,
                step,
                global_batch=config.batch_size,
                num_train=info.num_train,
                pad=4 if config.data.augment == "cifar" else 0,
                flip=config.data.augment != "none",
            ),
            out_shardings=batch_sharding,
        )
        step = start_step
        while True:
            image, label = sample(images, labels, jnp.int32(step))
            yield {"image": image, "label": label}
            step += 1
    iterator = lbq_data.train_iterator(
        config.data,
        seed=config.seed,
        global_batch=config.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for local in iterator:
        yield {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()
        }


def evaluate(config, state, eval_step, bits, batch_sharding) -> dict[str, dict[str, float]]:
    """Top-1, top-5 and loss of every network on the eval split (students fully quantized)."""
    totals = None
    for local in lbq_data.eval_iterator(
        config.data,
        global_batch=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()
        }
        sums = eval_step(state, batch, bits)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    result: dict[str, dict[str, float]] = {}
    for key, value in totals.items():
        net, metric = key.split("/")
        result.setdefault(net, {})[metric] = float(value) / count
    return result


def train_and_evaluate(config, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains and evaluates the run that ``config`` describes, resuming from ``workdir``.

    Args:
      config: an ml_collections ConfigDict (see configs/default.py).
      workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
      stop_at_step: stop as a preemption would once this global step is done (checkpoint
        saved, status 'preempted'): a deterministic stand-in for SIGTERM, for tests and for
        splitting a run over several jobs.

    Returns:
      A `RunResult`.

    Raises:
      ConfigError, lbq.data.DataError: for bad configs or data, before anything compiles.
      NonFiniteError: when the loss or a gradient stops being finite (on_nonfinite='stop').
      CheckpointError: when the workdir's checkpoints exist but none can be read.
    """
    maybe_initialize_distributed(config)
    validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    info = lbq_data.get_info(config.data)
    steps_per_epoch = info.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the {info.num_train} training images"
        )
    networks = build_networks(config, info)
    stages = build_run_stages(config, networks, steps_per_epoch)
    total_steps = stages[-1].end_step
    is_host0 = jax.process_index() == 0

    mesh = data_mesh()
    repl = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    optimizer = build_optimizer(config, networks)
    weights = LossWeights.from_config(config.distill)

    prepare_workdir(config, workdir, is_host0)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints)
    state = init_state(config, networks, optimizer, info, repl)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpoints.restore_latest(abstract)
    stage_results: list[dict[str, Any]] = []
    if restored is not None:
        state, meta = restored
        stage_results = list(meta.get("stage_results", []))
        if config.on_nonfinite == "stop":  # steps skipped earlier under 'skip' are history
            state = state.replace(first_nonfinite=jax.device_put(jnp.int32(-1), repl))
        log.info("resumed from step %d (stage %s)", int(state.step), meta.get("stage_name"))
    else:
        if config.init_from:
            state = _load_into(
                state, config.init_from, {n.name: n.name for n in networks}, "init_from"
            )
        if config.distill.enabled and config.distill.teacher_init:
            state = _load_into(
                state, config.distill.teacher_init, {"teacher": "teacher"}, "distill.teacher_init"
            )

    train_step = jit_train_step(config, networks, optimizer, weights, info, mesh)
    eval_step = jax.jit(
        make_eval_step(networks, info.mean, info.std),
        in_shardings=(repl, batch_sharding, repl),
        out_shardings=repl,
    )

    step = int(jax.device_get(state.step))
    writer = lbq_metrics.MetricsWriter(workdir, enabled=is_host0, start_step=step)
    progress = lbq_metrics.Progress(total_steps, step, enabled=is_host0 and config.progress)
    eval_every = round(config.eval_every_epochs * steps_per_epoch)
    final: dict[str, dict[str, float]] = {}
    status = "completed"
    run_images, run_seconds = 0, 0.0
    batches = _batches(config, info, batch_sharding, repl, step)

    def meta(stage: Stage) -> dict[str, Any]:
        return {
            "stage": stage.index,
            "stage_name": stage.name,
            "epoch": step / steps_per_epoch,
            "stage_results": stage_results,
        }

    def stop_if_nonfinite() -> None:
        """Raises NonFiniteError once a step was not finite (on_nonfinite='stop')."""
        first_bad = int(jax.device_get(state.first_nonfinite))
        if first_bad < 0 or config.on_nonfinite != "stop":
            return
        checkpoints.wait()
        good = checkpoints.steps()
        # first_nonfinite counts the steps done before the bad one; metrics.jsonl and the
        # checkpoints number a step by the count after it.
        raise NonFiniteError(
            f"non-finite loss or gradient at step {first_bad + 1}; the last good checkpoint is "
            + (f"step {good[-1]} in {checkpoints.directory}" if good else "none")
            + " (set on_nonfinite='skip' to skip such steps instead)"
        )

    def save(stage: Stage) -> None:
        stop_if_nonfinite()  # never checkpoint a state that froze at a non-finite step
        checkpoints.save(state, meta(stage))

    with PreemptionWatcher() as watcher:
        stage = stage_at(stages, step)
        bits = jax.device_put(stage_bits(stage, networks), repl)
        pending: list[dict] = []
        t_last, steps_since = time.time(), 0
        while step < total_steps:
            stage = stage_at(stages, step)
            if step == stage.start_step:
                bits = jax.device_put(stage_bits(stage, networks), repl)
                opt_state = fresh_optimizer_state(config, optimizer, state, networks, stage, repl)
                state = state.replace(opt_state=opt_state)
                if is_host0:
                    log.info(
                        "stage %d/%d '%s': w%d a%d, %d steps",
                        stage.index + 1,
                        len(stages),
                        stage.name,
                        stage.w_bits,
                        stage.a_bits,
                        stage.num_steps,
                    )
            lr = {name: np.float32(stage.learning_rate(step, name)) for name in stage.lr}
            state, step_metrics = train_step(state, next(batches), {"lr": lr, "bits": bits})
            pending.append(step_metrics)
            step += 1
            steps_since += 1
            stage_end = step == stage.end_step
            log_now = step % config.log_every_steps == 0 or stage_end or step == total_steps
            if log_now:
                values = lbq_metrics.mean_of(pending)
                pending = []
                elapsed = time.time() - t_last
                ips = steps_since * config.batch_size / max(elapsed, 1e-9)
                run_images += steps_since * config.batch_size
                run_seconds += elapsed
                t_last, steps_since = time.time(), 0
                values.update(
                    images_per_second=ips, stage=stage.index, epoch=step / steps_per_epoch
                )
                writer.write(step, "train", {**values, "stage_name": stage.name})
                progress.update(
                    step,
                    f"{stage.name} loss {values['loss']:.3f} "
                    f"acc {values['student/accuracy']:.3f} {ips:.0f} img/s",
                )
                stop_if_nonfinite()
            if (eval_every and step % eval_every == 0) or stage_end:
                final = evaluate(config, state, eval_step, bits, batch_sharding)
                writer.write(
                    step,
                    "eval",
                    {f"{n}/{k}": v for n, m in final.items() for k, v in m.items()}
                    | {"stage_name": stage.name},
                )
                if stage_end:  # a stage extended after it had ended is listed once
                    stage_results = [r for r in stage_results if r["name"] != stage.name]
                    stage_results.append(
                        {
                            "name": stage.name,
                            "w_bits": stage.w_bits,
                            "a_bits": stage.a_bits,
                            "steps": stage.num_steps,
                            "eval": final,
                        }
                    )
            if stage_end or step % config.checkpoint_every_steps == 0:
                save(stage)
            stop_now = watcher.should_stop(sync=log_now) or step == stop_at_step
            if stop_now and step < total_steps:
                save(stage)
                status = "preempted"
                break
        progress.close()
    checkpoints.close()
    writer.close()
    if not final:
        final = stage_results[-1]["eval"] if stage_results else {}
    result = RunResult(
        status,
        step,
        stage_results,
        final,
        run_images / run_seconds if run_seconds else 0.0,
        train_step._cache_size(),
    )
    if is_host0:
        print(format_summary(result, workdir))
    return result


def bits_label(w_bits: int, a_bits: int) -> str:
    return f"w{w_bits}a{a_bits}"


def format_summary(result: RunResult, workdir: str) -> str:
    """A one-screen summary of a run."""
    lines = [f"lbq run {result.status} at step {result.step}  ({workdir})"]
    if result.stages:
        lines.append(f"{'stage':<16}{'bits':>8}{'steps':>8}  eval top-1 per network")
        for s in result.stages:
            accs = "  ".join(f"{n} {m['top1']:.4f}" for n, m in s["eval"].items())
            lines.append(
                f"{s['name']:<16}{bits_label(s['w_bits'], s['a_bits']):>8}{s['steps']:>8}  {accs}"
            )
    for net, m in result.final.items():
        lines.append(
            f"final {net}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}"
        )
    if result.images_per_second:
        lines.append(f"training throughput: {result.images_per_second:.0f} images/s")
    return "\n".join(lines)
