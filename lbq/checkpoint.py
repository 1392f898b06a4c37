"""Orbax checkpoints in the workdir: periodic saves, keep-last-N, and safe resume.

A checkpoint holds the whole `TrainState` and a small JSON record (stage, epoch, and a CRC-32 of
every array: orbax-checkpoint 0.12.8 restores its zstd-compressed OCDBT files damaged in place
without an error). Damaged checkpoints, interrupted saves, another structure
(`CheckpointMismatch`), none readable (`CheckpointError`) and a failed save
(`CheckpointWriteError`): docs/reliability.md ("Checkpoints", "A save that fails", "Changing
the config of a run").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("lbq")

UNREADABLE_DIR = "checkpoints_unreadable"  # next to WORKDIR/checkpoints
_PARTIAL = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
_CHECKSUMS = "checksums"
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__))
# How long a reader keeps retrying when a running trainer's retention deletes the checkpoints it
# reads (`load_saved_variables`).
READ_RETRY_SECONDS = 120.0


class CheckpointError(RuntimeError):
    """No checkpoint of a run could be restored, or one could not be written."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, read-only or immutable folder, a path too long, ...)."""

    def __init__(self, step: int, reason: str, directory: str):
        super().__init__(
            f"could not write the checkpoint at step {step}: {reason}; the checkpoints saved "
            f"before it are intact in {directory}"
        )


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint holds another structure than the run restoring it.

    Attributes:
      step: the checkpoint's step.
      part: 'weights' (parameters or BatchNorm statistics: another model) or 'optimizer'.
      where: the first differing array, with both shapes.
    """

    def __init__(self, step: int, part: str, where: str, directory: str):
        what = "another model" if part == "weights" else "another optimizer state"
        super().__init__(
            f"the checkpoint at step {step} in {directory} holds {what} than this run "
            f"builds ({where})"
        )
        self.step, self.part, self.where = step, part, where


def _manager(directory: str, keep: int = 0, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None,
        create=create,
        # Created in the background, a step folder that cannot be created (an immutable or
        # read-only folder) leaves Orbax threads waiting for a signal that never comes, which
        # holds the process at exit for Orbax's timeout (300 s seen with orbax-checkpoint
        # 0.12.8). Created by `save` itself, the failure is raised there at once.
        async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False),
    )
    # Not Orbax's `cleanup_tmp_directories`: it deletes every unfinished save whenever a
    # manager is created, and lbq creates managers to read a live run (evaluate, export,
    # lbq.deploy) while its trainer saves. The run that holds the workdir lock reports each
    # interrupted save by its step and removes it (`Checkpoints.set_aside`).
    # Naming the handlers lets the manager read a checkpoint's metadata before restoring it.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


# ----------------------------------------------------------------------------- checksums


def _leaves(tree: Any) -> dict[str, Any]:
    """{dotted path: leaf}. Paths use the field, key and index names only, so a TrainState and
    the nested dicts that Orbax restores without a target give the same paths."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def checksums(tree: Any) -> dict[str, str]:
    """CRC-32 of the bytes of every array of ``tree``, by dotted path (`_leaves`).

    The arrays are fetched to the host in one transfer. Arrays sharded over several hosts (none
    today: the state is replicated) are left out; Orbax checks their shards itself.
    """
    arrays = {}
    for path, leaf in _leaves(tree).items():
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                continue
            leaf = leaf.addressable_data(0)
        arrays[path] = leaf
    host = jax.device_get(list(arrays.values()))
    return {
        path: f"{zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8)):08x}"
        for path, array in zip(arrays, host, strict=True)
    }


def _reason(error: BaseException, os_words: bool = False) -> str:
    """The cause of ``error`` in one line: the first line of the deepest error of its chain
    (TensorStore's own message), or with ``os_words`` the OS's words where there are some.

    Python's own I/O raises OSError; TensorStore reports an OS error inside a long message that
    starts with the file's path (``... Failed to write ... [os_error_code='28']``).
    """
    chain = [error]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if os_words:
        codes = [e.errno for e in chain if isinstance(e, OSError) and e.errno]
        codes += [int(m.group(1)) for e in chain if (m := _OS_ERROR_CODE.search(str(e)))]
        if codes:
            return f"{os.strerror(codes[0])} ({errno.errorcode.get(codes[0], codes[0])})"
    for candidate in (chain[-1], error):
        text = str(candidate).strip()
        if text:
            line = text.splitlines()[0].split(" See full TensorStore details")[0]
            line = line.split(" [tensorstore_spec=")[0]
            return f"{type(candidate).__name__}: {line[:300]}"
    return type(error).__name__


# ----------------------------------------------------------------------------- Orbax's reports


def _not_an_orbax_failure(record: logging.LogRecord) -> bool:
    """A logging filter: False for Orbax's own error reports, and for exceptions raised inside
    Orbax that asyncio reports as never retrieved."""
    if record.levelno < logging.ERROR:
        return True
    error = record.exc_info[1] if record.exc_info else None
    files = [record.pathname or ""] + [
        frame.f_code.co_filename
        for frame, _ in traceback.walk_tb(getattr(error, "__traceback__", None))
    ]
    return not any(name.startswith(_ORBAX_DIR) for name in files)


def _quiet_orbax() -> None:
    """Keeps off the console, once per process, Orbax's reports of failures that lbq reports
    itself in one line. A save failing on a full disk logs each failed write with its traceback
    (about 350 lines, orbax-checkpoint 0.12.8) and asyncio adds "exception was never retrieved":
    a filter on those two loggers drops them. A failed restore abandons its other reads, which
    Python reports as unraisable ("Exception ignored in <coroutine ...>", "Event loop is
    closed"), thousands of lines, even long after the restore: a hook that stays drops them.
    """
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _not_an_orbax_failure not in logger.filters:
            logger.addFilter(_not_an_orbax_failure)
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        error = unraisable.exc_value
        if not (
            "orbax" in getattr(code, "co_filename", "")
            or (isinstance(error, RuntimeError) and "Event loop is closed" in str(error))
        ):
            previous(unraisable)

    hook.drops_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


# ----------------------------------------------------------------------------- restore


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    """The metadata of ``step``'s saved state, as nested dicts; raises ValueError when it has
    none (a lost _METADATA file)."""
    metadata = manager.item_metadata(step)["state"]
    if metadata is None:
        raise ValueError("its state has no metadata")
    return metadata.tree


def _structure_mismatch(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[str, str] | None:
    """How a checkpoint's saved structure differs from ``abstract_state``'s.

    Returns:
      ('weights' or 'optimizer', the first differing array and both shapes), or None when the
      structures agree or the checkpoint's metadata cannot be read (then it is damaged).
    """

    def shapes(tree: Any) -> dict[str, tuple[int, ...]]:  # of arrays, structs or metadata
        return {path: tuple(getattr(leaf, "shape", ())) for path, leaf in _leaves(tree).items()}

    try:
        saved = shapes(_saved_tree(manager, step))
    except Exception:  # noqa: BLE001 - unreadable or lost metadata: damaged, not another model
        return None
    ours = shapes(abstract_state)
    differing = sorted(
        (p for p in set(saved) | set(ours) if saved.get(p) != ours.get(p)),
        key=lambda p: (not p.startswith("params."), p),  # a parameter names a model best
    )
    if not saved or not differing:  # no saved arrays: damaged metadata
        return None
    weights = [p for p in differing if not p.startswith("opt_state.")]
    path = (weights or differing)[0]
    where = (
        f"{path}: {saved.get(path, 'absent')} in the checkpoint, "
        f"{ours.get(path, 'absent')} in this run"
    )
    return ("weights" if weights else "optimizer", where)


def _restore_step(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any | None
) -> tuple[Any, dict[str, Any]]:
    """Restores and verifies one step; raises whatever Orbax raises, or ValueError.

    With ``abstract_state`` None the checkpoint's own structure is used (nested dicts of arrays
    replicated over this process's devices: the shardings recorded at save time fail when the
    device count changed, a teacher trained on 8 GPUs loaded on 1) and only the parameters and
    BatchNorm statistics are verified.
    """
    subset = abstract_state is None
    if subset:
        replicated = NamedSharding(jax.make_mesh((jax.device_count(),), ("devices",)), P())
        abstract_state = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
            _saved_tree(manager, step),
        )
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
    if expected:  # None: written before checksums existed
        for path, value in checksums(state).items():
            if path in expected and expected[path] != value:
                raise ValueError(f"{path} does not match the checksum written when it was saved")
    stored_step = meta.get("step")
    if stored_step is not None and int(stored_step) != step:
        raise ValueError(f"its record says step {stored_step}")
    return restored.state, meta


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back.

    Attributes:
      step: its step.
      state: in the structure of the abstract state asked for; when ``optimizer_restored`` is
        False, the checkpoint's own nested dicts, of which 'params', 'batch_stats', 'step' and
        'first_nonfinite' fit the run (the parameters and statistics are verified).
      meta: its record (stage, epoch, stage results, ...) without the checksums.
      optimizer_restored: False when only the optimizer state did not fit and was left out.
      failures: (step, reason) of each newer checkpoint that could not be read.
    """

    step: int
    state: Any
    meta: dict[str, Any]
    optimizer_restored: bool = True
    failures: tuple[tuple[int, str], ...] = ()


class _StepDeleted(Exception):
    """A checkpoint's folder disappeared while it was read (not damage)."""


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-links ``src`` as ``dst``, or copies it where links cannot be made (another
    filesystem)."""
    try:
        os.link(src, dst)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _reader(directory: str, step: int, snapshot: bool) -> Iterator[ocp.CheckpointManager]:
    """A manager of ``directory``; with ``snapshot``, of a hard-linked copy of ``step``'s files,
    which a trainer deleting the step (its retention) cannot take away during the read.

    Raises:
      _StepDeleted: when the step disappears before its copy is complete.
    """
    with contextlib.ExitStack() as stack:
        if snapshot:
            source = os.path.join(directory, str(step))
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="lbq-read-"))
            try:
                target = os.path.join(directory, str(step))
                shutil.copytree(source, target, copy_function=_link_or_copy)
            except OSError:  # shutil.Error too; a file deleted meanwhile, or the copy failed
                if not _vanished(source):
                    raise
            if not os.path.isdir(source):  # deleted during the copy: it may be incomplete
                raise _StepDeleted(step)
        manager = _manager(directory, create=False)
        stack.callback(manager.close)
        yield manager


def _vanished(path: str) -> bool:
    """Whether ``path`` is gone within 2 s: a retention that deletes a step removes its files
    first and its folder last, while a damaged step stays."""
    deadline = time.monotonic() + 2.0
    while os.path.isdir(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _restore_newest(
    directory: str,
    steps: list[int],
    abstract_state: Any | None = None,
    allow_new_optimizer: bool = False,
    *,
    manager: ocp.CheckpointManager | None = None,
    snapshot: bool = False,
) -> Restored:
    """Tries ``steps`` newest first with ``manager``, or else with a `_reader` per step, as a
    reader of a run that may be training: a step whose folder is gone after its read failed
    (the trainer's retention) raises `_StepDeleted` instead of counting as unreadable. Another
    structure than ``abstract_state``'s is not damage (`_restore_fitting`).

    Raises:
      CheckpointMismatch: when the newest readable checkpoint holds another structure.
      CheckpointError: when none of ``steps`` can be read (failures named in the message).
    """
    failures: list[tuple[int, str]] = []
    restored = None
    _quiet_orbax()
    asyncio_log = logging.getLogger("asyncio")
    was_disabled, asyncio_log.disabled = asyncio_log.disabled, True
    try:
        for step in sorted(steps, reverse=True):
            opened = (
                contextlib.nullcontext(manager)
                if manager is not None
                else _reader(directory, step, snapshot)
            )
            with opened as reader:
                try:
                    state, meta, whole = _restore_fitting(
                        reader, directory, step, abstract_state, allow_new_optimizer
                    )
                    restored = Restored(step, state, meta, whole, tuple(failures))
                    return restored
                except CheckpointMismatch:
                    raise
                except Exception as error:  # noqa: BLE001 - damaged, or deleted while read
                    if manager is None and _vanished(os.path.join(directory, str(step))):
                        raise _StepDeleted(step) from None
                    failures.append((step, _reason(error)))
                    log.warning(
                        "checkpoint at step %d in %s is unreadable (%s); trying an older one",
                        step,
                        directory,
                        failures[-1][1],
                    )
    finally:
        if restored is None or failures or not restored.optimizer_restored:  # a restore failed
            gc.collect()  # collect its abandoned reads now, while asyncio's log is off
        asyncio_log.disabled = was_disabled
    raise CheckpointError(
        f"no readable checkpoint in {directory} ("
        + "; ".join(f"step {s}: {r}" for s, r in failures)
        + ")"
    )


def _restore_fitting(
    manager: ocp.CheckpointManager,
    directory: str,
    step: int,
    abstract_state: Any | None,
    allow_new_optimizer: bool,
) -> tuple[Any, dict[str, Any], bool]:
    """(state, meta, whether the optimizer state was restored) of one step of
    `_restore_newest`. A step whose saved structure differs from ``abstract_state``'s raises
    `CheckpointMismatch`, or with only the optimizer state differing and
    ``allow_new_optimizer``, is restored without it; other failures are `_restore_step`'s."""
    try:
        return (*_restore_step(manager, step, abstract_state), True)
    except Exception:
        mismatch = abstract_state is not None and _structure_mismatch(manager, step, abstract_state)
        if not mismatch:
            raise
    part, where = mismatch
    if part == "weights" or not allow_new_optimizer:
        raise CheckpointMismatch(step, part, where, directory)
    return (*_restore_step(manager, step, None), False)


def partial_saves(directory: str) -> dict[int, str]:
    """{step: folder name} of saves that were interrupted before Orbax committed them."""
    if not os.path.isdir(directory):
        return {}
    return {
        int(match.group(1)): name
        for name in sorted(os.listdir(directory))
        if (match := _PARTIAL.match(name))
    }


class Checkpoints:
    """The checkpoints of one run, in ``WORKDIR/checkpoints``.

    Args:
      workdir: the run's folder.
      keep: how many checkpoints to keep (0: all).
      create: create the folder now; False only reads until the first save (the trainer
        writes nothing before its first step).
    """

    def __init__(self, workdir: str, keep: int, create: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        _quiet_orbax()
        self.manager = _manager(self.directory, keep, create=create)
        self._pending: int | None = None  # the step of the save running in the background
        self._failed = False
        self._unreadable: list[int] = []  # found by `restore`, moved away by `set_aside`
        self._partial: list[str] = []

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` at its step (asynchronously; `wait` makes it durable).

        A step that is already saved is left as it is.

        Raises:
          CheckpointWriteError: when this save, or the previous one, failed.
        """
        step = int(jax.device_get(state.step))
        self.wait()
        if step in self.manager.all_steps():
            return
        meta = {**meta, "step": step, _CHECKSUMS: checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # force: the trainer decides when to save; Orbax's own policy would silently skip a step
        # at or below its newest one, or while an earlier save is being written.
        self._write(step, lambda: self.manager.save(step, args=args, force=True))
        self._pending = step

    def poll(self) -> None:
        """Returns at once; raises `CheckpointWriteError` once the background save has failed.

        The trainer polls after every step, so a write that fails (a full disk fails within
        milliseconds) stops the run at the next step boundary.
        """
        if self._pending is not None:
            self._write(self._pending, self.manager.check_for_errors)
            if not self.manager.is_saving_in_progress():
                self.wait()

    def wait(self) -> None:
        """Blocks until the background save is written.

        Raises:
          CheckpointWriteError: when it failed.
        """
        if self._pending is not None:
            step, self._pending = self._pending, None
            self._write(step, self.manager.wait_until_finished)

    def _write(self, step: int, call: Callable[[], Any]) -> None:
        """Runs ``call``, a part of the save of ``step``. When it fails, raises the one-line
        `CheckpointWriteError` after removing the failed save's files (they may fill a disk; a
        rerun would discard them anyway)."""
        try:
            call()
        except Exception as error:  # noqa: BLE001 - any failure to write is reported the same
            self._failed, self._pending = True, None
            reason = _reason(error, os_words=True)
            name = partial_saves(self.directory).get(step)
            if name and jax.process_index() == 0:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            raise CheckpointWriteError(step, reason, self.directory) from None

    def restore(self, abstract_state: Any, *, allow_new_optimizer: bool = False) -> Restored | None:
        """Reads the newest readable checkpoint into the structure of ``abstract_state``;
        changes nothing on disk (`set_aside` does, once the run commits to the workdir).

        Unreadable newer checkpoints and interrupted saves are reported with a warning and
        remembered for `set_aside` (docs/reliability.md, "Checkpoints").

        Args:
          abstract_state: the run's state as ShapeDtypeStructs with shardings.
          allow_new_optimizer: restore a checkpoint whose parameters and BatchNorm statistics
            fit but whose optimizer state does not, without the optimizer state.

        Returns:
          A `Restored`, or None when the run has no finished checkpoint.

        Raises:
          CheckpointMismatch: when the newest readable checkpoint holds another structure.
          CheckpointError: when finished checkpoints exist but none can be read.
        """
        steps, partial = self.steps(), partial_saves(self.directory)
        for step, name in partial.items():
            if step > (steps[-1] if steps else -1):
                log.warning(
                    "checkpoint at step %d in %s was only partly written (%s: the save "
                    "was interrupted); ignoring it",
                    step,
                    self.directory,
                    name,
                )
        self._unreadable, self._partial = [], list(partial.values())
        if not steps:
            if partial:
                log.warning(
                    "no save had finished in %s; discarding %s and starting the run from step 0",
                    self.directory,
                    ", ".join(partial.values()),
                )
            return None
        try:
            restored = _restore_newest(
                self.directory, steps, abstract_state, allow_new_optimizer, manager=self.manager
            )
        except CheckpointMismatch:
            raise
        except CheckpointError as error:
            raise CheckpointError(
                f"{error}. Refusing to start from scratch over an existing run; to start over, "
                f"delete {self.directory}."
            ) from None
        if restored.failures or partial:
            log.warning(
                "resuming from step %d, the newest readable checkpoint in %s",
                restored.step,
                self.directory,
            )
        self._unreadable = [step for step, _ in restored.failures]
        return restored

    def set_aside(self) -> None:
        """Moves the unreadable steps that `restore` found out of Orbax's folder, and removes
        the interrupted saves.

        Orbax would otherwise skip saving those steps again (it never saves at or below its
        newest step) and a later resume would meet the damaged files again.
        """
        unreadable, partial = self._unreadable, self._partial
        self._unreadable, self._partial = [], []
        if not unreadable and not partial:
            return
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
            multihost_utils.sync_global_devices("lbq_checkpoints_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the background save and closes Orbax's manager.

        Raises:
          CheckpointWriteError: when the last save failed.
        """
        try:
            self.wait()
        finally:
            # Orbax re-raises the failed save's error on closing
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()


# ----------------------------------------------------------------------------- reading a run


def load_variables(path: str) -> dict[str, Any]:
    """`load_saved_variables` without the step (for ``init_from`` and ``distill.teacher_init``).

    Raises:
      CheckpointError: when there is no checkpoint or none can be read.
    """
    return load_saved_variables(path)[1]


def load_saved_variables(path: str) -> tuple[int, dict[str, Any]]:
    """(step, {network: {'params', 'batch_stats'}}) of a run's workdir or checkpoint folder.

    ``path`` may be a workdir, its ``checkpoints`` folder or one step's folder (which must be
    readable). The newest readable checkpoint is used, with a warning for any newer unreadable
    one; the run may be training meanwhile (`_read_newest_while_saving`).

    Raises:
      CheckpointError: when there is no checkpoint or none can be read, or a step's folder
        given as ``path`` was deleted while it was read.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    step_dir = os.path.basename(path)
    if step_dir.isdigit() and os.path.isdir(os.path.join(path, "state")):
        try:
            restored = _restore_newest(os.path.dirname(path), [int(step_dir)], snapshot=True)
        except _StepDeleted:
            raise CheckpointError(
                f"checkpoint {path} was deleted while it was read (a running trainer keeps "
                "only its newest checkpoints: read the newest instead)"
            ) from None
    elif not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    else:
        restored = _read_newest_while_saving(path)
    state = restored.state
    return restored.step, {
        name: {"params": state["params"][name], "batch_stats": state["batch_stats"].get(name, {})}
        for name in state["params"]
    }


def _read_newest_while_saving(directory: str) -> Restored:
    """`_restore_newest` of ``directory``, into which a trainer may be saving and deleting
    (docs/deploy.md: "A run that is training can be read"). A listing or a read that meets a
    deleted step starts again, reading from a snapshot; saves in progress are listed before
    the steps, so one that commits between the two listings is seen, and "nothing at all" is
    believed only when the next round agrees (a save can start, have the old step deleted and
    commit between two listings).
    """
    deadline = time.monotonic() + READ_RETRY_SECONDS
    attempt = empty = 0  # empty: rounds in a row that found neither a step nor a save
    while True:
        attempt += 1
        try:
            saving = bool(partial_saves(directory))
            with _reader(directory, 0, snapshot=False) as manager:
                steps = list(manager.all_steps())
            if steps:
                return _restore_newest(directory, steps, snapshot=attempt > 1)
            empty = 0 if saving else empty + 1
            if empty == 2:
                raise CheckpointError(f"no checkpoint found in {directory}")
        except (_StepDeleted, FileNotFoundError):  # deleted under the listing or the read
            pass
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{attempt} checkpoints in {directory} were deleted while they were read, for "
                f"{READ_RETRY_SECONDS:.0f} s: the running trainer deletes them faster than "
                "they can be copied; raise its keep_checkpoints or read after it ends"
            )
        time.sleep(0.05)
