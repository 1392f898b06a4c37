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

from lbq import data as lbq_data
from lbq import metrics as lbq_metrics
from lbq import report
from lbq.build import Trainer, build_trainer
from lbq.checkpoint import Checkpoints
from lbq.mesh import maybe_initialize_distributed
from lbq.plan import RunPlan, parse_config, shadowed_overrides
from lbq.stages import Stage, lay_out, stage_at
from lbq.validate import ConfigError, check_type
from lbq.workdir import (
    PREEMPTED_EXIT_CODE,
    PreemptionWatcher,
    WorkdirDecision,
    clear_run_outputs,
    inspect_workdir,
    write_record,
)

__all__ = ["PREEMPTED_EXIT_CODE", "NonFiniteError", "RunResult", "train_and_evaluate"]

log = logging.getLogger("lbq")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


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
    """

    status: str
    step: int
    stages: list[dict[str, Any]]
    final: dict[str, dict[str, float]]
    images_per_second: float
    train_step_compilations: int = 0


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

    def __init__(self, trainer, stages, workdir, state, stage_results, checkpoints):
        self.trainer, self.plan, self.stages = trainer, trainer.plan, stages
        self.state, self.step = state, int(jax.device_get(state.step))
        self.stage_results = stage_results
        self.checkpoints = checkpoints
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
        }

    def stop_if_nonfinite(self) -> None:
        """Raises NonFiniteError once a step was not finite (on_nonfinite='stop')."""
        first_bad = int(jax.device_get(self.state.first_nonfinite))
        if first_bad < 0 or self.plan.on_nonfinite != "stop":
            return
        self.checkpoints.wait()
        good = self.checkpoints.steps()
        # first_nonfinite counts the steps done before the bad one; metrics.jsonl and the
        # checkpoints number a step by the count after it.
        raise NonFiniteError(
            f"non-finite loss or gradient at step {first_bad + 1}; the last good checkpoint is "
            + (f"step {good[-1]} in {self.checkpoints.directory}" if good else "none")
            + " (set on_nonfinite='skip' to skip such steps instead)"
        )

    def save(self, stage: Stage) -> None:
        self.stop_if_nonfinite()  # never checkpoint a state that froze at a non-finite step
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
        self.writer.write(self.step, "train", {**values, "stage_name": stage.name})
        self.progress.update(
            self.step, f"{stage.name} {report.progress_text(values)} {ips:.0f} img/s"
        )
        self.stop_if_nonfinite()

    def evaluate(self, stage: Stage, bits, stage_end: bool) -> None:
        start = time.time()
        if self.is_host0:
            log.info("evaluating at step %d on %d images", self.step, self.trainer.info.num_eval)
        self.final = evaluate(self.trainer, self.state, bits)
        self.eval_seconds += time.time() - start
        if self.is_host0:
            log.info("eval at step %d: %s", self.step, report.eval_text(self.final))
        self.writer.write(
            self.step,
            "eval",
            {f"{n}/{k}": v for n, m in self.final.items() for k, v in m.items()}
            | {"stage_name": stage.name},
        )
        if stage_end:  # a stage extended after it had ended is listed once
            self.stage_results = [r for r in self.stage_results if r["name"] != stage.name]
            self.stage_results.append(report.stage_result(self.plan, stage, self.final))

    def run(self, stop_at_step: int | None) -> str:
        """Trains to the end of the last stage; returns 'completed' or 'preempted'."""
        plan, total = self.plan, self.stages[-1].end_step
        eval_every = round(plan.eval_every_epochs * self.steps_per_epoch)
        batches = train_batches(self.trainer, self.step, plan.data_on_device)
        with PreemptionWatcher() as watcher:
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
                self.step += 1
                self.interval_steps += 1
                stage_end = self.step == stage.end_step
                log_now = self.step % plan.log_every_steps == 0 or stage_end
                if log_now:
                    self.log_interval(stage)
                if (eval_every and self.step % eval_every == 0) or stage_end:
                    self.evaluate(stage, bits, stage_end)
                if stage_end or self.step % plan.checkpoint.every_steps == 0:
                    self.save(stage)
                stop_now = watcher.should_stop(sync=log_now) or self.step == stop_at_step
                if stop_now and self.step < total:
                    self.save(stage)
                    return "preempted"
        return "completed"

    def close(self) -> None:
        self.progress.close()
        self.checkpoints.close()
        self.writer.close()


def _restore(trainer: Trainer, decision: WorkdirDecision, keep: int):
    """(checkpoints, state, stage results): the workdir's newest checkpoint, or a fresh state
    with the configured start weights. Writes nothing for a new run."""
    state = trainer.init_state()
    checkpoints = None if decision.overwrite else Checkpoints(decision.workdir, keep)
    restored = None
    if checkpoints is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        restored = checkpoints.restore_latest(abstract)
    if restored is None:
        return checkpoints, trainer.load_start_weights(state), []
    state, meta = restored
    if trainer.plan.on_nonfinite == "stop":  # steps skipped earlier under 'skip' are history
        state = state.replace(first_nonfinite=jax.device_put(jnp.int32(-1), trainer.replicated))
    log.info("resumed from step %d (stage %s)", int(state.step), meta.get("stage_name"))
    return checkpoints, state, list(meta.get("stage_results", []))


def _commit(decision: WorkdirDecision, checkpoints, keep: int) -> Checkpoints:
    """Writes to the workdir, now that everything that can fail before training has passed."""
    if jax.process_index() == 0:
        if decision.overwrite:
            clear_run_outputs(decision.workdir)
        write_record(decision.workdir, decision.record)
    return checkpoints or Checkpoints(decision.workdir, keep)


def train_plan(plan: RunPlan, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains and evaluates ``plan``, resuming from ``workdir`` (see `train_and_evaluate`)."""
    info = lbq_data.get_info(plan.data)
    try:
        stages = lay_out(plan.stages, plan.steps_per_epoch(info.num_train))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    decision = inspect_workdir(workdir, plan.record, plan.on_config_change)
    trainer = build_trainer(plan, info)
    if jax.process_index() == 0:
        print(report.run_header(trainer, stages, workdir), flush=True)
    checkpoints, state, stage_results = _restore(trainer, decision, plan.checkpoint.keep)
    checkpoints = _commit(decision, checkpoints, plan.checkpoint.keep)
    loop = _Loop(trainer, stages, workdir, state, stage_results, checkpoints)
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
    )
    if jax.process_index() == 0:
        print(report.format_summary(result, workdir), flush=True)
    return result


def train_and_evaluate(
    config, workdir: str, *, stop_at_step: int | None = None, overridden: Sequence[str] = ()
) -> RunResult:
    """Trains and evaluates the run that ``config`` describes, resuming from ``workdir``.

    Args:
      config: an ml_collections ConfigDict (see lbq/configs/default.py).
      workdir: checkpoints, metrics.jsonl, TensorBoard events and config.json go here.
      stop_at_step: stop as a preemption would once this global step is done (checkpoint
        saved, status 'preempted'): a deterministic stand-in for SIGTERM, for tests and for
        splitting a run over several jobs.
      overridden: the fields set on the command line (``quant.w_bits``, ...); one that every
        stage hides with its own value is refused rather than silently ignored.

    Returns:
      A `RunResult`.

    Raises:
      ConfigError, lbq.data.DataError: for bad configs or data, before anything is written or
        compiled.
      NonFiniteError: when the loss or a gradient stops being finite (on_nonfinite='stop').
      CheckpointError: when the workdir's checkpoints exist but none can be read.
    """
    maybe_initialize_distributed(check_type(config, "distributed", "bool"))
    plan = parse_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    shadowed = shadowed_overrides(plan, list(overridden))
    if shadowed:
        raise ConfigError(shadowed[0])
    return train_plan(plan, workdir, stop_at_step=stop_at_step)
