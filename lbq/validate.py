"""Whole-config validation, run before anything is compiled or read.

Every error is a `ConfigError` whose message starts with the dotted name of the field.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from lbq.models import MODEL_NAMES, get_model
from lbq.quant.precision import SCHEDULES as STOCHASTIC_SCHEDULES
from lbq.quant.quantizers import check_bits
from lbq.quant.spec import make_precision
from lbq.schedules import LR_SCHEDULES, build_stages

OPTIMIZERS = ("sgd", "adam")
# Stage lengths in epochs become steps only once the dataset size is known (the trainer checks
# them then); the structure, bits and rates of the stages are checked here with this stand-in.
_ANY_STEPS_PER_EPOCH = 1 << 40
DTYPES = ("auto", "float32", "bfloat16")
AUGMENTATIONS = ("cifar", "imagenet", "none")


class ConfigError(ValueError):
    """A config field has a bad value; the message names the field."""


def _get(config: Any, field: str) -> Any:
    node = config
    for part in field.split("."):
        try:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        except (AttributeError, KeyError):
            raise ConfigError(f"{field} is missing from the config") from None
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_type(config: Any, field: str, kind: str, *, low=None, high=None, optional=False):
    """Checks one field: kind is 'int', 'number', 'bool' or 'str'; low/high are inclusive."""
    value = _get(config, field)
    if value is None and optional:
        return None
    ok = {
        "int": _is_int,
        "number": _is_number,
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }[kind](value)
    if not ok:
        raise ConfigError(f"{field}={value!r} has type {type(value).__name__}; expected {kind}")
    if kind == "number" and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} must be a finite number")
    if low is not None and value < low:
        raise ConfigError(f"{field}={value!r} must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{field}={value!r} must be <= {high}")
    return value


def check_choice(config: Any, field: str, choices: tuple) -> Any:
    value = _get(config, field)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {choices}")
    return value


def _check_bits(config: Any, field: str) -> None:
    try:
        check_bits(_get(config, field), field)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _check_path(config: Any, field: str) -> None:
    path = check_type(config, field, "str", optional=True)
    # Remote paths (gs://...) are checked when they are read.
    if path and "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{field}={path!r} does not exist")


def _check_stages(config: Any) -> None:
    """The stage list: entries, lengths, bits, rates and schedules, each error naming the stage."""
    stages = _get(config, "stages")
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ConfigError(f"stages={stages!r} must be a non-empty list of stages")
    for index, entry in enumerate(stages):
        if not (isinstance(entry, Mapping) or hasattr(entry, "to_dict")):
            raise ConfigError(
                f"stages[{index}]={entry!r} must be a stage, e.g. configs.default.stage('main', "
                "steps=1000)"
            )
    networks = ["student"]
    if config.distill.enabled:
        networks += [f"student_w{w}a{a}" for w, a in config.distill.extra_students]
        if config.distill.teacher == "joint":
            networks.append("teacher")
    s = config.schedule
    defaults = {
        "w_bits": config.quant.w_bits,
        "a_bits": config.quant.a_bits,
        "lr": {n: float(s.teacher_lr if n == "teacher" else s.lr) for n in networks},
        "lr_schedule": s.lr_schedule,
        "lr_boundaries": tuple(s.lr_boundaries),
        "lr_decay": s.lr_decay,
        "warmup_epochs": s.warmup_epochs,
    }
    try:
        built = build_stages(
            list(stages),
            defaults=defaults,
            networks=networks,
            steps_per_epoch=_ANY_STEPS_PER_EPOCH,
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None
    if any(stage.block_bits for stage in built):
        # Block names do not depend on the classes or architecture options; building the
        # module only lists its layers (nothing is traced).
        names = get_model(config.model.name, num_classes=2, quantized=True).layer_names()
        for stage in built:
            try:
                make_precision(names, stage.w_bits, stage.a_bits, block_bits=stage.block_bits)
            except ValueError as error:
                raise ConfigError(
                    f"stages[{stage.index}] ({stage.name}).block_bits: {error}"
                ) from None


def validate_config(config: Any, *, num_devices: int = 1, num_processes: int = 1) -> None:
    """Checks types, ranges and names of the whole config, the stage list included.

    Whether the data is present, and stage lengths given in epochs, are checked by the trainer
    right after this (they need the dataset), still before anything is compiled.

    Raises:
      ConfigError: naming the first bad field.
    """
    check_type(config, "seed", "int", low=0)
    check_choice(config, "model.name", MODEL_NAMES)
    for field in ("model.quantized", "model.per_channel", "model.logit_scale"):
        check_type(config, field, "bool")
    check_choice(config, "model.shortcut", ("A", "B"))

    check_type(config, "data.name", "str")
    _check_path(config, "data.data_dir")
    check_type(config, "data.train_split", "str")
    check_type(config, "data.eval_split", "str")
    check_type(config, "data.image_size", "int", low=8)
    check_choice(config, "data.augment", AUGMENTATIONS)
    check_type(config, "data.on_device", "bool")
    check_type(config, "data.workers", "int", low=0)
    check_type(config, "data.cache", "bool", optional=True)

    _check_bits(config, "quant.w_bits")
    _check_bits(config, "quant.a_bits")

    for field in ("batch_size", "eval_batch_size"):
        size = check_type(config, field, "int", low=1)
        if size % num_devices:
            raise ConfigError(
                f"{field}={size} does not divide over {num_devices} devices; use a multiple "
                f"of {num_devices}"
            )
        if size % num_processes:
            raise ConfigError(f"{field}={size} does not divide over {num_processes} processes")
    check_choice(config, "compute_dtype", DTYPES)

    check_choice(config, "optimizer.name", OPTIMIZERS)
    check_type(config, "optimizer.momentum", "number", low=0.0, high=0.999999)
    check_type(config, "optimizer.nesterov", "bool")
    check_type(config, "optimizer.weight_decay", "number", low=0.0)

    check_type(config, "schedule.lr", "number", low=0.0)
    check_type(config, "schedule.teacher_lr", "number", low=0.0)
    check_type(config, "schedule.lr_decay", "number", low=0.0)
    check_type(config, "schedule.warmup_epochs", "number", low=0.0)
    check_choice(config, "schedule.lr_schedule", LR_SCHEDULES)
    boundaries = _get(config, "schedule.lr_boundaries")
    if not isinstance(boundaries, (list, tuple)) or not all(
        _is_number(b) and 0 < b < 1 for b in boundaries
    ):
        raise ConfigError(
            f"schedule.lr_boundaries={boundaries!r} must be a list of fractions in (0, 1)"
        )

    check_type(config, "stochastic.enabled", "bool")
    check_choice(config, "stochastic.unit", ("block", "layer"))
    check_choice(config, "stochastic.schedule", STOCHASTIC_SCHEDULES)
    check_type(config, "stochastic.p_start", "number", low=0.0, high=1.0)
    check_type(config, "stochastic.full_at", "number", low=0.0, high=1.0)
    check_type(config, "stochastic.num_steps", "int", low=1)

    distill = check_type(config, "distill.enabled", "bool")
    check_choice(config, "distill.teacher", ("joint", "frozen"))
    for name in (
        "student_ce",
        "student_kl",
        "student_att",
        "teacher_ce",
        "teacher_kl",
        "teacher_att",
    ):
        check_type(config, f"distill.{name}", "number", low=0.0)
    if check_type(config, "distill.temperature", "number") <= 0:
        raise ConfigError(f"distill.temperature={config.distill.temperature} must be > 0")
    _check_path(config, "distill.teacher_init")
    if distill and config.distill.teacher == "frozen" and not config.distill.teacher_init:
        raise ConfigError("distill.teacher='frozen' needs distill.teacher_init (a trained teacher)")
    for i, bits in enumerate(_get(config, "distill.extra_students")):
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ConfigError(f"distill.extra_students[{i}]={bits!r} must be (w_bits, a_bits)")
        for value in bits:
            try:
                check_bits(value, f"distill.extra_students[{i}]")
            except ValueError as error:
                raise ConfigError(str(error)) from None
    if _get(config, "distill.extra_students") and not distill:
        raise ConfigError("distill.extra_students needs distill.enabled=True")
    if distill and not config.model.quantized:
        raise ConfigError("distill.enabled needs model.quantized=True (the student is low-bit)")
    if config.stochastic.enabled and not config.model.quantized:
        raise ConfigError("stochastic.enabled needs model.quantized=True")

    _check_path(config, "init_from")
    check_type(config, "log_every_steps", "int", low=1)
    check_type(config, "eval_every_epochs", "number", low=0.0)
    check_type(config, "checkpoint_every_steps", "int", low=1)
    check_type(config, "keep_checkpoints", "int", low=1)
    check_choice(config, "on_nonfinite", ("stop", "skip"))
    check_choice(config, "on_config_change", ("refuse", "continue", "overwrite"))
    check_type(config, "distributed", "bool")
    check_type(config, "progress", "bool")
    _check_stages(config)
