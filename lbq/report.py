"""What a run prints: its header, progress text, evaluation lines and the closing summary.

Labels say what was computed: a full-precision model is 'fp' whatever the stages' bits, a
stage with per-block bits lists them, a stopped run's last evaluation is not called final, and
a distillation run's losses are shown per network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lbq.plan import RunPlan
from lbq.stages import Stage, bits_label

LSQ_WEIGHT_RULE_LABEL = "LSQ weight ranges at a bit-width change"


def network_bits(plan: RunPlan, stage: Stage) -> str:
    """The bit-widths a stage trains the student at: 'w2a2', with per-block ones, or 'fp'."""
    return stage.bits_label if plan.model.quantized else "fp (model.quantized=False)"


def quantizer_names(plan: RunPlan) -> tuple[str, str]:
    """(weight quantizer, activation quantizer) of the student; 'none' for a full-precision one."""
    if not plan.model.quantized:
        return "none", "none"
    return plan.model.weight_quantizer, plan.model.activation_quantizer


def quantizers_text(plan: RunPlan) -> str:
    """The student's quantizers in words, e.g. 'weights lsq (per channel), activations pact'."""
    weights, activations = quantizer_names(plan)
    scale = "per channel" if plan.model.per_channel else "per tensor"
    text = f"weights {weights} ({scale}), activations {activations}"
    if plan.model.quantized and plan.model.activation_placement != "block_output":
        text += f" at {plan.model.activation_placement}"
    if weights == "lsq":
        text += f"; {LSQ_WEIGHT_RULE_LABEL}: {plan.calibration.weight_range_at_bit_change}"
    if activations in ("pact", "lsq"):
        rule = plan.calibration.activation_range_at_bit_change
        text += f"; activation ranges at a bit-width change: {rule}"
    return text


def methods(plan: RunPlan, stages: Sequence[Stage]) -> str:
    """The paper's methods that the run uses, in words."""
    on = []
    if len(stages) > 1:
        on.append("progressive (" + " -> ".join(network_bits(plan, s) for s in stages) + ")")
    if plan.stochastic.enabled:
        s = plan.stochastic
        on.append(
            f"stochastic precision ({s.unit}s, {s.schedule.kind} p from {s.schedule.p_start:g})"
        )
    if plan.distill.enabled:
        extra = ", ".join(f"w{w}a{a}" for w, a in plan.distill.extra_students)
        extra = f", extra students {extra}" if extra else ""
        on.append(f"joint distillation ({plan.distill.teacher} teacher{extra})")
    return "; ".join(on) or "none (direct training)"


def parameter_count(model, image_shape: Sequence[int]) -> int:
    """Parameters of a network, from shapes alone (`jax.eval_shape`: nothing is compiled)."""
    from lbq.quant.precision import make_precision

    precision = make_precision(model.layer_names(), 32, 32) if model.quantized else None
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), precision)
    )
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def run_header(trainer, stages: Sequence[Stage], workdir: str) -> str:
    """The lines printed before anything is compiled: data, model, quantization, methods."""
    plan, info = trainer.plan, trainer.info
    student = trainer.networks[0].model
    size = info.image_shape[0]
    lines = [
        f"lbq run in {workdir}",
        f"  data: {info.name}, {info.num_classes} classes, {info.num_train} train / "
        f"{info.num_eval} eval images ({plan.data.train_split} / {plan.data.eval_split}), "
        f"input {size}x{size}, augment {plan.data.augment}",
        f"  model: {plan.model.name}, {parameter_count(student, info.image_shape):,} parameters,"
        f" compute dtype {jnp.dtype(student.dtype).name}",
    ]
    if plan.model.quantized:
        lines.append(
            f"  quantized: {len(student.layer_names())} convs/dense layers inside the blocks and"
            " their activations; stem, classifier and BatchNorm stay full precision"
        )
        lines.append(f"  quantizers: {quantizers_text(plan)}")
    else:
        lines.append("  quantized: nothing (model.quantized=False, plain ReLU)")
    for stage in stages:
        rates = ", ".join(f"{name} {value:g}" for name, value in stage.lr.items())
        lines.append(
            f"  stage {stage.index + 1} '{stage.name}': {network_bits(plan, stage)}, "
            f"{stage.num_steps} steps, lr {rates}"
        )
    lines.append(f"  methods: {methods(plan, stages)}")
    lines.append(f"  batch {plan.batch_size}, {plan.steps_per_epoch(info.num_train)} steps/epoch")
    return "\n".join(lines)


def progress_text(values: Mapping[str, float]) -> str:
    """Each network's loss and accuracy for the progress bar, labelled by network."""
    names = sorted({k.split("/")[0] for k in values if k.endswith("/loss")})
    text = " ".join(
        f"{name} loss {values[f'{name}/loss']:.3f} acc {values[f'{name}/accuracy']:.3f}"
        for name in names
    )
    return text.removeprefix("student ") if names == ["student"] else text


def eval_text(result: Mapping[str, Mapping[str, float]]) -> str:
    return "  ".join(
        f"{net} top-1 {m['top1']:.4f} top-5 {m['top5']:.4f} loss {m['loss']:.4f}"
        for net, m in result.items()
    )


def stage_result(plan: RunPlan, stage: Stage, evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a finished stage kept in checkpoints and the summary."""
    weights, activations = quantizer_names(plan)
    record = {
        "name": stage.name,
        "w_bits": stage.w_bits,
        "a_bits": stage.a_bits,
        "bits": network_bits(plan, stage),
        "weight_quantizer": weights,
        "activation_quantizer": activations,
        "steps": stage.num_steps,
        "eval": dict(evaluation),
        "eval_split": plan.data.eval_split,
    }
    if weights == "lsq":
        record["weight_range_at_bit_change"] = plan.calibration.weight_range_at_bit_change
    return record


def format_summary(result, workdir: str) -> str:
    """A one-screen summary of a run.

    A stage's evaluation names its split when the stages were evaluated on different splits
    (a run continued with another ``data.eval_split``); steps skipped as non-finite
    (on_nonfinite='skip') are counted per stage.
    """
    lines = [f"lbq run {result.status} at step {result.step}  ({workdir})"]
    splits = {s.get("eval_split") for s in result.stages}
    if result.stages:
        lines.append(f"{'stage':<16}{'bits':>8}{'steps':>8}  eval top-1 per network")
        for s in result.stages:
            accs = "  ".join(f"{n} {m['top1']:.4f}" for n, m in s["eval"].items())
            if len(splits) > 1:
                accs += f"  (on {s.get('eval_split') or 'an unrecorded split'})"
            label = s.get("bits") or bits_label(s["w_bits"], s["a_bits"])
            lines.append(f"{s['name']:<16}{label:>8}{s['steps']:>8}  {accs}")
        last = result.stages[-1]
        if "weight_quantizer" in last:  # results recorded before quantizers were a choice lack it
            rule = last.get("weight_range_at_bit_change")
            lines.append(
                f"quantizers: weights {last['weight_quantizer']}, "
                f"activations {last['activation_quantizer']}"
                + (f"; {LSQ_WEIGHT_RULE_LABEL}: {rule}" if rule else "")
            )
    which = "final" if result.status == "completed" else "last evaluation of"
    for net, m in result.final.items():
        lines.append(
            f"{which} {net}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}"
        )
    skipped = {name: n for name, n in result.skipped_steps.items() if n}
    if skipped:
        lengths = result.stage_lengths
        counts = ", ".join(
            f"{name} {n}" + (f" of {lengths[name]}" if name in lengths else "")
            for name, n in skipped.items()
        )
        lines.append(f"skipped steps (non-finite loss or gradient): {counts}")
    if result.status != "completed":
        lines.append("the run is not finished: rerun the same command to resume it")
    if result.images_per_second:
        lines.append(
            f"training throughput: {result.images_per_second:.0f} images/s (evaluation excluded)"
        )
    return "\n".join(lines)
