"""Entry point: ``python -m lbq.main --config=configs/imagenet_w2a2.py --workdir=DIR``.

Overrides take the usual ml_collections form, e.g. ``--config.quant.w_bits=4``; a config file
may take a variant after a colon, e.g. ``--config=configs/cifar100_w2a2.py:tiny``.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config.json go here.")


def configure_logging() -> None:
    """lbq's own messages at INFO on stderr; libraries (Orbax, absl) only from WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("lbq")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lbq: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def overridden_fields(argv: list[str]) -> list[str]:
    """The config fields set on the command line: ``--config.quant.w_bits=4`` -> quant.w_bits."""
    prefix = "--config."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one error line instead of a traceback.

    ml_collections raises plain KeyError/AttributeError/ValueError for an override of a field
    that does not exist (``--config.quant.wbits=4``) or a config file that fails; absl only
    catches its own flag errors.
    """
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.exit(_error(f"{error}"))
    except (KeyError, AttributeError, ValueError, TypeError) as error:
        sys.exit(_error(_override_error(argv, error)))


def _override_error(argv: list[str], error: BaseException) -> str:
    from lbq.configs import default
    from lbq.validate import did_you_mean, flat_fields

    fields = [f for f in flat_fields(default.get_config().to_dict()) if "[" not in f]
    # every field and section ("quant"): the names a misspelt override is matched against
    known = sorted(
        {".".join(f.split(".")[: n + 1]) for f in fields for n in range(f.count(".") + 1)}
    )
    for field in overridden_fields(argv):
        base = field.split("[")[0]
        if base.split(".")[0] != "stages" and base not in known:
            hint = did_you_mean(base, known, "--config.")
            return f"--config.{field} is not a config field{hint}"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"could not load the config: {type(error).__name__}: {message}"


def _error(message: object, status: int = 1) -> int:
    """Prints one ``lbq: error: ...`` line on stderr; returns ``status``."""
    print(f"lbq: error: {message}", file=sys.stderr)
    return status


SECOND_INTERRUPT = (
    "stopped at once by a second interrupt; the newest checkpoint is kept. Rerun the same "
    "command to resume."
)


def stop_message(result=None, stop: BaseException | None = None) -> str:
    """What a stopped run tells its user, for each way a run stops early.

    Args:
      result: the `RunResult` of a run that trained and saved before it stopped
        (status 'preempted'), or None.
      stop: `Preempted` (a stop request before the first training step; its message says what
        the workdir holds) or KeyboardInterrupt (a second Ctrl-C), or None.
    """
    if isinstance(stop, KeyboardInterrupt):
        return SECOND_INTERRUPT
    if stop is not None:
        return str(stop)
    if result.step == 0:
        return (
            "stopped before the first training step; nothing to save yet. Rerun the same "
            "command to start the run."
        )
    return (
        f"preempted at step {result.step}; a checkpoint is saved. Rerun the same command to resume."
    )


def main(argv) -> int:
    """Runs the training that the flags describe; returns the exit status.

    0: completed; 1: an error, reported in one ``lbq: error: ...`` line; 2: no --workdir;
    75 (`PREEMPTED_EXIT_CODE`): stopped by SIGTERM/SIGINT, rerun the same command to resume.
    """
    from lbq.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher

    # First: from here on SIGTERM/SIGINT are stop requests (the `__main__` block installs the
    # same watcher even earlier, before the flags and the config file are read).
    with PreemptionWatcher():
        configure_logging()
        if FLAGS.workdir is None:
            return _error("--workdir is required", 2)
        try:  # the outer try: a second Ctrl-C may come while the heavy imports run
            from lbq.checkpoint import CheckpointError
            from lbq.data import DataError
            from lbq.train import NonFiniteError, train_and_evaluate
            from lbq.validate import ConfigError
            from lbq.workdir import WorkdirError

            errors = (ConfigError, DataError, CheckpointError, NonFiniteError, WorkdirError)
            try:
                result = train_and_evaluate(
                    FLAGS.config, FLAGS.workdir, overridden=overridden_fields(argv)
                )
            except errors as error:
                return _error(error)
            except OSError as error:  # a write to the workdir (metrics, events) failed
                return _error(_os_error_text(error))
            if result.status == "completed":
                return 0
            message = stop_message(result)
        except (Preempted, KeyboardInterrupt) as stop:
            message = stop_message(stop=stop)
        # The one exit of every early stop: status 75, and the same command resumes.
        print(f"lbq: {message}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


def _os_error_text(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"could not write {error.filename}: {reason}" if error.filename else reason


if __name__ == "__main__":
    from lbq.preemption import PreemptionWatcher

    # Before the flags are parsed (the config file is read then): a signal from the very start
    # is a stop request, answered with exit status 75.
    with PreemptionWatcher():
        flags.mark_flag_as_required("config")
        app.run(lambda argv: sys.exit(main(sys.argv)), flags_parser=parse_flags)
