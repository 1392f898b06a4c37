"""Resolving a dataset name to random-access sources: the embedded digits or a TFDS dataset.

TFDS datasets are read through ``builder.as_data_source`` (ArrayRecord random access), which
needs no TensorFlow. Images are fetched as raw encoded bytes (``tfds.decode.SkipDecoding``) and
decoded by ``lbq.data.transforms`` in the worker threads, where large JPEGs are DCT-downscaled
while decoding (PIL ``draft``) and every mode (grey, CMYK, palette, alpha) becomes RGB; TFDS's
NumPy decoder always decodes at full size and leaves CMYK or RGBA files 4-channel.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lbq.data import digits
from lbq.data.config import Settings, known_stats
from lbq.data.errors import DataError, DatasetNotFoundError, UnknownDatasetError
from lbq.data.stats import PixelStats
from lbq.data.transforms import eval_transform
from lbq.validate import did_you_mean

PREPARE_HINT = "python -m lbq.data.prepare --root=ROOT --data_dir=DIR --name=NAME"
STATS_SAMPLE = 512  # images decoded to estimate mean/std when nothing better is known

log = logging.getLogger(__name__)
_STATS_CACHE: dict[tuple, tuple[tuple, tuple]] = {}


class ArraySource:
    """A split held in memory as uint8 [N, H, W, 3] images and int labels."""

    def __init__(self, description: str, images: np.ndarray, labels: np.ndarray):
        self.description = description
        self._images = images
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def read(self, indices: Sequence[int]) -> tuple[Sequence[Any], np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        # One [n, H, W, 3] array (a sequence of images): batch code can skip per-image work.
        return self._images[idx], self._labels[idx].astype(np.int32)


class TfdsSource:
    """A TFDS split read from ArrayRecord files; images stay encoded until a worker decodes them.

    Records are parsed with TFDS's own ``tf.train.Example`` proto class (no TensorFlow), which
    is several times faster than TFDS's generic per-feature decoding; a check on the first
    record falls back to the generic path should the on-disk layout ever differ.
    """

    def __init__(self, builder: Any, split: str, image_key: str, label_key: str):
        import tensorflow_datasets as tfds

        self.description = f"{builder.name}[{split}]"
        self._image_key = image_key
        self._label_key = label_key
        self._records = builder.as_data_source(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        self._pair = self._generic
        # Any surprise in the fast path: keep the generic TFDS decoding.
        with contextlib.suppress(Exception):
            from tensorflow_datasets.proto import tf_example_pb2

            self._example_cls = tf_example_pb2.Example
            raw = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
            if not len(raw) or self._parse(raw[0]) == self._generic(self._records[0]):
                self._records, self._pair = raw, self._parse

    def _parse(self, raw: bytes) -> tuple[bytes, int]:
        feature = self._example_cls.FromString(raw).features.feature
        return (
            feature[self._image_key].bytes_list.value[0],
            int(feature[self._label_key].int64_list.value[0]),
        )

    def _generic(self, record: dict[str, Any]) -> tuple[bytes, int]:
        return record[self._image_key], int(record[self._label_key])

    def __len__(self) -> int:
        return len(self._records)

    def read(self, indices: Sequence[int]) -> tuple[list[Any], np.ndarray]:
        # __getitems__ lets ArrayRecord fetch the records of a batch in parallel.
        pairs = [self._pair(r) for r in self._records.__getitems__([int(i) for i in indices])]
        return [p[0] for p in pairs], np.asarray([p[1] for p in pairs], dtype=np.int32)


# Random access to one split: ``description``, ``len()`` and ``read(indices)`` giving
# (encoded bytes or decoded arrays, int32 labels).
Source = ArraySource | TfdsSource


class DigitsDataset:
    """scikit-learn digits, upscaled to 32x32x3 (see ``lbq.data.digits``)."""

    name = digits.NAME
    num_classes = digits.NUM_CLASSES

    def num_examples(self, split: str) -> int:
        return len(digits.split_arrays(split)[1])

    def source(self, split: str) -> Source:
        images, labels = digits.split_arrays(split)
        return ArraySource(f"digits[{split}]", images, labels)

    def stats(self, train_split: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return digits.stats()


class TfdsDataset:
    """A prepared TFDS image-classification dataset, read at ``image_size`` (imagenet_style:
    shorter-side resize and centre crop, else the whole image resized), as training reads it."""

    def __init__(self, builder: Any, name: str, image_size: int, imagenet_style: bool):
        self.name = name
        self._builder = builder
        self._image_size = image_size
        self._imagenet_style = imagenet_style
        self._image_key, self._label_key = _feature_keys(builder, name)
        self.num_classes = int(builder.info.features[self._label_key].num_classes)

    def _split(self, split: str) -> Any:
        """The split's TFDS ``SplitInfo``; a DataError naming the available splits otherwise."""
        try:
            return self._builder.info.splits[split]
        except (KeyError, ValueError) as e:
            available = ", ".join(sorted(self._builder.info.splits.keys()))
            raise DataError(
                f"dataset {self.name!r} has no split {split!r}; available: {available}"
            ) from e

    def num_examples(self, split: str) -> int:
        return int(self._split(split).num_examples)

    def source(self, split: str) -> Source:
        self._split(split)
        return TfdsSource(self._builder, split, self._image_key, self._label_key)

    def stats(self, train_split: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """mean/std (0..255 units) of the train split's images as training receives them.

        Measured at prepare time (lbq.data.prepare) at this image size and resize beats
        published constants beats sampling ``STATS_SAMPLE`` images at this size; statistics
        that lbq.data.prepare measured at another size are measured again by sampling.
        """
        metadata = self._builder.info.metadata or {}
        if "mean" in metadata and "std" in metadata:
            if self._measured_as_read(metadata):
                return self._metadata_stats(metadata)
            log.info(
                "dataset %r: its stored mean/std were measured on images at another size than "
                "data.image_size=%d%s; measuring them on %d train images at that size",
                self.name,
                self._image_size,
                " (imagenet-style)" if self._imagenet_style else "",
                min(self.num_examples(train_split), STATS_SAMPLE),
            )
            return self._sampled(train_split)
        return known_stats(self.name) or self._sampled(train_split)

    def _sampled(self, train_split: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std of ``STATS_SAMPLE`` evenly spaced train images, each resized as training
        resizes it; cached per dataset folder, split, size and resize."""
        key = (str(self._builder.data_path), train_split, self._image_size, self._imagenet_style)
        if key not in _STATS_CACHE:
            source = self.source(train_split)
            n = len(source)
            idx = np.unique(np.linspace(0, n - 1, num=min(n, STATS_SAMPLE)).astype(np.int64))
            items, _ = source.read(idx)
            pixels = PixelStats()
            for i, item in zip(idx, items, strict=True):
                what = f"record {i} of {source.description}"
                pixels.add(eval_transform(item, self._image_size, self._imagenet_style, what))
            _STATS_CACHE[key] = pixels.mean_std()
        return _STATS_CACHE[key]

    def _measured_as_read(self, metadata: Any) -> bool:
        """Whether stored statistics describe the images at this size and resize. Older
        versions of lbq.data.prepare measured native pixels: the same thing only for images
        of exactly this square size, resized whole. Statistics that another tool stored
        without saying how are taken as given."""
        resize = "imagenet" if self._imagenet_style else "whole"
        if metadata.get("stats_image_size") is not None:
            return (
                int(metadata["stats_image_size"]) == self._image_size
                and metadata.get("stats_resize", "whole") == resize
            )
        if metadata.get("prepared_by") != "lbq.data.prepare":
            return True
        shape = metadata.get("image_shape")
        return resize == "whole" and bool(shape) and list(shape)[:2] == [self._image_size] * 2

    def _metadata_stats(self, metadata: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """mean/std as lbq.data.prepare stores them: 3 numbers each (get_info floors std)."""
        try:
            mean = tuple(float(v) for v in metadata["mean"])
            std = tuple(float(v) for v in metadata["std"])
            if len(mean) == len(std) == 3:
                return mean, std
        except (TypeError, ValueError):
            pass
        raise DataError(
            f"dataset {self.name!r}: mean={metadata['mean']!r} and std={metadata['std']!r} in "
            f"{self._builder.data_path}/metadata.json are not 3 numbers each; prepare it again"
        )

    def native_shape(self) -> tuple[int, ...] | None:
        """(H, W, 3) when every image has one known size, else None."""
        metadata = self._builder.info.metadata or {}
        if metadata.get("image_shape"):  # written by lbq.data.prepare
            return tuple(int(v) for v in metadata["image_shape"])
        shape = self._builder.info.features[self._image_key].shape
        if shape[0] is not None and shape[1] is not None:
            return (int(shape[0]), int(shape[1]), 3)
        return None

    def cache_key(self) -> str:
        """Identifies the dataset's files, for caches of decoded data."""
        return str(self._builder.data_path)


# A resolved dataset; both kinds have name, num_classes, num_examples, source and stats.
Dataset = DigitsDataset | TfdsDataset


def _feature_keys(builder: Any, name: str) -> tuple[str, str]:
    """Finds the (image, label) feature names of an image-classification dataset."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and keys[0] in images and keys[1] in labels:
        return keys
    if not images or not labels:
        raise DataError(
            f"dataset {name!r} is not an image-classification dataset: it needs an Image and a "
            f"ClassLabel feature, found {', '.join(features.keys())}"
        )
    return images[0], "label" if "label" in labels else labels[0]


def _prepared_names(data_dir: str | None) -> list[str]:
    """Dataset names found in a TFDS data dir (folders holding a dataset_info.json)."""
    patterns = ("*/*/dataset_info.json", "*/*/*/dataset_info.json") if data_dir else ()
    paths = [path for pattern in patterns for path in glob.glob(pattern, root_dir=data_dir)]
    return sorted({path.split(os.sep)[0] for path in paths})


def _unknown(name: str, data_dir: str | None, registered: list[str]) -> UnknownDatasetError:
    prepared = _prepared_names(data_dir)
    candidates = [digits.NAME, *prepared, *registered]
    hint = did_you_mean(name, candidates, n=5)
    where = (
        f" (datasets prepared in {data_dir}: {', '.join(prepared) or 'none'})" if data_dir else ""
    )
    return UnknownDatasetError(
        f"unknown dataset {name!r}{hint}{where}; use 'digits', a TFDS name like cifar10, or "
        f"prepare an image folder with `{PREPARE_HINT}`"
    )


def open_dataset(s: Settings) -> Dataset:
    """Resolves ``s.name`` (validated data settings) to a dataset.

    Raises:
      DataError: a subclass of it that names the problem (unknown name, data dir missing,
        dataset not prepared, tensorflow-datasets not installed).
    """
    if s.name == digits.NAME:
        return DigitsDataset()
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"dataset {s.name!r} needs tensorflow-datasets, which is not installed "
            f"(only 'digits' works without it)"
        ) from e
    if s.data_dir and not os.path.isdir(s.data_dir):
        raise DatasetNotFoundError(
            f"data_dir {s.data_dir!r} of dataset {s.name!r} does not exist; set data."
            f"data_dir to the TFDS data dir that holds it, or create it with `{PREPARE_HINT}`"
        )
    try:
        builder = tfds.builder(s.name, data_dir=s.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        registered = tfds.list_builders(with_community_datasets=False)
        raise _unknown(s.name, s.data_dir, registered) from e
    if not builder.is_prepared():
        root = s.data_dir or tfds.core.constants.DATA_DIR
        raise DatasetNotFoundError(
            f"dataset {s.name!r} is not prepared in data dir {root} (no dataset_info.json in "
            f"{builder.data_path}); build it with `tfds build {s.name} --data_dir={root}` or, "
            f"from an image folder, `{PREPARE_HINT}`"
        )
    return TfdsDataset(builder, s.name, s.image_size, s.augment == "imagenet")
