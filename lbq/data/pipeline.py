"""Host input pipelines: deterministic, resumable, host-sharded train batches and padded eval.

Every batch is a pure function of (seed, step): the order comes from (seed, epoch), the
augmentation from (seed, step, row of the global batch). Batches are built on a small thread pool
and handed out in step order, with a few batches prefetched.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lbq.data import transforms
from lbq.data.config import MIN_CLASSES, DatasetInfo, Settings, read_settings, steps_per_epoch
from lbq.data.errors import DataError
from lbq.data.sources import ArraySource, Dataset, Source, open_dataset
from lbq.data.stats import floor_std

CIFAR_PAD = 4
# Train splits decoded once into memory when cache is unset: small images of one size only.
AUTO_CACHE_MAX_SIDE = 64
AUTO_CACHE_MAX_BYTES = 4 << 30

# Distinct first words keep the random streams for order and augmentation independent.
_ORDER_STREAM = 0
_CIFAR_STREAM = 1
_CROP_STREAM = 2


def _ordered_map(
    fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int, prefetch: int
) -> Iterator[Any]:
    """``map(fn, items)`` on ``num_workers`` threads (0: the caller's), in input order, with at
    most ``prefetch`` items in flight; ``items`` may be infinite. Closing it cancels the rest."""
    if num_workers == 0:
        yield from map(fn, items)
        return
    pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="lbq-data")
    it = iter(items)
    try:
        pending = collections.deque(
            pool.submit(fn, x) for x in itertools.islice(it, max(prefetch, 1))
        )
        while pending:
            result = pending.popleft().result()
            # Refill before yielding so the workers stay busy while the consumer runs.
            pending.extend(pool.submit(fn, x) for x in itertools.islice(it, 1))
            yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _resolve(data_config: Any) -> tuple[Settings, Dataset]:
    settings = read_settings(data_config)
    return settings, open_dataset(settings)


def get_info(data_config: Any) -> DatasetInfo:
    """Describes the dataset a data config selects.

    Args:
      data_config: ConfigDict (or attribute object / dict) with name, data_dir, train_split,
        eval_split, image_size, augment.

    Returns:
      ``DatasetInfo``; image_shape is (image_size, image_size, 3) since every path outputs RGB.
      Its std is floored at ``STD_FLOOR`` whatever its source, with a warning naming the channel.

    Raises:
      DataError: for a bad config, a dataset that cannot be found or read, fewer than
        ``MIN_CLASSES`` classes, or an eval split without images (every stage of a run ends with
        an evaluation on it); raised before any image is decoded.
    """
    s, ds = _resolve(data_config)
    if ds.num_classes < MIN_CLASSES:
        raise DataError(
            f"dataset {s.name!r}{f' in {s.data_dir}' if s.data_dir else ''} has "
            f"{ds.num_classes} class{'' if ds.num_classes == 1 else 'es'}; a classifier needs "
            f"at least {MIN_CLASSES} (check data.name, or the class folders it was prepared from)"
        )
    num_eval = ds.num_examples(s.eval_split)
    if num_eval == 0:
        raise DataError(
            f"eval split {s.eval_split!r} of dataset {s.name!r} holds no images (it has "
            f"{ds.num_examples(s.train_split)} train images in {s.train_split!r}); set "
            "data.eval_split to a split with images"
        )
    mean, std = (s.mean, s.std) if s.mean is not None else ds.stats(s.train_split)
    return DatasetInfo(
        name=s.name,
        num_classes=ds.num_classes,
        image_shape=(s.image_size, s.image_size, 3),
        num_train=ds.num_examples(s.train_split),
        num_eval=num_eval,
        mean=tuple(float(v) for v in mean),
        std=floor_std(std, f"dataset {s.name!r}"),
    )


def _per_host(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch <= 0:
        raise DataError(f"global_batch must be positive, got {global_batch}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(f"bad process_index={process_index} for process_count={process_count}")
    if global_batch % process_count:
        raise DataError(
            f"global_batch={global_batch} is not divisible by process_count={process_count}"
        )
    return global_batch // process_count


def _describe(source: Source, index: int | np.integer) -> str:
    return f"record {index} of {source.description}"


def _eval_images(
    source: Source, items: Sequence[Any], indices: np.ndarray, s: Settings
) -> np.ndarray:
    size, imagenet_style = s.image_size, s.augment == "imagenet"
    if isinstance(items, np.ndarray) and not imagenet_style and items.shape[1:3] == (size, size):
        return items  # decoded in-memory batch already at the model's size
    return np.stack(
        [
            transforms.eval_transform(item, size, imagenet_style, _describe(source, i))
            for item, i in zip(items, indices, strict=True)
        ]
    )


# Decoded train splits kept by _maybe_cached, most recent last (bounded: they can be large).
_DECODED: collections.OrderedDict = collections.OrderedDict()
_DECODED_KEEP = 2


def _maybe_cached(source: Source, ds: Dataset, s: Settings) -> Source:
    """Decodes a small-image split once and serves it from memory (see ``Settings.cache``).

    Decoding tiny JPEGs is bound by Python overhead under the GIL (~10k images/s however many
    threads), while crop+flip of decoded arrays runs several times faster. Batches are
    identical either way: the cache holds exactly what each batch would have decoded.
    """
    if s.cache is False or s.augment == "imagenet" or isinstance(source, ArraySource):
        return source
    shape = ds.native_shape()
    too_big = len(source) * s.image_size**2 * 3 > AUTO_CACHE_MAX_BYTES
    if s.cache is None and (shape is None or max(shape[:2]) > AUTO_CACHE_MAX_SIDE or too_big):
        return source
    key = (ds.cache_key(), source.description, s.image_size)
    if key not in _DECODED:
        images, labels = _decode_all(source, s)
        images.setflags(write=False)
        _DECODED[key] = ArraySource(source.description, images, labels)
        while len(_DECODED) > _DECODED_KEEP:
            _DECODED.popitem(last=False)
    _DECODED.move_to_end(key)
    return _DECODED[key]


def train_iterator(
    data_config: Any,
    *,
    seed: int,
    global_batch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite, deterministic, resumable training batches for this host.

    Epoch e visits the train split in the order of a permutation drawn from (seed, e); global
    step s takes rows [b*global_batch, (b+1)*global_batch) of it, b = s % steps_per_epoch, with
    steps_per_epoch = num_train // global_batch (the remainder of each epoch is dropped). Host p
    gets rows [p*B, (p+1)*B) of the global batch, B = global_batch // process_count.

    Args:
      data_config: data config (see ``get_info``); also reads num_workers and prefetch.
      seed: seed of the order and of the augmentation.
      global_batch: batch size summed over hosts.
      start_step: first global step to produce (resume point).
      process_index: this host's index.
      process_count: number of hosts.

    Returns:
      Iterator of {'image': uint8 [B, H, W, 3], 'label': int32 [B]}.
    """
    s, ds = _resolve(data_config)
    per_host = _per_host(global_batch, process_index, process_count)
    source = _maybe_cached(ds.source(s.train_split), ds, s)
    num_train = len(source)
    try:
        epoch_steps = steps_per_epoch(num_train, global_batch)
    except ValueError as error:
        raise DataError(f"{error} ({source.description})") from None
    if start_step < 0:
        raise DataError(f"start_step must be >= 0, got {start_step}")
    seed = int(seed) % 2**63  # SeedSequence takes non-negative entropy only
    row0 = process_index * per_host
    host_rows = np.arange(row0, row0 + per_host)

    @functools.lru_cache(maxsize=2)  # the epochs of the batches in flight
    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(num_train)

    def make_batch(step: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(step, epoch_steps)
        start = b * global_batch + row0
        indices = order(epoch)[start : start + per_host]
        items, labels = source.read(indices)
        if s.augment == "imagenet":
            rngs = (np.random.default_rng([seed, _CROP_STREAM, step, int(r)]) for r in host_rows)
            images = np.stack(
                [
                    transforms.random_resized_crop(x, s.image_size, rng, what=_describe(source, i))
                    for x, i, rng in zip(items, indices, rngs, strict=True)
                ]
            )
        else:
            images = _eval_images(source, items, indices, s)
            if s.augment == "cifar":
                # Drawn for the whole global batch so a row's crop does not depend on the host.
                rng = np.random.default_rng([seed, _CIFAR_STREAM, step])
                offsets, flips = transforms.cifar_params(rng, global_batch, CIFAR_PAD)
                images = transforms.pad_crop_flip(
                    images, offsets[host_rows], flips[host_rows], CIFAR_PAD
                )
        return {"image": np.ascontiguousarray(images), "label": labels}

    return _ordered_map(make_batch, itertools.count(start_step), s.num_workers, s.prefetch)


def eval_iterator(
    data_config: Any,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split, padded so that every host yields the same batches.

    Global batch b covers eval examples [b*global_batch, (b+1)*global_batch); host p gets rows
    [p*B, (p+1)*B) of it. Rows past the end are zero images with label 0 and mask False.

    Args:
      data_config: data config (see ``get_info``).
      global_batch: batch size summed over hosts.
      process_index: this host's index.
      process_count: number of hosts.

    Returns:
      Iterator of {'image': uint8 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}.
    """
    s, ds = _resolve(data_config)
    per_host = _per_host(global_batch, process_index, process_count)
    source = ds.source(s.eval_split)
    num_eval = len(source)
    num_batches = math.ceil(num_eval / global_batch)

    def make_batch(b: int) -> dict[str, np.ndarray]:
        positions = b * global_batch + process_index * per_host + np.arange(per_host)
        mask = positions < num_eval
        image = np.zeros((per_host, s.image_size, s.image_size, 3), np.uint8)
        label = np.zeros((per_host,), np.int32)
        indices = positions[mask]
        if len(indices):
            items, labels = source.read(indices)
            image[mask] = _eval_images(source, items, indices, s)
            label[mask] = labels
        return {"image": image, "label": label, "mask": mask}

    return _ordered_map(make_batch, range(num_batches), s.num_workers, s.prefetch)


def _decode_all(source: Source, s: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a source through the eval transform, decoded on the thread pool."""
    n, chunk = len(source), 1024
    images = np.zeros((n, s.image_size, s.image_size, 3), np.uint8)
    labels = np.zeros((n,), np.int32)

    def load(start: int) -> None:  # each chunk fills its own rows
        indices = np.arange(start, min(start + chunk, n))
        items, chunk_labels = source.read(indices)
        labels[indices] = chunk_labels
        images[indices] = _eval_images(source, items, indices, s)

    collections.deque(_ordered_map(load, range(0, n, chunk), s.num_workers, s.prefetch), maxlen=0)
    return images, labels


def load_split_arrays(data_config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split, preprocessed without augmentation, for the on-device input mode.

    Args:
      data_config: data config (see ``get_info``).
      split: split name, e.g. data_config.train_split.

    Returns:
      (uint8 [N, image_size, image_size, 3], int32 [N]).
    """
    s, ds = _resolve(data_config)
    return _decode_all(ds.source(split), s)
