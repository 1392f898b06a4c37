"""Orbax checkpoints in the workdir: periodic saves, keep-last-N, and safe resume.

A checkpoint holds the whole `TrainState` (parameters, BatchNorm statistics, optimizer state
with the stochastic-precision keys, step) and a small JSON record (stage, epoch). The data
position is a function of the step, so it needs no extra state. When the latest checkpoint
cannot be read, the previous good one is used, with a warning; a workdir that holds
checkpoints is never silently restarted from scratch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("lbq")


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored."""


def _manager(directory: str, keep: int = 0) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
    """The checkpoints of one run, in ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = _manager(self.directory, keep)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` at its step (asynchronously; `wait` makes it durable)."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint into the structure of ``abstract_state``.

        Returns:
          (state, meta), or None when the run has no checkpoint yet.

        Raises:
          CheckpointError: when checkpoints exist but none can be read.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as error:  # noqa: BLE001 - any failure means "unreadable"
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                log.warning("checkpoint at step %d in %s is unreadable (%s); trying an older one",
                            step, self.directory, reason)
                failures.append(f"step {step}: {reason}")
                continue
            if failures:
                log.warning("resuming from step %d, the newest readable checkpoint", step)
            return restored.state, dict(restored.meta)
        if failures or _has_partial_checkpoints(self.directory):
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} ({'; '.join(failures) or 'only partial saves'}). "
                "Refusing to start from scratch over an existing run: move the workdir away or "
                "set on_config_change='overwrite'."
            )
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _has_partial_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        name[0].isdigit() or "tmp" in name for name in os.listdir(directory)
    )


def load_variables(path: str) -> dict[str, Any]:
    """Loads {network: {'params', 'batch_stats'}} from a run's workdir or checkpoint folder.

    Used by ``init_from`` and ``distill.teacher_init``. ``path`` may be a workdir, its
    ``checkpoints`` folder or one step's folder.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    step_dir = os.path.basename(path)
    if step_dir.isdigit() and os.path.isdir(os.path.join(path, "state")):
        directory, steps = os.path.dirname(path), [int(step_dir)]
    else:
        directory = path
        if not os.path.isdir(directory):
            raise CheckpointError(f"init checkpoint {path} does not exist")
        steps = sorted(_manager(directory).all_steps(), reverse=True)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    manager = _manager(directory)
    restored = manager.restore(steps[0], args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored.state
    return {
        name: {"params": state["params"][name], "batch_stats": state["batch_stats"].get(name, {})}
        for name in state["params"]
    }
