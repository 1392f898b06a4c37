"""Pure train and eval steps: one student alone, or students and a teacher together.

Everything that changes between steps (learning rates, bit-widths, stochastic masks) is an
input array, so one compiled step serves a whole run. Each network's apply is wrapped in
`jax.named_call` so that profiles show what each network costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lbq import losses
from lbq.models import QuantNetwork
from lbq.quant.precision import Precision
from lbq.quant.stochastic import find_masks
from lbq.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class Network:
    """A network of the run and how it trains.

    Attributes:
      name: key of its parameters in the train state ('student', 'teacher', ...).
      model: the Flax module.
      teacher: True for the full-precision teacher of joint distillation.
      trainable: False for a frozen teacher (eval-mode BatchNorm, no updates).
      unit_of_layer: for stochastic precision, the unit of each quantized layer (the mask
        is per unit); None when the network always runs fully quantized.
      fixed_bits: (w_bits, a_bits) of an extra student, which ignores the stages' bits.
    """

    name: str
    model: QuantNetwork
    teacher: bool = False
    trainable: bool = True
    unit_of_layer: np.ndarray | None = dataclasses.field(default=None, compare=False)
    fixed_bits: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Joint-distillation weights (SPEC section 4 defaults)."""

    student_ce: float = 0.7
    student_kl: float = 0.7
    student_att: float = 0.0
    teacher_ce: float = 1.0
    teacher_kl: float = 0.5
    teacher_att: float = 0.0
    temperature: float = 1.0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the weights, as the config's ``distill`` section spells them."""
        return tuple(f.name for f in dataclasses.fields(cls))


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 (or float 0..255) images to normalised float32, on the device."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def _precision(net: Network, bits: Mapping[str, Any], masks: Mapping[str, jax.Array]):
    if not net.model.quantized:
        return None
    w_bits, a_bits = bits[net.name]
    if net.name in masks:
        quantize = masks[net.name][jnp.asarray(net.unit_of_layer)]
    else:
        quantize = jnp.ones_like(w_bits)
    return Precision(w_bits, a_bits, quantize)


def _forward(net: Network, params, batch_stats, images, precision, train: bool):
    def apply(params, batch_stats, images, precision):
        variables = {"params": params, "batch_stats": batch_stats}
        if train and net.trainable:
            (logits, features), new = net.model.apply(
                variables, images, precision, train=True, mutable=["batch_stats"]
            )
            return logits, features, new["batch_stats"]
        logits, features = net.model.apply(variables, images, precision, train=False)
        return logits, features, batch_stats

    return jax.named_call(apply, name=net.name)(params, batch_stats, images, precision)


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def _tree_all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def current_masks(networks: tuple[Network, ...], opt_state) -> dict[str, jax.Array]:
    """{network name: current per-unit quantize mask} for networks with stochastic precision."""
    masks = {}
    for net in networks:
        if net.unit_of_layer is not None and net.trainable:
            found = find_masks(opt_state.inner_states[net.name])
            if found:
                masks[net.name] = found[0]
    return masks


def _network_loss(net, out, labels, teacher, students, weights: LossWeights):
    """(loss, extra terms) of one network: cross-entropy alone, or the joint-distillation loss
    against its peers (the teacher for a student, every student for the teacher)."""
    logits, features, _ = out[net.name]
    if teacher is None:
        return losses.cross_entropy(logits, labels), {}
    peers = [out[teacher.name]] if not net.teacher else [out[s.name] for s in students]
    prefix = "teacher" if net.teacher else "student"
    return losses.joint_loss(
        logits,
        labels,
        [p[0] for p in peers],
        features,
        [p[1] for p in peers],
        ce_weight=getattr(weights, f"{prefix}_ce"),
        kl_weight=getattr(weights, f"{prefix}_kl"),
        attention_weight=getattr(weights, f"{prefix}_att"),
        temperature=weights.temperature,
    )


def make_train_step(
    networks: tuple[Network, ...],
    optimizer: optax.GradientTransformation,
    weights: LossWeights,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    skip_nonfinite: bool = False,
):
    """Builds ``train_step(state, batch, hparams) -> (state, metrics)``.

    Args:
      networks: the students (and the teacher, if any) of the run.
      optimizer: over {name: params} of the trainable networks, without the learning rate
        (it is applied here from ``hparams['lr']``, so that schedules are data).
      weights: joint-distillation loss weights (unused for a single network).
      mean, std: per-channel normalisation, in 0..255 units.
      skip_nonfinite: skip non-finite steps and go on; otherwise the state freezes at the
        first non-finite step, which the trainer reports and stops at.

    The batch is {'image': uint8 [B, H, W, C], 'label': int32 [B]}. ``hparams`` holds
    ``lr`` ({name: scalar}) and ``bits`` ({name: (w_bits [L], a_bits [L])}) per student.
    """
    trainable = tuple(n.name for n in networks if n.trainable)
    teacher = next((n for n in networks if n.teacher), None)
    students = tuple(n for n in networks if not n.teacher)

    def loss_fn(train_params, frozen_params, batch_stats, images, labels, precisions):
        params = {**frozen_params, **train_params}
        out = {}
        for net in networks:
            out[net.name] = _forward(
                net, params[net.name], batch_stats[net.name], images, precisions[net.name], True
            )
        metrics, total = {}, jnp.float32(0.0)
        for net in networks:
            logits = out[net.name][0]
            loss, terms = _network_loss(net, out, labels, teacher, students, weights)
            if net.trainable:
                total = total + loss
            metrics[f"{net.name}/loss"] = loss
            metrics[f"{net.name}/accuracy"] = _accuracy(logits, labels)
            metrics.update({f"{net.name}/{k}": v for k, v in terms.items()})
        new_stats = {name: o[2] for name, o in out.items()}
        return total, (metrics, new_stats)

    def train_step(state: TrainState, batch, hparams):
        images = normalize(batch["image"], mean, std)
        masks = current_masks(networks, state.opt_state)
        precisions = {n.name: _precision(n, hparams["bits"], masks) for n in networks}
        train_params = {k: state.params[k] for k in trainable}
        frozen_params = {k: v for k, v in state.params.items() if k not in trainable}
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, new_stats)), grads = grad_fn(
            train_params, frozen_params, state.batch_stats, images, batch["label"], precisions
        )
        updates, new_opt_state = optimizer.update(grads, state.opt_state, train_params)
        updates = {
            k: jax.tree.map(lambda u, k=k: -hparams["lr"][k] * u, v) for k, v in updates.items()
        }
        new_params = {**state.params, **optax.apply_updates(train_params, updates)}

        finite = jnp.isfinite(loss) & _tree_all_finite(grads)
        first = jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite)
        apply = finite if skip_nonfinite else finite & (first < 0)
        candidate = TrainState(state.step + 1, new_params, new_stats, new_opt_state, first)
        held = state.replace(step=state.step + 1, first_nonfinite=first)
        new_state = jax.tree.map(lambda a, b: jnp.where(apply, a, b), candidate, held)

        metrics["loss"] = loss
        metrics["finite"] = finite.astype(jnp.float32)
        for name, mask in masks.items():
            metrics[f"{name}/quantized_fraction"] = jnp.mean(mask)
        for name, lr in hparams["lr"].items():
            metrics[f"{name}/lr"] = jnp.asarray(lr, jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(networks: tuple[Network, ...], mean, std):
    """Builds ``eval_step(state, batch, bits) -> sums``; students run fully quantized.

    The batch also has a boolean 'mask' marking real (not padding) rows. Returns, per network,
    the summed loss and top-1 / top-5 hits, and the number of real rows.
    """

    def eval_step(state: TrainState, batch, bits):
        images = normalize(batch["image"], mean, std)
        labels, valid = batch["label"], batch["mask"].astype(jnp.float32)
        sums = {"count": jnp.sum(valid)}
        for net in networks:
            precision = _precision(net, bits, {})
            logits, _, _ = _forward(
                net, state.params[net.name], state.batch_stats[net.name], images, precision, False
            )
            log_probs = jax.nn.log_softmax(logits)
            nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
            top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
            sums[f"{net.name}/loss"] = jnp.sum(nll * valid)
            sums[f"{net.name}/top1"] = jnp.sum((top5[:, 0] == labels) * valid)
            sums[f"{net.name}/top5"] = jnp.sum(jnp.any(top5 == labels[:, None], -1) * valid)
        return sums

    return eval_step
