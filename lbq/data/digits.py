"""The embedded 'digits' dataset: scikit-learn's 1797 real 8x8 handwritten digits.

It ships inside scikit-learn, so it works offline and in seconds on a CPU. Images are upscaled
to 32x32 RGB so CIFAR-style configs (image_size=32, augment='cifar') run unchanged.
"""

from __future__ import annotations

import functools

import numpy as np

from lbq.data.errors import DataError

NAME = "digits"
NATIVE_SIZE = 32
NUM_CLASSES = 10
NUM_TEST = 360  # 1437 train / 360 test, stratified.
SPLIT_SEED = 0
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads, upscales and splits the digits once per process; arrays are read-only."""
    try:
        from PIL import Image
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError(f"dataset 'digits' needs scikit-learn and pillow: {e}") from e
    digits = load_digits()
    # Pixel values are 0..16; scale to the usual 0..255 range before resampling.
    small = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack(
        [
            np.asarray(Image.fromarray(im).resize((NATIVE_SIZE, NATIVE_SIZE), Image.BILINEAR))
            for im in small
        ]
    )
    images = np.repeat(big[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int32)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED
    )
    out = {}
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        x, y = images[idx], labels[idx]
        x.setflags(write=False)
        y.setflags(write=False)
        out[split] = (x, y)
    return out


def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (read-only) uint8 [N,32,32,3] images and int32 [N] labels of a split.

    Args:
      split: 'train' or 'test'.

    Returns:
      (images, labels).
    """
    if split not in SPLITS:
        raise DataError(f"dataset 'digits' has no split {split!r}; available: {', '.join(SPLITS)}")
    return _splits()[split]


@functools.lru_cache(maxsize=1)
def stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the train split, 0..255 units.

    Rounded to 3 decimals, like the published constants of ``KNOWN_STATS``: the recorded
    trajectories in tests/golden were trained with these exact values.
    """
    x = split_arrays("train")[0].astype(np.float64)
    mean = x.mean(axis=(0, 1, 2))
    std = x.std(axis=(0, 1, 2))
    return tuple(round(float(m), 3) for m in mean), tuple(round(float(s), 3) for s in std)
