"""The workdir of a run: exclusive use (`exclusive_workdir`), whether to resume
(`inspect_workdir`, which changes nothing), and the writes made once nothing before the first
step can fail (`clear_run_outputs`, `write_record`): docs/reliability.md ("One run per
workdir", "Nothing written before the first step").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from lbq.io import write_json
from lbq.validate import ConfigError, flat_fields

__all__ = [
    "LOCK_FILE",
    "WorkdirDecision",
    "WorkdirError",
    "WorkdirLock",
    "clear_run_outputs",
    "config_differences",
    "exclusive_workdir",
    "inspect_workdir",
    "write_record",
]

log = logging.getLogger("lbq")

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
LOCK_FILE = "lbq.lock"  # WORKDIR/lbq.lock: flock(2)ed by the run that uses the workdir


class WorkdirError(RuntimeError):
    """The workdir cannot be used: another run holds it, or it cannot be written."""


# ----------------------------------------------------------------------------- the lock


def _holder_text(raw: bytes) -> str:
    """'host H, pid P, since T' from a lock file's record, or a note that it is unknown."""
    try:
        holder = json.loads(raw.decode())
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "its host and pid are not recorded yet"


class WorkdirLock:
    """Exclusive use of a workdir by one run: an exclusive `fcntl.flock` on ``WORKDIR/lbq.lock``.

    The file records the holder's host, pid and start time for the message of a refused run.
    Released normally, the file is removed, and so is the workdir when this run created it and
    left nothing else in it. A dead holder's lock, filesystems without locks (ENOLCK,
    EOPNOTSUPP, ENOSYS: a warning) and shared mounts: docs/reliability.md ("One run per workdir").
    """

    # Our own flock, not the filelock package: filelock is not a dependency of lbq (only of torch
    # and huggingface_hub); its 4.x Unix lock falls back to a soft lock where the filesystem has
    # no flock (this lock warns and runs), leaves the lock file after a release (this one
    # removes it, and the workdir it created), and the holder's host, pid and start for the
    # refusal would still be ours to write and read.
    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None
        self._created_workdir = False

    def acquire(self) -> None:
        """Takes the lock at once or refuses.

        Raises:
          WorkdirError: when another process holds it (naming its host and pid), or the
            workdir cannot be created.
        """
        self._created_workdir = not os.path.isdir(self.workdir)
        try:
            os.makedirs(self.workdir, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                if self._try_lock(fd):
                    break
                os.close(fd)  # a releasing holder removed the file we opened: open it again
            self._fd = fd
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as error:
            self.release()
            raise WorkdirError(f"cannot use workdir {self.workdir}: {_os_reason(error)}") from None

    def _try_lock(self, fd: int) -> bool:
        """Locks ``fd`` or refuses; False when a releasing holder removed the file meanwhile."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another lbq run ({holder}); wait for it "
                f"to end, or use another --workdir (the lock is {self.path})"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning(
                "the filesystem of %s has no file locks (%s): lbq cannot tell whether another "
                "run uses this workdir",
                self.workdir,
                os.strerror(error.errno),
            )
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Removes the lock file (while still holding it) and drops the lock; removes the
        workdir too when this run created it and nothing else was written there."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            os.close(self._fd)
            self._fd = None
        if self._created_workdir:
            with contextlib.suppress(OSError):  # not empty: the run wrote to it
                os.rmdir(self.workdir)


@contextlib.contextmanager
def exclusive_workdir(workdir: str) -> Iterator[None]:
    """Holds `WorkdirLock` on ``workdir`` for the block; only process 0 takes it.

    With several processes, process 0's verdict is broadcast, so every process refuses a busy
    workdir together (the others would otherwise wait for process 0 in the first collective).

    Raises:
      WorkdirError: when another run holds the workdir or it cannot be created.
    """
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    refusal = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirError as error:
            refusal = error
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(refusal is not None))
        if int(refused) and refusal is None:
            refusal = WorkdirError(f"workdir {workdir} is not available (see process 0)")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _os_reason(error: OSError) -> str:
    """'No space left on device (path)' for an OSError: the cause first, the path after."""
    reason = error.strerror or str(error)
    return f"{reason} ({error.filename})" if error.filename else reason


def _as_float(value: Any) -> Any:
    """Numbers compared by value: a stage's ``epochs=80`` is recorded as 80.0 since its field
    became a typed float, and a run recorded before that must still resume."""
    if isinstance(value, list):
        return [_as_float(v) for v in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _same(a: Any, b: Any) -> bool:
    return json.dumps(_as_float(a), default=str) == json.dumps(_as_float(b), default=str)


_STAGE_FIELD = re.compile(r"^stages\[\d+\]\.(.+)$")


def _flat_defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    """The default config and a default stage, flattened like a record."""
    from lbq.configs import default

    def flat(config) -> dict[str, Any]:
        return flat_fields(json.loads(config.to_json_best_effort()))

    return flat(default.get_config()), flat(default.stage("stage"))


def _added_at_default(key: str, value: Any, defaults: tuple[dict, dict]) -> bool:
    """Whether ``key`` (absent from a recorded config) holds its default ``value``; a stage
    field is looked up among a default stage's fields."""
    known, stage_field = defaults[0], _STAGE_FIELD.match(key)
    if stage_field:
        known, key = defaults[1], stage_field.group(1)
    return key in known and _same(known[key], value)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'field: old -> new' for each field that differs and matters for the computation.

    A field that ``old`` lacks and ``new`` holds at its default is no difference: lbq gained
    the field after the run was recorded, and a new field's default keeps the behaviour of
    the code that recorded it (tests/test_golden.py resumes such a run).
    """
    a, b = flat_fields(dict(old)), flat_fields(dict(new))
    defaults = _flat_defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if key not in a and _added_at_default(key, vb, defaults):
            continue
        if not _same(va, vb):
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
      previous: the recorded run's ``config.json`` when it differs (None otherwise).
    """

    workdir: str
    record: Mapping[str, Any]
    differences: tuple[str, ...] = ()
    overwrite: bool = False
    previous: Mapping[str, Any] | None = None


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
    return WorkdirDecision(
        workdir,
        record,
        diffs,
        bool(diffs) and on_config_change == "overwrite",
        previous if diffs else None,
    )


def clear_run_outputs(workdir: str) -> None:
    """Deletes a run's checkpoints, metrics and events (for `overwrite`).

    Raises:
      WorkdirError: when one cannot be deleted.
    """
    log.warning("overwriting the run in %s", workdir)
    try:
        for name in RUN_OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    except OSError as error:
        raise WorkdirError(
            f"could not delete the old run in {workdir}: {_os_reason(error)}"
        ) from None


def write_record(workdir: str, record: Mapping[str, Any]) -> None:
    """Writes ``config.json`` (write and rename: a kill never leaves half a file).

    Raises:
      WorkdirError: when it cannot be written (the old file, if any, is kept).
    """
    path = os.path.join(workdir, "config.json")
    try:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, record)
    except OSError as error:
        raise WorkdirError(f"could not write {path}: {_os_reason(error)}") from None
