"""The run plan: a config parsed and validated once into small frozen, typed objects.

`parse_config` is the only reader of an ml_collections config below `lbq.main`. Every module
after it takes the typed part it needs: the trainer a `RunPlan`, the network builder a
`ModelSpec` and `NetworkSpec`s, the data layer `lbq.data.config.Settings`, the loop the stages.
Every error is a `ConfigError` (`lbq.validate`) whose message starts with the dotted name of
the field, raised before anything is written or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

from lbq.data.config import AUGMENTATIONS, Settings, read_settings
from lbq.data.config import steps_per_epoch as data_steps_per_epoch
from lbq.data.errors import DataError
from lbq.models import CIFAR_MODELS, MODEL_NAMES, get_model
from lbq.models.common import ACTIVATION_PLACEMENTS, BLOCK_OUTPUT
from lbq.quant.layers import ACTIVATION_QUANTIZERS, DEFAULT_QUANTIZER, WEIGHT_QUANTIZERS
from lbq.quant.precision import make_precision
from lbq.quant.quantizers import check_bits, check_lsq_weight_bits
from lbq.quant.stochastic import SCHEDULES as STOCHASTIC_SCHEDULES
from lbq.quant.stochastic import ProbabilitySchedule
from lbq.stages import LR_SCHEDULES, STAGE_FIELDS, StageSpec, parse_stages
from lbq.steps import LossWeights
from lbq.validate import ConfigError, did_you_mean, get_field

# ----------------------------------------------------------------------------- field checks


_KINDS = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def check_type(config: Any, field: str, kind: str, *, low=None, high=None, optional=False):
    """Checks one field: kind is 'int', 'number', 'bool' or 'str'; low/high are inclusive.

    Returns:
      The value (None for an unset optional field).

    Raises:
      ConfigError: naming the field.
    """
    value = get_field(config, field)
    if value is None and optional:
        return None
    if not _KINDS[kind](value):
        raise ConfigError(f"{field}={value!r} has type {type(value).__name__}; expected {kind}")
    if kind == "number" and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} must be a finite number")
    if low is not None and value < low:
        raise ConfigError(f"{field}={value!r} must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{field}={value!r} must be <= {high}")
    return value


def check_choice(config: Any, field: str, choices: tuple) -> Any:
    value = get_field(config, field)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {choices}")
    return value


def check_bits_value(value: Any, field: str) -> int:
    """A bit-width (a whole number in 1..32) of config field ``field``."""
    try:
        return check_bits(value, field)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_path(config: Any, field: str) -> str | None:
    """An optional local path that must exist (remote ``gs://`` paths are checked on read)."""
    path = check_type(config, field, "str", optional=True)
    if path and "://" not in path and not os.path.exists(path):
        raise ConfigError(f"{field}={path!r} does not exist")
    return path or None


def _clip(config: Any, field: str) -> float:
    clip = check_type(config, field, "number")
    if clip <= 0:
        raise ConfigError(f"{field}={clip!r} must be > 0 (a clip value)")
    return float(clip)


def _percentile(config: Any, field: str) -> float:
    percentile = check_type(config, field, "number", high=100.0)
    if percentile <= 0:
        raise ConfigError(f"{field}={percentile!r} must be in (0, 100]")
    return float(percentile)


def _read(field: str, check: Any, **bounds: Any) -> Any:
    """A spec attribute that `_build` reads from config ``field``: ``check`` is check_type's
    kind (a number becomes a float) with its ``bounds``, check_choice's choices, or a function
    of (config, field)."""
    return dataclasses.field(metadata={"field": field, "check": check, "bounds": bounds})


def _build(cls: type, config: Any, **given: Any) -> Any:
    """``cls`` from ``given`` and, in attribute order, the checked config fields of the others."""
    values = dict(given)
    for attribute in dataclasses.fields(cls):
        if attribute.name in given:
            continue
        field, check = attribute.metadata["field"], attribute.metadata["check"]
        if callable(check):
            value = check(config, field)
        elif isinstance(check, str):
            value = check_type(config, field, check, **attribute.metadata["bounds"])
            value = float(value) if check == "number" else value
        else:
            value = check_choice(config, field, check)
        values[attribute.name] = value
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The student's architecture (the teacher is the same network, full precision)."""

    name: str = _read("model.name", MODEL_NAMES)
    quantized: bool = _read("model.quantized", "bool")
    per_channel: bool = _read("model.per_channel", "bool")
    logit_scale: bool = _read("model.logit_scale", "bool")
    shortcut: str = _read("model.shortcut", ("A", "B"))
    weight_quantizer: str = _read("quant.weight_quantizer", WEIGHT_QUANTIZERS)
    activation_quantizer: str = _read("quant.activation_quantizer", ACTIVATION_QUANTIZERS)
    pact_init_clip: float = _read("quant.pact_init_clip", _clip)
    activation_placement: str = _read("model.activation_placement", ACTIVATION_PLACEMENTS)

    @property
    def learned_ranges(self) -> bool:
        """Whether the student has learned clips or step sizes (PACT or LSQ)."""
        dorefa = (DEFAULT_QUANTIZER, DEFAULT_QUANTIZER)
        return self.quantized and (self.weight_quantizer, self.activation_quantizer) != dorefa

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `lbq.models.get_model` beyond name, classes and precision
        (the quantizers only where they are not the default DoReFa ones)."""
        kwargs = {"per_channel": self.per_channel, "logit_scale": self.logit_scale}
        if self.name in CIFAR_MODELS:
            kwargs["shortcut"] = self.shortcut
        if self.weight_quantizer != DEFAULT_QUANTIZER:
            kwargs["weight_quantizer"] = self.weight_quantizer
        if self.activation_quantizer != DEFAULT_QUANTIZER:
            kwargs["activation_quantizer"] = self.activation_quantizer
            kwargs["init_range"] = self.pact_init_clip
        if self.activation_placement != BLOCK_OUTPUT:
            kwargs["activation_placement"] = self.activation_placement
        return kwargs


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """How learned ranges start, and BatchNorm re-estimation (`lbq.calibrate`); configs/default.py's
    comments on the fields read here say what each does, and `lbq.calibrate.changed_weight_bits`
    and `changed_activation_bits` apply the two rules at a bit change."""

    percentile: float = _read("quant.calibration_percentile", _percentile)
    batches: int = _read("quant.calibration_batches", "int", low=1)
    activation_rule: str = _read("quant.activation_calibration", ("percentile", "lsq"))
    recalibrate_bn_batches: int = _read("eval.recalibrate_bn_batches", "int", low=0)
    weight_range_at_bit_change: str = _read(
        "quant.weight_range_at_bit_change", ("keep", "lsq_rule")
    )
    activation_range_at_bit_change: str = _read(
        "quant.activation_range_at_bit_change", ("keep", "calibrate")
    )


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """One network of the run.

    Attributes:
      name: key of its parameters in the train state ('student', 'student_w4a4', 'teacher').
      teacher: the full-precision teacher of joint distillation.
      trainable: False for a frozen teacher.
      fixed_bits: (w_bits, a_bits) of an extra student, which ignores the stages' bits; None
        for the main student (it follows the stages) and the teacher.
    """

    name: str
    teacher: bool = False
    trainable: bool = True
    fixed_bits: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str = _read("optimizer.name", ("sgd", "adam"))
    momentum: float = _read("optimizer.momentum", "number", low=0.0, high=0.999999)
    nesterov: bool = _read("optimizer.nesterov", "bool")
    weight_decay: float = _read("optimizer.weight_decay", "number", low=0.0)


@dataclasses.dataclass(frozen=True)
class StochasticSpec:
    """Stochastic precision (SPEC section 3): off, or units sampled with ``schedule``."""

    enabled: bool
    unit: str
    schedule: ProbabilitySchedule


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """Joint knowledge distillation (SPEC section 4)."""

    enabled: bool
    teacher: str
    teacher_init: str | None
    weights: LossWeights
    extra_students: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int = _read("checkpoint_every_steps", "int", low=1)
    keep: int = _read("keep_checkpoints", "int", low=1)


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything a run does, parsed from its config.

    Attributes:
      data_on_device: keep the whole train split on the accelerators (`data.on_device`).
      record: the config as JSON-compatible dicts, written to ``WORKDIR/config.json`` and
        compared when a run resumes.
    """

    seed: int
    model: ModelSpec
    data: Settings
    data_on_device: bool
    networks: tuple[NetworkSpec, ...]
    stages: tuple[StageSpec, ...]
    batch_size: int
    eval_batch_size: int
    compute_dtype: str
    optimizer: OptimizerSpec
    stochastic: StochasticSpec
    distill: DistillSpec
    init_from: str | None
    checkpoint: CheckpointPolicy
    log_every_steps: int = _read("log_every_steps", "int", low=1)
    eval_every_epochs: float = _read("eval_every_epochs", "number", low=0.0)
    on_nonfinite: str = _read("on_nonfinite", ("stop", "skip"))
    on_config_change: str = _read("on_config_change", ("refuse", "continue", "overwrite"))
    distributed: bool = _read("distributed", "bool")
    progress: bool = _read("progress", "bool")
    record: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)
    calibration: CalibrationSpec

    def steps_per_epoch(self, num_train: int) -> int:
        """Training steps in one pass over ``num_train`` images (the last partial batch is
        dropped).

        Raises:
          ConfigError: when the batch is larger than the training split.
        """
        try:
            return data_steps_per_epoch(num_train, self.batch_size)
        except ValueError as error:
            raise ConfigError(str(error)) from None


# ----------------------------------------------------------------------------- unknown fields


def check_known_fields(config: Any) -> None:
    """Refuses fields that the default config does not have, suggesting the closest name.

    A config file may add a misspelled field (``chekpoint_every_steps``) that nothing reads;
    ml_collections accepts it, so it is caught here.
    """
    from lbq.configs import default

    def walk(node: Mapping[str, Any], known: Mapping[str, Any], path: str) -> None:
        for name, value in node.items():
            if name not in known:
                hint = did_you_mean(name, known, path)
                raise ConfigError(f"{path}{name} is not a config field{hint}")
            if isinstance(known[name], Mapping) and known[name] and isinstance(value, Mapping):
                walk(value, known[name], f"{path}{name}.")

    walk(_as_dict(config), default.get_config().to_dict(), "")
    stages = get_field(config, "stages")
    if isinstance(stages, (list, tuple)):
        for index, entry in enumerate(stages):
            if isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
                walk(_as_dict(entry), dict.fromkeys(STAGE_FIELDS), f"stages[{index}].")


def _as_dict(node: Any) -> dict[str, Any]:
    return node.to_dict() if hasattr(node, "to_dict") else dict(node)


# ----------------------------------------------------------------------------- sections


def _check_lsq_weight_bits(
    model: ModelSpec, stages: tuple[StageSpec, ...], distill: DistillSpec
) -> None:
    """LSQ weights need at least 2 bits (SPEC section 7): every bit-width a student's weights
    take, named by the field that sets it."""
    if not model.quantized or model.weight_quantizer != "lsq":
        return
    try:
        for stage in stages:
            owner = f"{stage.label}.w_bits" if "w_bits" in stage.explicit else "quant.w_bits"
            check_lsq_weight_bits(stage.w_bits, owner)
            for block, (w, _) in stage.block_bits.items():
                check_lsq_weight_bits(w, f"{stage.label}.block_bits[{block!r}]")
        for i, (w, _) in enumerate(distill.extra_students):
            check_lsq_weight_bits(w, f"distill.extra_students[{i}]")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _data(config: Any) -> Settings:
    check_type(config, "data.name", "str")
    check_path(config, "data.data_dir")
    check_type(config, "data.train_split", "str")
    check_type(config, "data.eval_split", "str")
    check_type(config, "data.image_size", "int", low=8)
    check_choice(config, "data.augment", AUGMENTATIONS)
    check_type(config, "data.on_device", "bool")
    check_type(config, "data.workers", "int", low=0)
    check_type(config, "data.cache", "bool", optional=True)
    try:
        return read_settings(config.data)
    except DataError as error:
        raise ConfigError(str(error)) from None


def _batch_sizes(config: Any, num_devices: int, num_processes: int) -> tuple[int, int]:
    sizes = []
    for field in ("batch_size", "eval_batch_size"):
        size = check_type(config, field, "int", low=1)
        if size % num_devices:
            raise ConfigError(
                f"{field}={size} does not divide over {num_devices} devices; use a multiple "
                f"of {num_devices}"
            )
        if size % num_processes:
            raise ConfigError(f"{field}={size} does not divide over {num_processes} processes")
        sizes.append(size)
    return sizes[0], sizes[1]


def _stage_defaults(config: Any, networks: tuple[NetworkSpec, ...]) -> dict[str, Any]:
    """The run-wide values that a stage takes for the fields it leaves unset."""
    w_bits = check_bits_value(get_field(config, "quant.w_bits"), "quant.w_bits")
    a_bits = check_bits_value(get_field(config, "quant.a_bits"), "quant.a_bits")
    lr = check_type(config, "schedule.lr", "number", low=0.0)
    teacher_lr = check_type(config, "schedule.teacher_lr", "number", low=0.0)
    boundaries = get_field(config, "schedule.lr_boundaries")
    if not isinstance(boundaries, (list, tuple)) or not all(
        _KINDS["number"](b) and 0 < b < 1 for b in boundaries
    ):
        raise ConfigError(
            f"schedule.lr_boundaries={boundaries!r} must be a list of fractions in (0, 1)"
        )
    return {
        "w_bits": w_bits,
        "a_bits": a_bits,
        "lr": {n.name: float(teacher_lr if n.teacher else lr) for n in networks if n.trainable},
        "lr_schedule": check_choice(config, "schedule.lr_schedule", LR_SCHEDULES),
        "lr_boundaries": tuple(boundaries),
        "lr_decay": check_type(config, "schedule.lr_decay", "number", low=0.0),
        "warmup_epochs": check_type(config, "schedule.warmup_epochs", "number", low=0.0),
    }


def _stochastic(config: Any, model: ModelSpec) -> StochasticSpec:
    enabled = check_type(config, "stochastic.enabled", "bool")
    unit = check_choice(config, "stochastic.unit", ("block", "layer"))
    schedule = ProbabilitySchedule(
        check_choice(config, "stochastic.schedule", STOCHASTIC_SCHEDULES),
        float(check_type(config, "stochastic.p_start", "number", low=0.0, high=1.0)),
        float(check_type(config, "stochastic.full_at", "number", low=0.0, high=1.0)),
        check_type(config, "stochastic.num_steps", "int", low=1),
    )
    if enabled and not model.quantized:
        raise ConfigError("stochastic.enabled needs model.quantized=True")
    return StochasticSpec(enabled, unit, schedule)


def _extra_students(config: Any) -> tuple[tuple[int, int], ...]:
    entries = get_field(config, "distill.extra_students")
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"distill.extra_students={entries!r} must be a list of (w_bits, a_bits)")
    result = []
    for i, bits in enumerate(entries):
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ConfigError(f"distill.extra_students[{i}]={bits!r} must be (w_bits, a_bits)")
        pair = tuple(check_bits_value(b, f"distill.extra_students[{i}]") for b in bits)
        if pair in result:
            raise ConfigError(
                f"distill.extra_students[{i}]={bits!r} repeats an extra student; each needs its "
                "own bit-widths (they name its parameters and metrics)"
            )
        result.append(pair)
    return tuple(result)


def _distill(config: Any, model: ModelSpec) -> DistillSpec:
    enabled = check_type(config, "distill.enabled", "bool")
    teacher = check_choice(config, "distill.teacher", ("joint", "frozen"))
    for field in LossWeights.field_names():
        if field != "temperature":
            check_type(config, f"distill.{field}", "number", low=0.0)
    if check_type(config, "distill.temperature", "number") <= 0:
        raise ConfigError(f"distill.temperature={config.distill.temperature} must be > 0")
    teacher_init = check_path(config, "distill.teacher_init")
    if enabled and teacher == "frozen" and not teacher_init:
        raise ConfigError("distill.teacher='frozen' needs distill.teacher_init (a trained teacher)")
    extra = _extra_students(config)
    if extra and not enabled:
        raise ConfigError("distill.extra_students needs distill.enabled=True")
    if enabled and not model.quantized:
        raise ConfigError("distill.enabled needs model.quantized=True (the student is low-bit)")
    weights = LossWeights(**{f: float(config.distill[f]) for f in LossWeights.field_names()})
    return DistillSpec(enabled, teacher, teacher_init, weights, extra)


def _networks(model: ModelSpec, distill: DistillSpec) -> tuple[NetworkSpec, ...]:
    networks = [NetworkSpec("student")]
    if distill.enabled:
        networks += [
            NetworkSpec(f"student_w{w}a{a}", fixed_bits=(w, a)) for w, a in distill.extra_students
        ]
        networks.append(NetworkSpec("teacher", teacher=True, trainable=distill.teacher == "joint"))
    return tuple(networks)


def _check_block_bits(model: ModelSpec, stages: tuple[StageSpec, ...]) -> None:
    """Block names in ``block_bits`` must be blocks of the student."""
    if not any(stage.block_bits for stage in stages):
        return
    # Block names do not depend on the classes or architecture options; building the module
    # only lists its layers (nothing is traced).
    names = get_model(model.name, num_classes=2, quantized=True).layer_names()
    for stage in stages:
        try:
            make_precision(names, stage.w_bits, stage.a_bits, block_bits=stage.block_bits)
        except ValueError as error:
            raise ConfigError(f"{stage.label}.block_bits: {error}") from None


def _check_full_precision_stages(model: ModelSpec, stages: tuple[StageSpec, ...]) -> None:
    """A full-precision model ignores bit-widths: a stage that sets its own low ones would
    silently train something else than it says. (Bits inherited from ``quant.*`` are only
    defaults, so ``--config.model.quantized=False`` alone stays valid.)"""
    if model.quantized:
        return
    for stage in stages:
        own = {"w_bits", "a_bits", "block_bits"} & stage.explicit
        if own and ((stage.w_bits, stage.a_bits) != (32, 32) or stage.block_bits):
            raise ConfigError(
                f"{stage.label} asks for {stage.bits_label}, but model.quantized=False trains "
                "the full-precision network; set the stage's w_bits and a_bits to 32, or "
                "model.quantized=True"
            )


def parse_config(config: Any, *, num_devices: int = 1, num_processes: int = 1) -> RunPlan:
    """Validates a whole config and returns its `RunPlan`.

    Whether the data is present, and stage lengths given in epochs, are checked by the trainer
    once the dataset is known (`RunPlan.steps_per_epoch`, `lbq.stages.lay_out`), still before
    anything is written or compiled.

    Args:
      config: an ml_collections ConfigDict built from `lbq/configs/default.py`.
      num_devices, num_processes: the batch sizes must divide over both.

    Raises:
      ConfigError: naming the first bad field.
    """
    check_known_fields(config)
    seed = check_type(config, "seed", "int", low=0)
    model = _build(ModelSpec, config)
    data = _data(config)
    batch_size, eval_batch_size = _batch_sizes(config, num_devices, num_processes)
    compute_dtype = check_choice(config, "compute_dtype", ("auto", "float32", "bfloat16"))
    optimizer = _build(OptimizerSpec, config)
    stochastic = _stochastic(config, model)
    distill = _distill(config, model)
    networks = _networks(model, distill)
    defaults = _stage_defaults(config, networks)
    try:
        stages = parse_stages(get_field(config, "stages"), defaults)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_full_precision_stages(model, stages)
    _check_block_bits(model, stages)
    _check_lsq_weight_bits(model, stages, distill)
    return _build(
        RunPlan,
        config,
        seed=seed,
        model=model,
        data=data,
        data_on_device=config.data.on_device,
        networks=networks,
        stages=stages,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        compute_dtype=compute_dtype,
        optimizer=optimizer,
        stochastic=stochastic,
        distill=distill,
        # In the order of their checks, before the remaining fields of RunPlan.
        calibration=_build(CalibrationSpec, config),
        init_from=check_path(config, "init_from"),
        checkpoint=_build(CheckpointPolicy, config),
        record=json.loads(config.to_json_best_effort()),
    )


def shadowed_overrides(plan: RunPlan, overridden: list[str]) -> list[str]:
    """Command-line overrides that cannot take effect, each with the fields that win.

    ``quant.w_bits`` and the ``schedule.*`` rates are defaults of the stages: a stage that sets
    its own value hides them.
    """
    messages = []
    for field in overridden:
        section, _, name = field.partition(".")
        if section not in ("quant", "schedule") or name not in STAGE_FIELDS:
            continue
        owners = [s for s in plan.stages if name in s.explicit]
        if owners and len(owners) == len(plan.stages):
            where = ", ".join(f"{s.label}.{name}" for s in owners)
            messages.append(
                f"--config.{field} has no effect: every stage sets its own {name} ({where}); "
                f"override those instead, e.g. --config.stages[0].{name}=..."
            )
    return messages
