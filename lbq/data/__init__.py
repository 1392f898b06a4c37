"""Data layer of lbq: datasets, host input pipelines and the on-device input path.

Importing this package is cheap: TFDS, PIL, scikit-learn and JAX are imported when first used.
"""

from __future__ import annotations

from typing import Any

from lbq.data.config import DatasetInfo
from lbq.data.errors import (
    DataError,
    DatasetNotFoundError,
    FolderLayoutError,
    ImageReadError,
    UnknownDatasetError,
)
from lbq.data.folder import PreparedFolder, SkippedFile, prepare_folder
from lbq.data.pipeline import eval_iterator, get_info, load_split_arrays, train_iterator
from lbq.data.stats import STD_FLOOR

_DEVICE_NAMES = ("device_augment", "device_train_batch")

__all__ = [
    "DataError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "FolderLayoutError",
    "ImageReadError",
    "PreparedFolder",
    "STD_FLOOR",
    "SkippedFile",
    "UnknownDatasetError",
    "eval_iterator",
    "get_info",
    "load_split_arrays",
    "prepare_folder",
    "train_iterator",
    *_DEVICE_NAMES,
]


def __getattr__(name: str) -> Any:
    # The device path needs JAX; load it on first use only.
    if name in _DEVICE_NAMES:
        from lbq.data import device

        return getattr(device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
