"""The workdir of a run: whether to resume, the recorded config, and preemption.

Reading the workdir (`inspect_workdir`) never changes it; `commit_workdir` deletes an
overwritten run and writes ``config.json`` only once everything that can fail before the first
step has passed, so a refused or failed start leaves the workdir as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lbq.validate import ConfigError

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
# What a run writes into its workdir; `overwrite` deletes these.
RUN_OUTPUTS = ("checkpoints", "checkpoints_unreadable", "metrics.jsonl", "tensorboard")


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


def _as_float(value: Any) -> Any:
    """Numbers compared by value: a stage's ``epochs=80`` is recorded as 80.0 since its field
    became a typed float, and a run recorded before that must still resume."""
    if isinstance(value, list):
        return [_as_float(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'field: old -> new' for each field that differs and matters for the computation."""
    a, b = _flatten(dict(old)), _flatten(dict(new))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if json.dumps(_as_float(va), default=str) != json.dumps(_as_float(vb), default=str):
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


@dataclasses.dataclass(frozen=True)
class WorkdirDecision:
    """What a run will do with its workdir.

    Attributes:
      workdir: the folder.
      record: the config to write as ``config.json``.
      differences: fields that differ from the recorded run (empty for a new run).
      overwrite: delete the recorded run's outputs first.
    """

    workdir: str
    record: Mapping[str, Any]
    differences: tuple[str, ...] = ()
    overwrite: bool = False


def inspect_workdir(
    workdir: str, record: Mapping[str, Any], on_config_change: str
) -> WorkdirDecision:
    """Compares the workdir's recorded config with this run's; changes nothing.

    Raises:
      ConfigError: when ``config.json`` is unreadable, or records another config and
        ``on_config_change`` is 'refuse'.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return WorkdirDecision(workdir, record)
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{path} is unreadable ({error}); delete it to resume the run in "
            f"{workdir} with the current config"
        ) from None
    diffs = tuple(config_differences(previous, record))
    if diffs and on_config_change == "refuse":
        raise ConfigError(
            f"workdir {workdir} holds a run with a different config ("
            + "; ".join(diffs)
            + "). Rerun with --config.on_config_change=continue to resume it with the new "
            "config, or =overwrite to start over."
        )
    return WorkdirDecision(workdir, record, diffs, bool(diffs) and on_config_change == "overwrite")


def clear_run_outputs(workdir: str) -> None:
    """Deletes a run's checkpoints, metrics and events (for `overwrite`)."""
    log.warning("overwriting the run in %s", workdir)
    for name in RUN_OUTPUTS:
        target = os.path.join(workdir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


def write_record(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes ``config.json`` (write and rename: a kill never leaves half a file)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


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
