"""Devices: the optional multi-host start-up and the ('data',) mesh every run computes on."""

from __future__ import annotations

import os

import jax

from lbq.validate import ConfigError

_PROCESS_VARIABLES = ("LBQ_COORDINATOR_ADDRESS", "LBQ_NUM_PROCESSES", "LBQ_PROCESS_ID")


def maybe_initialize_distributed(configured: bool) -> None:
    """Calls `jax.distributed.initialize()` when ``configured`` or LBQ_DISTRIBUTED asks for it:
    with the LBQ_* process variables when they are set, else with JAX's own cluster detection
    (the table in docs/launch.md).

    Raises:
      ConfigError: when only some of the LBQ_* variables are set, they are not integers, or
        no cluster can be found (one line, instead of JAX's traceback).
    """
    requested = configured or os.environ.get("LBQ_DISTRIBUTED", "") not in ("", "0")
    if not requested or jax.distributed.is_initialized():
        return
    given = [os.environ.get(name, "") for name in _PROCESS_VARIABLES]
    names = ", ".join(_PROCESS_VARIABLES)
    if not any(given):
        _initialize(
            f"no cluster was detected (Cloud TPU, SLURM or Open MPI); set {names} or run with "
            "distributed=False"
        )
        return
    if not all(given):
        missing = ", ".join(n for n, v in zip(_PROCESS_VARIABLES, given, strict=True) if not v)
        raise ConfigError(f"distributed run: {missing} unset; set all of {names}")
    try:
        count, index = int(given[1]), int(given[2])
    except ValueError:
        raise ConfigError(
            f"distributed run: LBQ_NUM_PROCESSES={given[1]!r} and LBQ_PROCESS_ID={given[2]!r} "
            "must be integers"
        ) from None
    _initialize(
        f"could not join the coordinator at {given[0]}",
        coordinator_address=given[0],
        num_processes=count,
        process_id=index,
        cluster_detection_method="deactivate",
    )


def _initialize(failure: str, **kwargs) -> None:
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"distributed=True: {failure} ({reason})") from None


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over all devices, in Auto mode: shardings are given to `jax.jit`
    (batches split, state replicated) rather than carried in array types."""
    count = num_devices or jax.device_count()
    return jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
