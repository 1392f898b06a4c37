"""Run metrics: JSON lines and TensorBoard in the workdir, and a console progress bar.

Only host 0 writes. Values arrive as device arrays collected over a logging interval and are
fetched together, so the train step synchronises with the host only at logging intervals.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from lbq.io import atomic_open, jsonl_lines


class MetricsWriter:
    """Writes ``metrics.jsonl`` and TensorBoard events (tensorboardX, no TensorFlow needed)."""

    def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
        """``start_step``: the step the run starts or resumes from. Records of later steps,
        left by a run killed after its last checkpoint, are dropped: they will be written again.
        """
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            drop_records_after(self.path, start_step)
            try:
                from tensorboardX import SummaryWriter

                # purge_step hides the same steps' events from TensorBoard. tensorboardX names
                # event files by the second and opens them with 'wb': the suffix keeps a resume
                # within the same second from overwriting the previous invocation's events.
                self._tb = SummaryWriter(
                    os.path.join(workdir, "tensorboard"),
                    purge_step=start_step + 1,
                    filename_suffix=f".from_step_{start_step}",
                )
            except ImportError:  # TensorBoard is optional; JSON lines are always written
                self._tb = None

    def write(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        """Appends one record, e.g. kind='train' or 'eval'."""
        if not self.enabled:
            return
        record = {"step": int(step), "kind": kind, "time": time.time()}
        record.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float, np.floating, np.integer)):
                    self._tb.add_scalar(f"{kind}/{key}", float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def drop_records_after(path: str, step: int) -> int:
    """Rewrites the JSON-lines file ``path`` without its records of steps after ``step``, and
    without a line cut short by a hard kill. Returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    lines = list(jsonl_lines(path))
    kept = [line for _, line, record in lines if _step_of(record, step + 1) <= step]
    if len(kept) < len(lines):
        with atomic_open(path) as f:  # a kill now leaves the old file or the new one
            f.writelines(kept)
    return len(lines) - len(kept)


def _step_of(record: Any, otherwise: int) -> int:
    try:
        return int(record["step"])  # record is None for a line cut short or not JSON
    except (ValueError, KeyError, TypeError):
        return otherwise


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def mean_of(records: list[Mapping[str, jax.Array]]) -> dict[str, float]:
    """Fetches a list of per-step metric dicts in one transfer and averages each key."""
    fetched = jax.device_get(records)
    keys = fetched[0].keys() if fetched else ()
    return {k: float(np.mean([r[k] for r in fetched])) for k in keys}


class Progress:
    """A one-line progress bar with images/s and ETA, for the console of host 0."""

    # Our own, not tqdm's or rich's: both would change what the bar prints (tqdm writes '\r'
    # lines to a log file too, and its ETA drops the hours under one hour; rich prints nothing
    # until the end off a terminal), and this is 25 lines.

    def __init__(self, total: int, start: int, enabled: bool, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        # sys.stderr as it is now, not at import: it may have been replaced since (notebooks).
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()

    def update(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        done = max(step - self.start, 1)
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {step}/{self.total} {text} eta {clock(eta)}"
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (rounded down; negative counts as 0)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
