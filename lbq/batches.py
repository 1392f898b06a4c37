"""Batches in: the global, sharded batches the trainer's compiled steps take, and one
evaluation pass over the eval split.

Each process reads its own share (`lbq.data.train_iterator` / `eval_iterator`) and
``jax.make_array_from_process_local_data`` assembles the global array on the trainer's batch
sharding; with ``data_on_device`` the training split lives in device memory instead and the
batches are sampled there (`lbq.data.device_train_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp

from lbq import data as lbq_data
from lbq.build import Trainer

__all__ = ["evaluate", "train_batches"]


def _global(trainer: Trainer, local: dict) -> dict:
    """A process's share of a batch as global arrays on the trainer's batch sharding."""
    return {
        k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
        for k, v in local.items()
    }


def _device_batches(trainer: Trainer, start_step: int) -> Iterator[dict]:
    """Training batches sampled on the device from the whole split held in device memory."""
    plan, info = trainer.plan, trainer.info
    images, labels = lbq_data.load_split_arrays(plan.data, plan.data.train_split)
    images, labels = jax.device_put((images, labels), trainer.replicated)
    key = jax.random.key(plan.seed)
    sample = jax.jit(
        lambda images, labels, step: lbq_data.device_train_batch(
            images,
            labels,
            key,
            step,
            global_batch=plan.batch_size,
            num_train=info.num_train,
            pad=4 if plan.data.augment == "cifar" else 0,
            flip=plan.data.augment != "none",
        ),
        out_shardings=trainer.batch_sharding,
    )
    step = start_step
    while True:
        image, label = sample(images, labels, jnp.int32(step))
        yield {"image": image, "label": label}
        step += 1


def train_batches(trainer: Trainer, start_step: int, on_device: bool) -> Iterator[dict]:
    """Global training batches ``{'image': (B, H, W, C) float32, 'label': (B,) int32}`` from
    step ``start_step`` on: the same batches at a given step whether or not the run resumed."""
    if on_device:
        yield from _device_batches(trainer, start_step)
        return
    plan = trainer.plan
    for local in lbq_data.train_iterator(
        plan.data,
        seed=plan.seed,
        global_batch=plan.batch_size,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        yield _global(trainer, local)


def evaluate(trainer: Trainer, state, bits) -> dict[str, dict[str, float]]:
    """Top-1, top-5 (fractions) and mean cross-entropy loss of every network on the eval split.

    Args:
      trainer: the built trainer (its ``eval_step`` sums the metrics over a batch).
      state: the train state to evaluate.
      bits: the per-network bit-widths (`Trainer.stage_bits`); students run fully quantized.

    Returns:
      ``{network: {'top1', 'top5', 'loss'}}`` as Python floats, averaged over every image of
      the split (padding excluded).
    """
    totals = None
    for local in lbq_data.eval_iterator(
        trainer.plan.data,
        global_batch=trainer.plan.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        sums = trainer.eval_step(state, _global(trainer, local), bits)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    result: dict[str, dict[str, float]] = {}
    for key, value in totals.items():
        net, metric = key.split("/")
        result.setdefault(net, {})[metric] = float(value) / count
    return result
