"""On-device input path: the whole (CIFAR-scale) split lives on the accelerator.

Batch selection and augmentation are pure, jittable JAX, so a training step can pick its own
batch from device-resident arrays with no host round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lbq.data.config import steps_per_epoch


def device_augment(
    images: jax.Array, key: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
    """Per-image random crop with zero padding ``pad`` and random horizontal flip.

    With (offset_key, flip_key) = ``jax.random.split(key)``, image i is cropped at (y, x) =
    ``randint(offset_key, (N, 2), 0, 2 * pad + 1)[i]`` of its padded copy and flipped where
    ``bernoulli(flip_key, 0.5, (N,))[i]``.

    Args:
      images: [N, H, W, C] batch (any dtype).
      key: PRNG key.
      pad: zero padding on each side (0 disables the crop).
      flip: whether to flip with probability 1/2.

    Returns:
      Array with the shape and dtype of ``images``.
    """
    n, h, w, c = images.shape
    k_offset, k_flip = jax.random.split(key)
    if pad:
        offsets = jax.random.randint(k_offset, (n, 2), 0, 2 * pad + 1, dtype=jnp.int32)
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(k_flip, 0.5, (n,))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images


def device_train_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    step: jax.Array | int,
    *,
    global_batch: int,
    num_train: int,
    pad: int = 4,
    flip: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The augmented training batch of ``step``, gathered from device-resident arrays.

    Epoch e = step // steps_per_epoch (steps_per_epoch = num_train // global_batch, remainder
    dropped) uses ``jax.random.permutation(fold_in(order_key, e), num_train)``; the batch is its
    slice at (step % steps_per_epoch) * global_batch, augmented with ``fold_in(aug_key, step)``,
    where (order_key, aug_key) = ``jax.random.split(key)``.

    Args:
      images: [num_train, H, W, C] whole train split.
      labels: [num_train] labels.
      key: PRNG key of the run (same key + step -> same batch).
      step: global step, Python int or traced int scalar.
      global_batch: batch size (static).
      num_train: number of training examples (static).
      pad: crop padding, 0 for no crop (``augment='none'``).
      flip: random horizontal flips.

    Returns:
      (images [global_batch, H, W, C], labels [global_batch]).
    """
    epoch_steps = steps_per_epoch(num_train, global_batch)
    # Separate keys so the order of epoch e and the augmentation of step e never coincide.
    order_key, aug_key = jax.random.split(key)
    step = jnp.asarray(step, jnp.int32)
    perm = jax.random.permutation(jax.random.fold_in(order_key, step // epoch_steps), num_train)
    idx = jax.lax.dynamic_slice_in_dim(perm, (step % epoch_steps) * global_batch, global_batch)
    batch_images = jnp.take(images, idx, axis=0)
    augmented = device_augment(batch_images, jax.random.fold_in(aug_key, step), pad=pad, flip=flip)
    return augmented, jnp.take(labels, idx, axis=0)
