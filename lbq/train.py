"""The training loop: `train_and_evaluate(config, workdir)`.

One global step counter runs through the stages of the run plan. This module only drives the
parts of `lbq.trainer`, `lbq.resume`, `lbq.workdir` and `lbq.mesh`: batches in, metrics,
evaluations and checkpoints out.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lbq import data as lbq_data
from lbq import metrics as lbq_metrics
from lbq import report
from lbq.mesh import maybe_initialize_distributed
from lbq.plan import RunPlan, check_type, parse_config, shadowed_overrides
from lbq.preemption import Preempted, PreemptionWatcher
from lbq.resume import commit, resume_or_start
from lbq.stages import Stage, lay_out, stage_at
from lbq.trainer import build_trainer, check_networks_build, evaluate_split, train_batches
from lbq.validate import ConfigError
from lbq.workdir import exclusive_workdir, inspect_workdir

__all__ = ["NonFiniteError", "RunResult", "train_and_evaluate"]

log = logging.getLogger("lbq")


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


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite (on_nonfinite='stop'), or a stage skipped
    more than half of its steps as non-finite (on_nonfinite='skip')."""


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
        meta = {
            "stage": stage.index,
            "stage_name": stage.name,
            "epoch": self.step / self.steps_per_epoch,
            "stage_results": self.stage_results,
            "skipped_steps": self.skipped,
        }
        self.checkpoints.save(self.state, meta)

    def log_stage_start(self, stage: Stage) -> None:
        if self.is_host0:
            log.info(
                "stage %d/%d '%s': %s, %d steps",
                stage.index + 1,
                len(self.stages),
                stage.name,
                report.network_bits(self.plan, stage),
                stage.num_steps,
            )

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
        try:
            self.count_skipped(stage)  # a no-op unless on_nonfinite='skip'
        finally:  # the interval that crosses the limit is still written
            if self.plan.on_nonfinite == "skip":
                values["skipped_steps"] = self.skipped.get(stage.name, 0)
            self.writer.write(self.step, "train", {**values, "stage_name": stage.name})
        self.progress.update(
            self.step, f"{stage.name} {report.progress_text(values)} {ips:.0f} img/s"
        )
        self.stop_if_nonfinite()

    def evaluate(self, stage: Stage, bits, stage_end: bool) -> None:
        """Evaluates the state on the eval split. When that fails (an unreadable eval image, a
        metrics write), the training since the last checkpoint is saved first and the error then
        raised: a rerun resumes at this step and evaluates again (`evaluate_unrecorded_stage`)
        instead of training the last steps again."""
        start = time.time()
        if self.is_host0:
            log.info("evaluating at step %d on %d images", self.step, self.trainer.info.num_eval)
        try:
            # eval.recalibrate_bn_batches: re-estimated BatchNorm statistics for this evaluation
            evaluated = self.trainer.evaluation_state(self.state, bits)
            self.final = evaluate_split(self.trainer, evaluated, bits)
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
        except Exception:
            self.save(stage)
            self.checkpoints.wait()
            if self.is_host0:
                log.warning("training up to step %d is saved; the evaluation failed", self.step)
            raise

    def evaluate_unrecorded_stage(self) -> None:
        """Evaluates the stage that ends at the resumed step when its result is not recorded
        (its evaluation failed after the checkpoint was saved)."""
        stage = next((s for s in self.stages if s.end_step == self.step), None)
        if stage is not None and stage.name not in {r["name"] for r in self.stage_results}:
            self.evaluate(stage, self.trainer.stage_bits(stage), stage_end=True)

    def run(self, stop_at_step: int | None) -> str:
        """Trains to the end of the last stage; returns 'completed' or 'preempted'."""
        plan, total = self.plan, self.stages[-1].end_step
        if self.watcher.should_stop(sync=True):
            return "preempted"  # a signal during start-up: nothing new to save
        self.evaluate_unrecorded_stage()
        eval_every = round(plan.eval_every_epochs * self.steps_per_epoch)
        batches = train_batches(self.trainer, self.step, plan.data_on_device)
        bits = self.trainer.stage_bits(stage_at(self.stages, self.step))
        if self.step < total and self.is_host0:
            log.info("compiling the train step (the first step waits for it)")
        while self.step < total:
            stage = stage_at(self.stages, self.step)
            if self.step == stage.start_step:
                self.state = self.trainer.start_stage(self.state, stage)
                bits = self.trainer.stage_bits(stage)
                self.log_stage_start(stage)
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


# XLA compilations by jitted function ('jit(train_step)'), counted from JAX's public monitoring
# events (each compilation reports one, persistent-cache hits included): the public way to see
# how often the train step compiled, where `jax.jit`'s `_cache_size` is private.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compilations: collections.Counter[str] = collections.Counter()


def _count_compilation(event: str, duration: float, **kwargs: Any) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        _compilations[kwargs.get("fun_name", "")] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


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
        compiled = f"jit({trainer.train_step.__name__})"  # as JAX names it in its events
        compilations_before = _compilations[compiled]
        check_networks_build(trainer)
        if jax.process_index() == 0:
            print(report.run_header(trainer, stages, workdir), flush=True)
        checkpoints, state, meta = resume_or_start(trainer, stages, decision)
        try:
            watcher.raise_if_requested("nothing was written")
        except Preempted:
            if checkpoints is not None:
                checkpoints.close()
            raise
        checkpoints = commit(decision, checkpoints, plan.checkpoint.keep)
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
        _compilations[compiled] - compilations_before,
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
      ConfigError, lbq.data.DataError: for bad configs or data (an empty eval split included),
        before anything is written or compiled. An eval image that cannot be decoded shows up
        only at an evaluation: its DataError is raised after the training so far is saved, and
        the rerun evaluates that step again without training it again.
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
