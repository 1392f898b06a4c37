"""Preemption: SIGTERM and SIGINT become a stop request that the trainer honours safely.

This module imports nothing heavy (no JAX at import time), so that `lbq.main` can install the
handlers before it imports anything else: from then on a signal is a request, never the
default "terminate at once" (exit 143 and no message, which a scheduler does not requeue).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any, ClassVar

log = logging.getLogger("lbq")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: rerun the same command to resume


class Preempted(Exception):
    """A stop requested before the first training step; the message says what the workdir holds."""


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT into a stop request that the trainer checks at safe points
    (docs/reliability.md).

    The handlers are installed on entering and restored on leaving. A watcher entered while
    another one is installed shares it (``with`` gives the installed watcher), so the one that
    `lbq.main` installs on its first line covers start-up, restore and the first compile too.
    """

    # Our own handlers, not Orbax's `CheckpointManager.reached_preemption`: that asks JAX's
    # coordination service, which exists only after `jax.distributed.initialize`, so in a
    # single-process run it answers False even after a SIGTERM (orbax-checkpoint 0.12.8), and
    # it never sees Ctrl-C.
    _installed: ClassVar[PreemptionWatcher | None] = None

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatcher:
        if PreemptionWatcher._installed is not None:
            return PreemptionWatcher._installed
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        PreemptionWatcher._installed = self
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once, without a checkpoint
        self.signal_name = signal.Signals(signum).name
        log.warning("received %s: stopping at the next safe point", self.signal_name)
        self.requested = True

    def __exit__(self, *exc):
        if PreemptionWatcher._installed is not self:  # it shares the installed watcher
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        PreemptionWatcher._installed = None

    def should_stop(self, sync: bool) -> bool:
        """Whether to stop now; with several processes all of them must agree (at ``sync``)."""
        import jax

        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def raise_if_requested(self, written: str) -> None:
        """Raises `Preempted` when a stop was requested (every process agrees first).

        Args:
          written: what the workdir holds at this point, for the message.
        """
        if self.should_stop(sync=True):
            raise Preempted(
                f"stopped by {self.signal_name or 'a signal on another process'} before the "
                f"first training step; {written}. Rerun the same command to run it."
            )
