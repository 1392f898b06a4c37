"""The training loop: `train_and_evaluate(config, workdir)`.

One global step counter runs through the stages of the run plan. The parts come from
`lbq.build.build_trainer` (networks, optimizer, compiled steps); the workdir decisions from
`lbq.workdir`; the devices from `lbq.mesh`. This module only drives them: batches in, metrics,
evaluations and checkpoints out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbq import calibrate, report
from lbq import data as lbq_data
from lbq import metrics as lbq_metrics
from lbq.build import Trainer, build_trainer
from lbq.checkpoint import CheckpointMismatch, Checkpoints
from lbq.mesh import maybe_initialize_distributed
from lbq.plan import RunPlan, parse_config, shadowed_overrides
from lbq.stages import Stage, lay_out, stage_at
from lbq.validate import ConfigError, check_type
from lbq.workdir import (
    PREEMPTED_EXIT_CODE,
    Preempted,
    PreemptionWatcher,
    WorkdirDecision,
    clear_run_outputs,
    exclusive_workdir,
    inspect_workdir,
    write_record,
)

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "NonFiniteError",
    "Preempted",
    "RunResult",
    "train_and_evaluate",
]

log = logging.getLogger("lbq")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite (on_nonfinite='stop'), or a stage skipped
    more than half of its steps as non-finite (on_nonfinite='skip')."""


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` returns.

    Attributes:
      status: 'completed' or 'preempted'.
      step: the global step reached.
      stages: per stage, {'name', 'w_bits', 'a_bits', 'bits', 'steps', 'eval': {network:
        metrics}}.
      final: the last evaluation, {network: {'top1', 'top5', 'loss'}}.
      images_per_second: mean training throughput of this invocation, evaluation excluded.
      train_step_compilations: how many times the train step was compiled (1 when bit-widths,
        stages and masks all flowed through as data).
      skipped_steps: {stage name: steps skipped as non-finite} (on_nonfinite='skip').
      stage_lengths: {stage name: its length in steps}, for the summary.
    """

    status: str
    step: int
    stages: list[dict[str, Any]]
    final: dict[str, dict[str, float]]
    images_per_second: float
    train_step_compilations: int = 0
    skipped_steps: dict[str, int] = dataclasses.field(default_factory=dict)
    stage_lengths: dict[str, int] = dataclasses.field(default_factory=dict)


def train_batches(trainer: Trainer, start_step: int, on_device: bool) -> Iterator[dict]:
    """Global, sharded training batches from the host pipeline or from device memory."""
    plan, info = trainer.plan, trainer.info
    if on_device:
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
        step = start_step
        while True:
            image, label = sample(images, labels, jnp.int32(step))
            yield {"image": image, "label": label}
            step += 1
    iterator = lbq_data.train_iterator(
        plan.data,
        seed=plan.seed,
        global_batch=plan.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for local in iterator:
        yield {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }


def evaluate(trainer: Trainer, state, bits) -> dict[str, dict[str, float]]:
    """Top-1, top-5 and loss of every network on the eval split (students fully quantized)."""
    totals = None
    for local in lbq_data.eval_iterator(
        trainer.plan.data,
        global_batch=trainer.plan.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }
        sums = trainer.eval_step(state, batch, bits)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    result: dict[str, dict[str, float]] = {}
    for key, value in totals.items():
        net, metric = key.split("/")
        result.setdefault(net, {})[metric] = float(value) / count
    return result


class _Loop:
    """The state of one invocation of the loop: step, metrics, stage results, timing."""

    def __init__(self, trainer, stages, workdir, state, meta, checkpoints, watcher):
        self.trainer, self.plan, self.stages = trainer, trainer.plan, stages
        self.state, self.step = state, int(jax.device_get(state.step))
        self.stage_results = list(meta.get("stage_results", []))
        # {stage name: steps skipped as non-finite}, kept in the checkpoints' records.
        self.skipped = dict(meta.get("skipped_steps", {}))
        self.unsettled: list[jax.Array] = []  # per-step 'finite' flags not yet counted
        self.checkpoints = checkpoints
        self.watcher = watcher
        self.is_host0 = jax.process_index() == 0
        self.steps_per_epoch = self.plan.steps_per_epoch(trainer.info.num_train)
        self.writer = lbq_metrics.MetricsWriter(
            workdir, enabled=self.is_host0, start_step=self.step
        )
        self.progress = lbq_metrics.Progress(
            stages[-1].end_step, self.step, enabled=self.is_host0 and self.plan.progress
        )
        self.final: dict[str, dict[str, float]] = {}
        self.pending: list[dict] = []
        self.train_images, self.train_seconds = 0, 0.0
        self.interval_start, self.interval_steps, self.eval_seconds = time.time(), 0, 0.0

    def meta(self, stage: Stage) -> dict[str, Any]:
        return {
            "stage": stage.index,
            "stage_name": stage.name,
            "epoch": self.step / self.steps_per_epoch,
            "stage_results": self.stage_results,
            "skipped_steps": self.skipped,
        }

    def last_checkpoint(self) -> str:
        good = self.checkpoints.steps()
        return f"step {good[-1]} in {self.checkpoints.directory}" if good else "none"

    def stop_if_nonfinite(self) -> None:
        """Raises NonFiniteError once a step was not finite (on_nonfinite='stop')."""
        first_bad = int(jax.device_get(self.state.first_nonfinite))
        if first_bad < 0 or self.plan.on_nonfinite != "stop":
            return
        self.checkpoints.wait()
        # first_nonfinite counts the steps done before the bad one; metrics.jsonl and the
        # checkpoints number a step by the count after it.
        raise NonFiniteError(
            f"non-finite loss or gradient at step {first_bad + 1}; the last good checkpoint is "
            f"{self.last_checkpoint()} (set on_nonfinite='skip' to skip such steps instead)"
        )

    def count_skipped(self, stage: Stage) -> None:
        """Adds the steps skipped since the last count to the stage's total.

        Raises:
          NonFiniteError: once more than half of the stage's steps were skipped: its result
            would then say little about the method (on_nonfinite='skip').
        """
        if not self.unsettled:
            return
        finite = np.asarray(jax.device_get(self.unsettled))
        self.unsettled = []
        total = self.skipped.get(stage.name, 0) + int(np.sum(finite == 0))
        self.skipped[stage.name] = total
        if 2 * total > stage.num_steps:
            self.checkpoints.wait()
            raise NonFiniteError(
                f"stage '{stage.name}' skipped {total} of its {stage.num_steps} steps by step "
                f"{self.step} (non-finite loss or gradient, on_nonfinite='skip'); with more than "
                "half of a stage skipped its result would mean little. Lower the learning rate "
                f"or check the data; the last checkpoint is {self.last_checkpoint()}"
            )

    def save(self, stage: Stage) -> None:
        self.stop_if_nonfinite()  # never checkpoint a state that froze at a non-finite step
        self.count_skipped(stage)  # nor one of a stage that has skipped most of its steps
        self.checkpoints.save(self.state, self.meta(stage))

    def start_stage(self, stage: Stage) -> Any:
        self.state = self.trainer.start_stage(self.state, stage)
        if self.is_host0:
            log.info(
                "stage %d/%d '%s': %s, %d steps",
                stage.index + 1,
                len(self.stages),
                stage.name,
                report.network_bits(self.plan, stage),
                stage.num_steps,
            )
        return self.trainer.stage_bits(stage)

    def log_interval(self, stage: Stage) -> None:
        values = lbq_metrics.mean_of(self.pending)
        self.pending = []
        # Evaluation time is not training time: it is left out of the rate.
        elapsed = max(time.time() - self.interval_start - self.eval_seconds, 1e-9)
        images = self.interval_steps * self.plan.batch_size
        ips = images / elapsed
        self.train_images += images
        self.train_seconds += elapsed
        self.interval_start, self.interval_steps, self.eval_seconds = time.time(), 0, 0.0
        values.update(
            images_per_second=ips, stage=stage.index, epoch=self.step / self.steps_per_epoch
        )
        if self.plan.on_nonfinite == "skip":
            try:
                self.count_skipped(stage)
            finally:  # the interval that crosses the limit is still written
                values["skipped_steps"] = self.skipped.get(stage.name, 0)
                self.writer.write(self.step, "train", {**values, "stage_name": stage.name})
        else:
            self.writer.write(self.step, "train", {**values, "stage_name": stage.name})
        self.progress.update(
            self.step, f"{stage.name} {report.progress_text(values)} {ips:.0f} img/s"
        )
        self.stop_if_nonfinite()

    def evaluate(self, stage: Stage, bits, stage_end: bool) -> None:
        start = time.time()
        if self.is_host0:
            log.info("evaluating at step %d on %d images", self.step, self.trainer.info.num_eval)
        # eval.recalibrate_bn_batches: re-estimated BatchNorm statistics, for this evaluation only
        evaluated = calibrate.evaluation_state(self.trainer, self.state, bits)
        self.final = evaluate(self.trainer, evaluated, bits)
        self.eval_seconds += time.time() - start
        if self.is_host0:
            log.info("eval at step %d: %s", self.step, report.eval_text(self.final))
        self.writer.write(
            self.step,
            "eval",
            {f"{n}/{k}": v for n, m in self.final.items() for k, v in m.items()}
            | {"stage_name": stage.name, "eval_split": self.plan.data.eval_split},
        )
        if stage_end:  # a stage extended after it had ended is listed once
            self.stage_results = [r for r in self.stage_results if r["name"] != stage.name]
            result = report.stage_result(self.plan, stage, self.final)
            if stage.name in self.skipped:
                result["skipped_steps"] = self.skipped[stage.name]
            self.stage_results.append(result)

    def run(self, stop_at_step: int | None) -> str:
        """Trains to the end of the last stage; returns 'completed' or 'preempted'."""
        plan, total = self.plan, self.stages[-1].end_step
        if self.watcher.should_stop(sync=True):
            return "preempted"  # a signal during start-up: nothing new to save
        eval_every = round(plan.eval_every_epochs * self.steps_per_epoch)
        batches = train_batches(self.trainer, self.step, plan.data_on_device)
        bits = self.trainer.stage_bits(stage_at(self.stages, self.step))
        if self.step < total and self.is_host0:
            log.info("compiling the train step (the first step waits for it)")
        while self.step < total:
            stage = stage_at(self.stages, self.step)
            if self.step == stage.start_step:
                bits = self.start_stage(stage)
            lr = {name: np.float32(stage.learning_rate(self.step, name)) for name in stage.lr}
            self.state, metrics = self.trainer.train_step(
                self.state, next(batches), {"lr": lr, "bits": bits}
            )
            self.pending.append(metrics)
            if plan.on_nonfinite == "skip":
                self.unsettled.append(metrics["finite"])
            self.step += 1
            self.interval_steps += 1
            stage_end = self.step == stage.end_step
            log_now = self.step % plan.log_every_steps == 0 or stage_end
            if log_now:
                self.log_interval(stage)
            # A background save that failed stops the run here (after a log interval, which
            # waits for the step, a write that fails within milliseconds is known).
            self.checkpoints.poll()
            if (eval_every and self.step % eval_every == 0) or stage_end:
                self.evaluate(stage, bits, stage_end)
            if stage_end or self.step % plan.checkpoint.every_steps == 0:
                self.save(stage)
            stop_now = self.watcher.should_stop(sync=log_now) or self.step == stop_at_step
            if stop_now and self.step < total:
                self.save(stage)
                return "preempted"
        return "completed"

    def close(self) -> None:
        self.progress.close()
        try:
            self.checkpoints.close()
        finally:
            self.writer.close()


# ----------------------------------------------------------------------------- start-up


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


def check_continuation(
    plan: RunPlan, stages: Sequence[Stage], step: int, meta: dict, decision: WorkdirDecision
) -> None:
    """Refuses a continued run (on_config_change='continue') whose ``config.json`` would no
    longer describe what the workdir holds.

    A continued run may extend its stages (the last finished one too, when the run stopped at
    its end) or add new ones. It may not end before the step it reached, change a stage that
    already finished and has a recorded result, or change a finished run (nothing would be
    computed with the new config).

    Raises:
      ConfigError: naming the changed fields.
    """
    if not decision.differences:
        return
    changes = "; ".join(decision.differences)
    workdir, total = decision.workdir, stages[-1].end_step
    advice = "use on_config_change=overwrite to start over, or another --workdir"
    if step > total:
        raise ConfigError(
            f"the run in {workdir} has trained {step} steps, but the stages now end at step "
            f"{total} ({changes}); a continued run may extend its stages or add stages, not cut "
            f"what already ran: {advice}"
        )
    if step == total:
        raise ConfigError(
            f"the run in {workdir} is complete at step {step}; continuing it with ({changes}) "
            "would train nothing, and config.json would no longer describe its results. "
            "Lengthen or add a stage to train more; to evaluate on another split, start a new "
            f"workdir with --config.init_from={workdir} and that data.eval_split"
        )
    start = 0
    results = meta.get("stage_results", [])
    for index, result in enumerate(results):
        end = start + int(result["steps"])
        new = stages[index] if index < len(stages) else None
        extended = (
            index == len(results) - 1 and end == step and new is not None and new.end_step > step
        )
        same = (
            new is not None
            and new.name == result["name"]
            and new.start_step == start
            and (extended or new.end_step == end)
            and (extended or report.network_bits(plan, new) == result.get("bits", new.bits_label))
        )
        if not same:
            raise ConfigError(
                f"stages[{index}] ('{result['name']}') finished at step {end} in {workdir} and "
                f"its result is recorded; the new config changes it ({changes}). A continued "
                f"run may extend its last finished stage or add stages: {advice}"
            )
        start = end


def _place(saved: Any, like: Any) -> Any:
    """``saved`` (host arrays of the same structure) with the dtypes and shardings of ``like``."""
    return jax.tree.map(
        lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding), saved, like
    )


def _with_new_optimizer(trainer: Trainer, fresh, saved: dict, stage: Stage):
    """``fresh`` with a checkpoint's step, parameters and BatchNorm statistics, and the
    optimizer state that ``stage`` starts with."""
    state = fresh.replace(
        step=jax.device_put(jnp.int32(saved["step"]), trainer.replicated),
        params=_place(saved["params"], fresh.params),
        batch_stats=_place(saved["batch_stats"], fresh.batch_stats),
        first_nonfinite=jax.device_put(
            jnp.int32(saved.get("first_nonfinite", -1)), trainer.replicated
        ),
    )
    return trainer.start_stage(state, stage)


def _mismatch_message(error: CheckpointMismatch, decision: WorkdirDecision) -> str:
    if decision.differences:
        return (
            f"{error}; the config changes ({'; '.join(decision.differences)}) cannot continue "
            f"it: use on_config_change=overwrite to start over, or another --workdir"
        )
    return f"{error}; was it written by another version of lbq? Use another --workdir"


def _restore(
    trainer: Trainer, stages: Sequence[Stage], decision: WorkdirDecision
) -> tuple[Checkpoints | None, Any, dict[str, Any]]:
    """(checkpoints, state, meta): the workdir's newest checkpoint, or a fresh state with the
    configured start weights (meta {}). Reads only: the checkpoints are opened without
    creating their folder and what they found to set aside stays until `_commit`.

    Raises:
      ConfigError: for a model that does not fit, a start-weights folder that cannot be
        used, or a continued run that the checkpoints cannot take (`check_continuation`).
      CheckpointError: when checkpoints exist but none can be read.
    """
    plan = trainer.plan
    state = trainer.init_state()
    if decision.overwrite:
        return None, trainer.load_start_weights(state), {}
    checkpoints = Checkpoints(decision.workdir, plan.checkpoint.keep, create=False)
    try:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        try:
            restored = checkpoints.restore(abstract, allow_new_optimizer=bool(decision.differences))
        except CheckpointMismatch as error:
            raise ConfigError(_mismatch_message(error, decision)) from None
        if restored is None:
            return checkpoints, trainer.load_start_weights(state), {}
        check_continuation(plan, stages, restored.step, restored.meta, decision)
        if restored.optimizer_restored:
            state = restored.state
        else:
            state = _with_new_optimizer(
                trainer, state, restored.state, stage_at(stages, restored.step)
            )
            log.warning(
                "restored the parameters and BatchNorm statistics of step %d; the optimizer "
                "state starts afresh, because the checkpoint's does not fit the changed "
                "config (%s)",
                restored.step,
                "; ".join(decision.differences),
            )
    except BaseException:
        checkpoints.close()
        raise
    if plan.on_nonfinite == "stop":  # steps skipped earlier under 'skip' are history
        state = state.replace(first_nonfinite=jax.device_put(jnp.int32(-1), trainer.replicated))
    log.info("resumed from step %d (stage %s)", restored.step, restored.meta.get("stage_name"))
    return checkpoints, state, restored.meta


def _commit(decision: WorkdirDecision, checkpoints: Checkpoints | None, keep: int) -> Checkpoints:
    """Writes to the workdir, now that everything that can fail before training has passed:
    deletes an overwritten run, sets aside unreadable checkpoints and interrupted saves, and
    writes ``config.json``.

    Raises:
      WorkdirError: when the workdir cannot be written.
    """
    if checkpoints is not None:
        try:
            checkpoints.set_aside()
        finally:
            checkpoints.close()
    if jax.process_index() == 0:
        if decision.overwrite:
            clear_run_outputs(decision.workdir)
        write_record(decision.workdir, decision.record)
    if jax.process_count() > 1:  # no process creates checkpoints/ while process 0 deletes it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lbq_commit")
    return Checkpoints(decision.workdir, keep)


def train_plan(plan: RunPlan, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains and evaluates ``plan``, resuming from ``workdir`` (see `train_and_evaluate`)."""
    info = lbq_data.get_info(plan.data)
    try:
        stages = lay_out(plan.stages, plan.steps_per_epoch(info.num_train))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    with PreemptionWatcher() as watcher, exclusive_workdir(workdir):
        watcher.raise_if_requested("nothing was written")
        decision = inspect_workdir(workdir, plan.record, plan.on_config_change)
        trainer = build_trainer(plan, info)
        check_networks_build(trainer)
        if jax.process_index() == 0:
            print(report.run_header(trainer, stages, workdir), flush=True)
        checkpoints, state, meta = _restore(trainer, stages, decision)
        try:
            watcher.raise_if_requested("nothing was written")
        except Preempted:
            if checkpoints is not None:
                checkpoints.close()
            raise
        checkpoints = _commit(decision, checkpoints, plan.checkpoint.keep)
        try:
            loop = _Loop(trainer, stages, workdir, state, meta, checkpoints, watcher)
        except BaseException:
            checkpoints.close()
            raise
        if decision.differences and meta and jax.process_index() == 0:
            log.warning(
                "continuing the run at step %d with a changed config: %s",
                loop.step,
                "; ".join(decision.differences),
            )
            loop.writer.write(loop.step, "config_change", {"changes": list(decision.differences)})
        try:
            status = loop.run(stop_at_step)
        finally:
            loop.close()
    final = loop.final or (loop.stage_results[-1]["eval"] if loop.stage_results else {})
    rate = loop.train_images / loop.train_seconds if loop.train_seconds else 0.0
    result = RunResult(
        status,
        loop.step,
        loop.stage_results,
        final,
        rate,
        trainer.train_step._cache_size(),
        dict(loop.skipped),
        {stage.name: stage.num_steps for stage in stages},
    )
    if jax.process_index() == 0:
        print(report.format_summary(result, workdir), flush=True)
    return result


def train_and_evaluate(
    config, workdir: str, *, stop_at_step: int | None = None, overridden: Sequence[str] = ()
) -> RunResult:
    """Trains and evaluates the run that ``config`` describes, resuming from ``workdir``.

    The run holds ``WORKDIR/lbq.lock`` while it runs (`lbq.workdir.WorkdirLock`) and writes
    nothing to the workdir before everything that can fail before the first step has passed.

    Args:
      config: an ml_collections ConfigDict (see lbq/configs/default.py).
      workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
      stop_at_step: stop as a preemption would once this global step is done (checkpoint
        saved, status 'preempted'): a deterministic stand-in for SIGTERM, for tests and for
        splitting a run over several jobs.
      overridden: the fields set on the command line (``quant.w_bits``, ...); one that every
        stage hides with its own value is refused rather than silently ignored.

    Returns:
      A `RunResult`; status 'preempted' after SIGTERM/SIGINT once training has started.

    Raises:
      ConfigError, lbq.data.DataError: for bad configs or data, before anything is written or
        compiled.
      WorkdirError: when another run holds the workdir, or it cannot be written.
      Preempted: when SIGTERM/SIGINT arrived before the first step (nothing was written).
      NonFiniteError: when the loss or a gradient stops being finite (on_nonfinite='stop'), or
        a stage skipped more than half of its steps (on_nonfinite='skip').
      CheckpointError: when the workdir's checkpoints exist but none can be read;
        CheckpointWriteError when a save fails (the run stops at once).
    """
    maybe_initialize_distributed(check_type(config, "distributed", "bool"))
    plan = parse_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    shadowed = shadowed_overrides(plan, list(overridden))
    if shadowed:
        raise ConfigError(shadowed[0])
    return train_plan(plan, workdir, stop_at_step=stop_at_step)
