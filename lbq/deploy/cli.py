"""What the deploy commands share: logging, and one line per error instead of a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from lbq.data import DataError
from lbq.deploy.errors import DeployError

PREFIX = "lbq: "


class _StderrHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stderr`` of the moment (which tests replace)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def _configure_logging() -> None:
    """lbq's warnings on stderr with the ``lbq:`` prefix; libraries only from WARNING."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logger = logging.getLogger("lbq")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def error(message: object) -> None:
    """Prints one ``lbq: error: ...`` line on stderr."""
    text = " ".join(str(message).split())
    print(f"{PREFIX}error: {text}", file=sys.stderr)


def run_command(command: Callable[[], int]) -> int:
    """Runs ``command``; the errors a user can cause become one line and exit status 1."""
    from lbq.deploy.run import RUN_ERRORS

    _configure_logging()
    try:
        return command()
    except (DeployError, DataError, OSError, *RUN_ERRORS) as failure:
        error(failure)
        return 1
