"""Orbax checkpoints in the workdir: periodic saves, keep-last-N, and safe resume.

A checkpoint holds the whole `TrainState` (parameters, BatchNorm statistics, optimizer state
with the stochastic-precision keys, step) and a small JSON record (stage, epoch, and a CRC-32 of
every array). The data position is a function of the step, so it needs no extra state.

Resuming picks the newest checkpoint that restores *and* matches its checksums. Orbax raises
when an array file is truncated or missing, but a file whose bytes were damaged in place can
restore without any error (seen with orbax-checkpoint 0.12.8 and its zstd-compressed OCDBT
files), hence the checksums. A damaged checkpoint is reported with a warning naming its step,
moved to ``WORKDIR/checkpoints_unreadable`` (so that later saves of that step are not skipped)
and the previous one is used. A save that was interrupted leaves an
``<step>.orbax-checkpoint-tmp*`` folder, which is reported the same way and removed. A workdir
that holds checkpoints is never silently restarted from scratch: when none of them can be read,
`CheckpointError` is raised.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("lbq")

UNREADABLE_DIR = "checkpoints_unreadable"  # next to WORKDIR/checkpoints
_PARTIAL = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_CHECKSUMS = "checksums"


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored."""


def _manager(directory: str, keep: int = 0, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=create)
    # Naming the handlers lets the manager read a checkpoint's metadata before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


# ----------------------------------------------------------------------------- checksums


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _host_arrays(tree: Any) -> dict[str, np.ndarray]:
    """{dotted path: host copy} of every array leaf, fetched in one transfer.

    Paths use the field, key and index names only, so a TrainState and the nested dicts that
    Orbax restores without a target give the same paths. Arrays sharded over several hosts
    (none today: the state is replicated) are left out; Orbax checks their shards itself.
    """
    paths, arrays = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            if not leaf.is_fully_addressable:
                if not leaf.is_fully_replicated:
                    continue
                leaf = leaf.addressable_data(0)
        paths.append(".".join(_key_name(entry) for entry in path))
        arrays.append(leaf)
    return dict(zip(paths, (np.asarray(a) for a in jax.device_get(arrays)), strict=True))


def checksums(tree: Any) -> dict[str, str]:
    """CRC-32 of the bytes of every array of ``tree``, by dotted path."""
    return {
        path: f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"
        for path, array in _host_arrays(tree).items()
    }


def _verify(tree: Any, expected: dict[str, str] | None) -> None:
    """Raises ValueError naming the first array whose checksum differs from ``expected``."""
    if not expected:  # written before checksums existed
        return
    for path, value in checksums(tree).items():
        if path in expected and expected[path] != value:
            raise ValueError(f"{path} does not match the checksum written when it was saved")


def _reason(error: BaseException) -> str:
    """The most specific line of an error chain (TensorStore's own message is the deepest)."""
    deepest = error
    while deepest.__cause__ is not None or deepest.__context__ is not None:
        deepest = deepest.__cause__ or deepest.__context__
    for candidate in (deepest, error):
        text = str(candidate).strip()
        if text:
            line = text.splitlines()[0].split(" See full TensorStore details")[0]
            line = line.split(" [tensorstore_spec=")[0]
            return f"{type(candidate).__name__}: {line[:300]}"
    return type(error).__name__


# ----------------------------------------------------------------------------- restore


def _is_abandoned_read_report(unraisable: Any) -> bool:
    """A report left by a read that a failed Orbax restore abandoned."""
    code = getattr(unraisable.object, "cr_code", None)
    if "orbax" in getattr(code, "co_filename", ""):
        return True  # the abandoned read itself, collected unfinished
    # A read still in flight that finishes later and reports to the restore's closed loop.
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _drop_abandoned_read_reports() -> None:
    """Installs, once per process, an unraisable hook that drops only those reports.

    It stays installed: reads in flight can finish, and report, long after the restore that
    abandoned them returned. Every other report still reaches the hook that was there before.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read_report(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[list[int]]:
    """Silences the leftovers of a restore that failed part way.

    Orbax abandons the other array reads of a failed restore; Python reports each one
    ("Exception ignored in <coroutine ...>", "Event loop is closed", asyncio's "exception was
    never retrieved"): thousands of lines that would bury the one warning that matters. Append
    to the yielded list when a restore failed: the abandoned reads are then collected before
    leaving, while asyncio's log is off.
    """
    _drop_abandoned_read_reports()
    asyncio_log = logging.getLogger("asyncio")
    was_disabled = asyncio_log.disabled
    asyncio_log.disabled = True
    failed: list[int] = []
    try:
        yield failed
    finally:
        if failed:
            gc.collect()  # collect the abandoned reads now, while asyncio's log is off
        asyncio_log.disabled = was_disabled


def _abstract_from_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
    """The saved tree as nested dicts of arrays replicated over this process's devices.

    Restoring with the shardings recorded at save time fails when the device count changed
    (a teacher trained on 8 GPUs, loaded on 1), so they are replaced.
    """
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise ValueError("its state has no metadata")
    replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("devices",)), P())
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
        getattr(metadata, "tree", metadata),
    )


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any | None
) -> tuple[Any, dict[str, Any]]:
    """Restores and verifies one step; raises whatever Orbax raises, or ValueError.

    With ``abstract_state`` None the checkpoint's own structure is used (nested dicts) and
    only the parameters and BatchNorm statistics are verified.
    """
    subset = abstract_state is None
    if subset:
        abstract_state = _abstract_from_metadata(manager, step)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    meta = dict(restored.meta)
    expected = meta.pop(_CHECKSUMS, None)
    state = restored.state
    if subset:  # verify what `load_variables` returns
        state = {k: state[k] for k in ("params", "batch_stats") if k in state}
        expected = {
            k: v for k, v in (expected or {}).items() if k.startswith(("params.", "batch_stats."))
        }
    _verify(state, expected)
    stored_step = meta.get("step")
    if stored_step is not None and int(stored_step) != step:
        raise ValueError(f"its record says step {stored_step}")
    return restored.state, meta


def _restore_newest(
    manager: ocp.CheckpointManager, directory: str, steps: list[int], abstract_state: Any | None
) -> tuple[int, Any, dict[str, Any], list[tuple[int, str]]]:
    """Tries ``steps`` newest first; returns (step, state, meta, failures) or raises.

    Raises:
      CheckpointError: when none of ``steps`` can be read (failures named in the message).
    """
    failures: list[tuple[int, str]] = []
    with _quiet_failed_reads() as failed:
        for step in sorted(steps, reverse=True):
            try:
                state, meta = _restore_step(manager, step, abstract_state)
            except Exception as error:  # noqa: BLE001 - any failure means "unreadable"
                reason = _reason(error)
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s); trying an older one",
                    step,
                    directory,
                    reason,
                )
                failures.append((step, reason))
                failed.append(step)
                continue
            return step, state, meta, failures
    raise CheckpointError(
        f"no readable checkpoint in {directory} ("
        + "; ".join(f"step {s}: {r}" for s, r in failures)
        + ")"
    )


def partial_saves(directory: str) -> dict[int, str]:
    """{step: folder name} of saves that were interrupted before Orbax committed them."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in sorted(os.listdir(directory)):
        match = _PARTIAL.match(name)
        if match:
            found[int(match.group(1))] = name
    return found


class Checkpoints:
    """The checkpoints of one run, in ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str, keep: int):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.manager = _manager(self.directory, keep)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` at its step (asynchronously; `wait` makes it durable).

        A step that is already saved is left as it is.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        meta = {**meta, "step": step, _CHECKSUMS: checksums(state)}
        # force: the trainer decides when to save; Orbax's own policy would silently skip a
        # step at or below its newest one, or while an earlier save is still being written.
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest readable checkpoint into the structure of ``abstract_state``.

        Unreadable newer checkpoints are reported with a warning and moved to
        ``WORKDIR/checkpoints_unreadable``; interrupted saves are reported and removed.

        Returns:
          (state, meta), or None when the run has no checkpoint at all.

        Raises:
          CheckpointError: when checkpoints exist but none can be read.
        """
        steps = self.steps()
        partial = partial_saves(self.directory)
        newest = steps[-1] if steps else -1
        for step, name in partial.items():
            if step > newest:
                log.warning(
                    "checkpoint at step %d in %s was only partly written (%s: the save "
                    "was interrupted); ignoring it",
                    step,
                    self.directory,
                    name,
                )
        if not steps:
            if partial:
                raise CheckpointError(
                    f"no readable checkpoint in {self.directory}: only interrupted saves "
                    f"({', '.join(partial.values())}). Refusing to start from scratch over an "
                    f"existing run; to start over, delete {self.directory}."
                )
            return None
        try:
            step, state, meta, failures = _restore_newest(
                self.manager, self.directory, steps, abstract_state
            )
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}. Refusing to start from scratch over an existing run; to start over, "
                f"delete {self.directory}."
            ) from None
        if failures or partial:
            log.warning(
                "resuming from step %d, the newest readable checkpoint in %s", step, self.directory
            )
            self._set_aside([s for s, _ in failures], list(partial.values()))
        return state, meta

    def _set_aside(self, unreadable: list[int], partial: list[str]) -> None:
        """Moves unreadable steps out of Orbax's folder and removes interrupted saves.

        Orbax would otherwise skip saving those steps again (it never saves at or below its
        newest step) and a later resume would meet the damaged files again.
        """
        if jax.process_index() == 0:
            target_root = os.path.join(self.workdir, UNREADABLE_DIR)
            for step in unreadable:
                os.makedirs(target_root, exist_ok=True)
                target = os.path.join(target_root, str(step))
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(target_root, f"{step}.{suffix}")
                    suffix += 1
                shutil.move(os.path.join(self.directory, str(step)), target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
            for name in partial:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lbq_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_variables(path: str) -> dict[str, Any]:
    """Loads {network: {'params', 'batch_stats'}} from a run's workdir or checkpoint folder.

    Used by ``init_from`` and ``distill.teacher_init``. ``path`` may be a workdir, its
    ``checkpoints`` folder or one step's folder. From a workdir the newest readable checkpoint
    is used (with a warning for any newer unreadable one); a step's folder must be readable.

    Raises:
      CheckpointError: when there is no checkpoint or none can be read.
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
            raise CheckpointError(f"checkpoint folder {path} does not exist")
        steps = list(_manager(directory, create=False).all_steps())
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}")
    manager = _manager(directory, create=False)
    try:
        _, state, _, _ = _restore_newest(manager, directory, steps, None)
    finally:
        manager.close()
    return {
        name: {"params": state["params"][name], "batch_stats": state["batch_stats"].get(name, {})}
        for name in state["params"]
    }
