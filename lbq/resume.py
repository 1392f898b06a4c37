"""Start-up: the state a run starts or resumes from (`resume_or_start`, which only reads), the
checks on a continued run's changed config, and the first writes to its workdir (`commit`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from lbq import report
from lbq.checkpoint import CheckpointMismatch, Checkpoints
from lbq.plan import RunPlan, parse_config
from lbq.stages import Stage, lay_out, stage_at
from lbq.trainer import Trainer
from lbq.validate import ConfigError
from lbq.workdir import WorkdirDecision, clear_run_outputs, write_record

__all__ = ["check_continuation", "commit", "rate_changes", "recorded_stages", "resume_or_start"]

log = logging.getLogger("lbq")

_ADVICE = "use on_config_change=overwrite to start over, or another --workdir"


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
    if step > total:
        raise ConfigError(
            f"the run in {workdir} has trained {step} steps, but the stages now end at step "
            f"{total} ({changes}); a continued run may extend its stages or add stages, not cut "
            f"what already ran: {_ADVICE}"
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
                f"run may extend its last finished stage or add stages: {_ADVICE}"
            )
        start = end


def recorded_stages(previous: Any, num_train: int) -> list[Stage] | None:
    """The stages of a recorded run's ``config.json`` (fields it predates take their defaults,
    lbq/configs/default.py), laid out over ``num_train`` train images; None when the record
    is not a config this version of lbq can read."""
    from lbq.configs import default

    config = default.get_config()
    try:
        config.update(previous)
        plan = parse_config(config)
        return lay_out(plan.stages, plan.steps_per_epoch(num_train))
    except Exception:  # noqa: BLE001 - an unreadable old record only loses the comparison
        return None


def rate_changes(old: Sequence[Stage], new: Sequence[Stage], step: int) -> list[str]:
    """The learning rates that a changed config moves at the resumed ``step``.

    A rate is compared with the one the recorded config gives the same stage at that step, or,
    for a stage lengthened past its recorded end, the rate it ended at (a finished 10-step
    stage lengthened to 20 resumes in the middle of its new schedule). A stage that the
    recorded run did not have starts its own schedule and is not compared.

    Returns:
      One 'stage 'NAME' at step S: NETWORK 0.001 -> 0.01' entry per network whose rate moves.
    """
    if step <= 0 or step >= new[-1].end_step:
        return []
    now = stage_at(new, step)
    before = next((s for s in old if s.index == now.index and s.name == now.name), None)
    if before is None or step < before.start_step:
        return []
    old_step = min(step, before.end_step - 1)
    changes = []
    for network in sorted(now.lr.keys() & before.lr.keys()):
        was = before.learning_rate(old_step, network)
        is_ = now.learning_rate(step, network)
        if not math.isclose(was, is_, rel_tol=1e-6, abs_tol=0.0):
            changes.append(f"stage '{now.name}' at step {step}: {network} {was:.6g} -> {is_:.6g}")
    return changes


def _with_new_optimizer(trainer: Trainer, fresh, saved: dict, stage: Stage):
    """``fresh`` with a checkpoint's step, parameters and BatchNorm statistics, and the
    optimizer state that ``stage`` starts with. The learned ranges are the checkpoint's: the
    train loop calibrates at a stage's first step, never inside a stage."""
    fields = ("params", "batch_stats", "step", "first_nonfinite")
    restored = jax.tree.map(  # the saved host values with the dtypes and shardings of ``fresh``
        lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
        {"first_nonfinite": -1} | {k: saved[k] for k in fields if k in saved},
        {k: getattr(fresh, k) for k in fields},
    )
    return trainer.fresh_optimizer_state(fresh.replace(**restored), stage)


def _warn_rate_changes(trainer: Trainer, stages: Sequence[Stage], step: int, decision) -> None:
    """Warns, naming the rates before and after, when a continued run's changed config moves
    a learning rate at the resumed step."""
    if not decision.differences or decision.previous is None:
        return
    old = recorded_stages(decision.previous, trainer.info.num_train)
    if old is None:
        log.warning(
            "could not read the recorded config of %s to compare its learning-rate schedule "
            "with the changed one; check the rate in metrics.jsonl",
            decision.workdir,
        )
        return
    for change in rate_changes(old, stages, step):
        log.warning(
            "the changed config moves the learning rate at the resumed step: %s (the schedule "
            "is laid over the stage's new length and settings)",
            change,
        )


def resume_or_start(
    trainer: Trainer, stages: Sequence[Stage], decision: WorkdirDecision
) -> tuple[Checkpoints | None, Any, dict[str, Any]]:
    """(checkpoints, state, meta): the workdir's newest checkpoint, or a fresh state with the
    configured start weights (meta {}). Reads only: the checkpoints are opened without
    creating their folder and what they found to set aside stays until `commit`.

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
            changes = "; ".join(decision.differences)
            raise ConfigError(
                f"{error}; the config changes ({changes}) cannot continue it: {_ADVICE}"
                if changes
                else f"{error}; was it written by another version of lbq? Use another --workdir"
            ) from None
        if restored is None:
            return checkpoints, trainer.load_start_weights(state), {}
        check_continuation(plan, stages, restored.step, restored.meta, decision)
        _warn_rate_changes(trainer, stages, restored.step, decision)
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


def commit(decision: WorkdirDecision, checkpoints: Checkpoints | None, keep: int) -> Checkpoints:
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
        multihost_utils.sync_global_devices("lbq_commit")
    return Checkpoints(decision.workdir, keep)
