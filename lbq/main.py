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


def main(argv) -> int:
    del argv
    from lbq.checkpoint import CheckpointError
    from lbq.data import DataError
    from lbq.train import PREEMPTED_EXIT_CODE, NonFiniteError, train_and_evaluate
    from lbq.validate import ConfigError

    configure_logging()
    if FLAGS.workdir is None:
        print("lbq: error: --workdir is required", file=sys.stderr)
        return 2
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as error:
        print(f"lbq: error: {error}", file=sys.stderr)
        return 1
    if result.status == "preempted":
        print(
            f"lbq: preempted at step {result.step}; a checkpoint is saved. Rerun the same "
            "command to resume.",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(lambda argv: sys.exit(main(argv)))
