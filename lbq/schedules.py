"""Stages of progressive quantization (SPEC section 2) and learning-rate schedules.

A run is a sequence of stages on one global step counter. Each stage has its own bit-widths,
length and learning-rate schedule; the trainer resets the optimizer state when a stage starts.
Learning rates are computed on the host and fed to the compiled step as data, so a new stage
never recompiles the step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lbq.quant.quantizers import check_bits

LR_SCHEDULES = ("step", "cosine", "constant")


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


def _field(stage: Any, name: str, default: Any) -> Any:
    value = stage.get(name) if hasattr(stage, "get") else getattr(stage, name, None)
    return default if value is None else value


def _stage_length(stage: Any, label: str, steps_per_epoch: int) -> int:
    steps, epochs = _field(stage, "steps", None), _field(stage, "epochs", None)
    if (steps is None) == (epochs is None):
        raise ValueError(f"{label}: set exactly one of 'steps' and 'epochs'")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"{label}.steps={steps!r} must be a positive whole number")
        return steps
    if not isinstance(epochs, (int, float)) or isinstance(epochs, bool) or epochs <= 0:
        raise ValueError(f"{label}.epochs={epochs!r} must be a positive number")
    length = round(epochs * steps_per_epoch)
    if length <= 0:
        raise ValueError(f"{label}.epochs={epochs} is less than one step ({steps_per_epoch}/epoch)")
    return length


def build_stages(
    stages: Sequence[Any],
    *,
    defaults: Mapping[str, Any],
    networks: Sequence[str],
    steps_per_epoch: int,
) -> list[Stage]:
    """Validates the configured stages and lays them on the global step counter.

    Args:
      stages: the config's stage entries (ConfigDicts or mappings). Unset fields take
        ``defaults``: w_bits, a_bits, lr ({network: base rate}), lr_schedule,
        lr_boundaries, lr_decay, warmup_epochs.
      defaults: see above.
      networks: the trainable networks, which each need a learning rate.
      steps_per_epoch: to turn epochs into steps.

    Raises:
      ValueError: naming the stage and the field, for an empty list, a zero-length stage,
        bit-widths out of range or an unknown schedule.
    """
    if not stages:
        raise ValueError("stages is empty: a run needs at least one stage")
    result, start = [], 0
    for index, entry in enumerate(stages):
        name = _field(entry, "name", f"stage{index}")
        label = f"stages[{index}] ({name})"
        w_bits = check_bits(_field(entry, "w_bits", defaults["w_bits"]), f"{label}.w_bits")
        a_bits = check_bits(_field(entry, "a_bits", defaults["a_bits"]), f"{label}.a_bits")
        block_bits = {
            block: (
                check_bits(bits[0], f"{label}.block_bits[{block!r}]"),
                check_bits(bits[1], f"{label}.block_bits[{block!r}]"),
            )
            for block, bits in dict(_field(entry, "block_bits", {})).items()
        }
        schedule = _field(entry, "lr_schedule", defaults["lr_schedule"])
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"{label}.lr_schedule={schedule!r} is not one of {LR_SCHEDULES}")
        boundaries = tuple(_field(entry, "lr_boundaries", defaults["lr_boundaries"]))
        if any(not 0 < b < 1 for b in boundaries):
            raise ValueError(f"{label}.lr_boundaries={boundaries} must be fractions in (0, 1)")
        lr = {
            net: float(
                _field(entry, f"{net}_lr" if net != "student" else "lr", defaults["lr"][net])
            )
            for net in networks
        }
        for net, value in lr.items():
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{label}: learning rate of {net} is {value}, not >= 0")
        num_steps = _stage_length(entry, label, steps_per_epoch)
        warmup = round(
            float(_field(entry, "warmup_epochs", defaults["warmup_epochs"])) * steps_per_epoch
        )
        result.append(
            Stage(
                index,
                name,
                w_bits,
                a_bits,
                block_bits,
                start,
                num_steps,
                lr,
                schedule,
                boundaries,
                float(_field(entry, "lr_decay", defaults["lr_decay"])),
                warmup,
            )
        )
        start += num_steps
    names = [s.name for s in result]
    if len(set(names)) != len(names):
        raise ValueError(f"stages have repeated names {names}; names label metrics and checkpoints")
    return result


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage that global ``step`` belongs to (the last one once the run is over)."""
    for stage in stages:
        if step < stage.end_step:
            return stage
    return stages[-1]
