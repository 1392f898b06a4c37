"""Reading the data config and the dataset description shared by every data path."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from lbq.data.errors import DataError
from lbq.data.stats import STD_FLOOR

AUGMENTATIONS = ("cifar", "imagenet", "none")
DEFAULT_IMAGE_SIZE = 32  # data.image_size when a config does not set it
MIN_CLASSES = 2  # a classifier with one class learns nothing (loss 0, top-1 1.0 by construction)

# Standard published per-channel statistics, in 0..255 units (the usual 0..1 values x 255).
KNOWN_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((125.307, 122.950, 113.865), (62.993, 62.089, 66.705)),
    "cifar100": ((129.304, 124.070, 112.434), (68.170, 65.392, 70.418)),
    "imagenet2012": ((123.675, 116.280, 103.530), (58.395, 57.120, 57.375)),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and trainer need to know about a dataset.

    Attributes:
      name: dataset name as given in the config.
      num_classes: number of label classes.
      image_shape: (H, W, C) of the model input after preprocessing.
      num_train: examples in the train split.
      num_eval: examples in the eval split.
      mean: per-channel mean, 0..255 units.
      std: per-channel standard deviation, 0..255 units, at least ``STD_FLOOR`` (``get_info``
        floors smaller values, see ``lbq.data.stats.floor_std``).

    Raises:
      DataError: at construction, for fewer than ``MIN_CLASSES`` classes, a non-finite mean or
        std, or a std below ``STD_FLOOR``: every input is later divided by it.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.num_classes < MIN_CLASSES:
            raise DataError(
                f"dataset {self.name!r} has {self.num_classes} "
                f"class{'' if self.num_classes == 1 else 'es'}; a classifier needs at least "
                f"{MIN_CLASSES}"
            )
        if len(self.mean) != len(self.std) or not all(
            math.isfinite(v) for v in (*self.mean, *self.std)
        ):
            raise DataError(
                f"dataset {self.name!r}: mean {self.mean} and std {self.std} must be finite "
                f"numbers, one per channel"
            )
        if min(self.std) < STD_FLOOR:
            raise DataError(
                f"dataset {self.name!r}: std {self.std} has a value below {STD_FLOOR} (0..255 "
                f"units); floor it with lbq.data.stats.floor_std"
            )


@dataclasses.dataclass(frozen=True)
class Settings:
    """The fields of a data config that ``lbq.data`` reads, validated (``configs/default.py``
    describes them). Defaults: workers (alias num_workers) min(8, cpu count), prefetch (batches
    in flight) workers + 2; cache None ('auto'): only for images of one size with side <= 64,
    never with augment='imagenet'; mean and std (0..255 units) None: the dataset's own.
    """

    name: str
    data_dir: str | None
    train_split: str
    eval_split: str
    image_size: int
    augment: str
    num_workers: int
    prefetch: int
    cache: bool | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _field(cfg: Any, key: str, default: Any) -> Any:
    """Reads ``key`` from a ConfigDict, a mapping or any attribute object."""
    # ConfigDict raises AttributeError for missing fields, like plain objects.
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def steps_per_epoch(num_train: int, global_batch: int) -> int:
    """Steps in one pass over ``num_train`` examples at ``global_batch``: the remainder of each
    epoch is dropped, so every step sees a full batch. The one definition that the data order,
    the stage lengths and the epoch counts in metrics share.

    Raises:
      ValueError: when the batch is larger than the split.
    """
    steps = num_train // global_batch
    if steps == 0:
        raise ValueError(
            f"batch_size={global_batch} is larger than the {num_train} training images"
        )
    return steps


def default_num_workers() -> int:
    """A small pool: decode threads beyond the core count only add contention."""
    return max(1, min(8, os.cpu_count() or 1))


def read_settings(cfg: Any) -> Settings:
    """Validates a data config.

    Args:
      cfg: ``ml_collections.ConfigDict``, dict or attribute object with the data fields.

    Returns:
      The validated ``Settings``.
    """
    name = _field(cfg, "name", "digits")
    if not isinstance(name, str) or not name:
        raise DataError(f"data.name must be a non-empty string, got {name!r}")
    data_dir = _field(cfg, "data_dir", None)
    image_size = int(_field(cfg, "image_size", DEFAULT_IMAGE_SIZE))
    if image_size <= 0:
        raise DataError(f"data.image_size must be positive, got {image_size}")
    augment = str(_field(cfg, "augment", "none"))
    if augment not in AUGMENTATIONS:
        raise DataError(f"data.augment={augment!r} is not one of {AUGMENTATIONS}")
    # `workers` is the config's field; `num_workers` is accepted as an alias.
    num_workers = int(_field(cfg, "workers", _field(cfg, "num_workers", default_num_workers())))
    if num_workers < 0:
        raise DataError(f"data.workers must be >= 0 (0: no threads), got {num_workers}")
    # Batches in flight: enough to keep every worker busy plus a couple ready to hand out.
    prefetch = int(_field(cfg, "prefetch", max(num_workers, 1) + 2))
    return Settings(
        name=name,
        data_dir=os.fspath(data_dir) if data_dir else None,
        train_split=str(_field(cfg, "train_split", "train")),
        eval_split=str(_field(cfg, "eval_split", "test")),
        image_size=image_size,
        augment=augment,
        num_workers=num_workers,
        prefetch=max(1, prefetch),
        cache=_cache_setting(cfg),
        **_normalization(cfg),
    )


def _normalization(cfg: Any) -> dict[str, tuple[float, ...] | None]:
    """`mean` and `std`: both unset (the dataset's own statistics) or three numbers each, in
    0..255 units."""
    mean, std = _field(cfg, "mean", None), _field(cfg, "std", None)
    if mean is None and std is None:
        return {"mean": None, "std": None}
    values = {}
    for key, value in (("mean", mean), ("std", std)):
        try:
            numbers = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise DataError(
                f"data.{key}={value!r} must be three finite numbers (R, G, B), 0..255 units; "
                "set data.mean and data.std together, or neither"
            )
        values[key] = numbers
    if min(values["std"]) <= 0:
        raise DataError(f"data.std={std!r} must be positive")
    if max(values["mean"]) <= 1 and max(values["std"]) <= 1:
        raise DataError(
            f"data.mean={mean!r} and data.std={std!r} look like 0..1 units; lbq uses 0..255 "
            "(ImageNet's mean 0.485 is 123.675)"
        )
    return values


def _cache_setting(cfg: Any) -> bool | None:
    """`cache`: True/False forces decoding the train split into memory or not; unset: auto."""
    value = _field(cfg, "cache", None)
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        return value
    raise DataError(f"data.cache must be True, False or 'auto', got {value!r}")


def known_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Published mean/std for a TFDS name ('cifar10', 'imagenet2012:5.1.0', ...), else None."""
    base = name.split(":")[0].split("/")[0]
    # ImageNet variants (subsets, v2, real labels) share ImageNet's pixel statistics.
    if base.startswith("imagenet2012") or base in ("imagenet_v2", "imagenet_a", "imagenet_r"):
        base = "imagenet2012"
    return KNOWN_STATS.get(base)
