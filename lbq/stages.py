"""Stages of progressive quantization (SPEC section 2) and learning-rate schedules.

A run is a sequence of stages on one global step counter. Each stage has its own bit-widths,
length and learning-rate schedule, computed on the host and fed to the compiled step as data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lbq.quant.quantizers import check_bits

LR_SCHEDULES = ("step", "cosine", "constant")


def bits_label(w_bits: int, a_bits: int, block_bits: Mapping[str, Any] | None = None) -> str:
    """'w2a2'; with per-block bit-widths, each block's own too: 'w2a2 (stage1_block0 w4a4)'."""
    label = f"w{w_bits}a{a_bits}"
    if block_bits:
        label += " (" + ", ".join(f"{b} w{w}a{a}" for b, (w, a) in block_bits.items()) + ")"
    return label


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a run.

    Attributes:
      index: position in the run.
      name: shown in metrics, checkpoints and the summary.
      w_bits, a_bits: the student's bit-widths.
      block_bits: {block name: (w_bits, a_bits)} overrides.
      start_step: global step at which the stage starts.
      num_steps: the stage's length in steps.
      lr: {network name: base learning rate}.
      lr_schedule: 'step', 'cosine' or 'constant'.
      lr_boundaries: for 'step', fractions of the stage at which the rate is multiplied by
        ``lr_decay``.
      lr_decay: the factor of each 'step' boundary.
      warmup_steps: linear warm-up at the start of the stage.
    """

    index: int
    name: str
    w_bits: int
    a_bits: int
    block_bits: Mapping[str, tuple[int, int]]
    start_step: int
    num_steps: int
    lr: Mapping[str, float]
    lr_schedule: str = "step"
    lr_boundaries: tuple[float, ...] = (0.4, 0.6)
    lr_decay: float = 0.1
    warmup_steps: int = 0

    @property
    def bits_label(self) -> str:
        return bits_label(self.w_bits, self.a_bits, self.block_bits)

    @property
    def end_step(self) -> int:
        return self.start_step + self.num_steps

    def learning_rate(self, step: int, network: str) -> float:
        """The learning rate of ``network`` at global ``step`` (within this stage)."""
        base = self.lr[network]
        t = step - self.start_step
        if self.warmup_steps and t < self.warmup_steps:
            return base * (t + 1) / self.warmup_steps
        fraction = t / max(self.num_steps, 1)
        if self.lr_schedule == "constant":
            return base
        if self.lr_schedule == "cosine":
            return 0.5 * base * (1.0 + math.cos(math.pi * min(fraction, 1.0)))
        passed = sum(fraction >= b for b in self.lr_boundaries)
        return base * self.lr_decay**passed


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One parsed stage entry, before its length is laid on the step counter.

    Exactly one of ``steps`` and ``epochs`` is set (``steps`` wins when a command-line override
    sets it on a stage given in epochs). ``explicit`` names the fields the entry set itself
    rather than taking the run's defaults.
    """

    index: int
    name: str
    w_bits: int
    a_bits: int
    block_bits: Mapping[str, tuple[int, int]]
    steps: int | None
    epochs: float | None
    lr: Mapping[str, float]
    lr_schedule: str
    lr_boundaries: tuple[float, ...]
    lr_decay: float
    warmup_epochs: float
    explicit: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.name})"

    @property
    def bits_label(self) -> str:
        return bits_label(self.w_bits, self.a_bits, self.block_bits)


# The fields of one stage entry (configs/default.py's ``stage``): a StageSpec's own, less its
# place and origin, and teacher_lr (its ``lr`` has one rate per network). Unset ones take the
# run's defaults (quant.*, schedule.*).
STAGE_FIELDS = tuple(
    f.name for f in dataclasses.fields(StageSpec) if f.name not in ("index", "explicit")
) + ("teacher_lr",)


def _entry_dict(entry: Any, index: int) -> dict[str, Any]:
    if hasattr(entry, "to_dict"):
        return entry.to_dict()
    if isinstance(entry, Mapping):
        return dict(entry)
    raise ValueError(
        f"stages[{index}]={entry!r} must be a stage, e.g. lbq.configs.default.stage('main', "
        "steps=1000)"
    )


def _number(value: Any, field: str, *, low: float = 0.0) -> float:
    """A finite number >= ``low`` for a stage field; the error names the field."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < low:
        raise ValueError(f"{field}={value!r} must be a finite number >= {low:g}")
    return float(value)


def _length(entry: Mapping[str, Any], label: str) -> tuple[int | None, float | None]:
    steps, epochs = entry.get("steps"), entry.get("epochs")
    if steps is None and epochs is None:
        raise ValueError(f"{label}: set exactly one of 'steps' and 'epochs'")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"{label}.steps={steps!r} must be a positive whole number")
        return steps, None
    if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or epochs <= 0:
        raise ValueError(f"{label}.epochs={epochs!r} must be a positive number")
    return None, float(epochs)


def _learning_rates(entry, defaults, label) -> dict[str, float]:
    rates = {}
    for net, default in defaults["lr"].items():
        field = "teacher_lr" if net == "teacher" else "lr"
        value = entry.get(field)
        rates[net] = default if value is None else _number(value, f"{label}.{field}")
    return rates


def parse_stage(entry: Any, index: int, defaults: Mapping[str, Any]) -> StageSpec:
    """Validates one stage entry (a ConfigDict or mapping) against the run's defaults.

    Args:
      entry: the fields of `STAGE_FIELDS`; unset (None) ones take ``defaults``.
      index: its position in the run.
      defaults: w_bits, a_bits, lr ({trainable network: base rate}), lr_schedule,
        lr_boundaries, lr_decay, warmup_epochs.

    Raises:
      ValueError: naming the stage and the field.
    """
    fields = _entry_dict(entry, index)
    name = fields.get("name") or f"stage{index}"
    label = f"stages[{index}] ({name})"
    explicit = frozenset(k for k, v in fields.items() if v not in (None, {}))

    def get(key: str) -> Any:
        value = fields.get(key)
        return defaults[key] if value is None else value

    block_bits = {}
    for block, bits in dict(fields.get("block_bits") or {}).items():
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ValueError(f"{label}.block_bits[{block!r}]={bits!r} must be (w_bits, a_bits)")
        block_bits[block] = tuple(check_bits(b, f"{label}.block_bits[{block!r}]") for b in bits)
    schedule = get("lr_schedule")
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"{label}.lr_schedule={schedule!r} is not one of {LR_SCHEDULES}")
    boundaries = get("lr_boundaries")
    if not isinstance(boundaries, (list, tuple)) or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1 for b in boundaries
    ):
        raise ValueError(f"{label}.lr_boundaries={boundaries!r} must be fractions in (0, 1)")
    steps, epochs = _length(fields, label)
    return StageSpec(
        index=index,
        name=name,
        w_bits=check_bits(get("w_bits"), f"{label}.w_bits"),
        a_bits=check_bits(get("a_bits"), f"{label}.a_bits"),
        block_bits=block_bits,
        steps=steps,
        epochs=epochs,
        lr=_learning_rates(fields, defaults, label),
        lr_schedule=schedule,
        lr_boundaries=tuple(boundaries),
        lr_decay=_number(get("lr_decay"), f"{label}.lr_decay"),
        warmup_epochs=_number(get("warmup_epochs"), f"{label}.warmup_epochs"),
        explicit=explicit,
    )


def parse_stages(entries: Any, defaults: Mapping[str, Any]) -> tuple[StageSpec, ...]:
    """Validates the config's stage list (see `parse_stage`).

    Raises:
      ValueError: for a list that is not a non-empty list of stages, a bad field (naming the
        stage and the field) or repeated stage names.
    """
    if not isinstance(entries, (list, tuple)) or not entries:
        given = "one stage" if hasattr(entries, "to_dict") else repr(entries)
        raise ValueError(
            f"stages={given} must be a non-empty list of stages, e.g. "
            "[lbq.configs.default.stage('main', steps=1000)]"
        )
    stages = tuple(parse_stage(entry, i, defaults) for i, entry in enumerate(entries))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages have repeated names {names}; names label metrics and checkpoints")
    return stages


# What a laid-out `Stage` takes from its `StageSpec` unchanged: all but its place and length.
_SHARED_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Stage)
    if f.name not in ("start_step", "num_steps", "warmup_steps")
)


def lay_out(specs: Sequence[StageSpec], steps_per_epoch: int) -> list[Stage]:
    """Lays the stages on the global step counter.

    Raises:
      ValueError: for a stage given in epochs that is shorter than one step.
    """
    result, start = [], 0
    for spec in specs:
        num_steps = spec.steps or round(spec.epochs * steps_per_epoch)  # steps: None or > 0
        if num_steps <= 0:
            raise ValueError(
                f"{spec.label}.epochs={spec.epochs:g} is less than one step "
                f"({steps_per_epoch}/epoch)"
            )
        shared = {f: getattr(spec, f) for f in _SHARED_FIELDS}
        warmup_steps = round(spec.warmup_epochs * steps_per_epoch)
        result.append(
            Stage(**shared, start_step=start, num_steps=num_steps, warmup_steps=warmup_steps)
        )
        start += num_steps
    return result


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that global ``step`` belongs to (the last one once the run is over)."""
    for stage in stages:
        if step < stage.end_step:
            return stage
    return stages[-1]
