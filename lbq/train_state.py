"""The train state: everything a run needs to continue exactly, checkpointed as one pytree.

Its own module, below the steps that transform it (`lbq.steps`), the calibration that sets its
ranges (`lbq.calibrate`) and the trainer that builds it (`lbq.trainer`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: checkpointed as one pytree.

    Attributes:
      step: global step (across stages).
      params: {network name: parameters}.
      batch_stats: {network name: BatchNorm statistics}.
      opt_state: optimizer state of the trainable networks (holds the stochastic masks).
      first_nonfinite: the first step whose loss or gradient was not finite, or -1.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    first_nonfinite: jax.Array
