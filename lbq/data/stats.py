"""Per-channel pixel statistics (mean, std) in 0..255 units, computed exactly, and their floor.

The model input is ``(x - mean) / std`` per channel. A channel that is constant over a dataset
(an always-zero blue channel, a greyscale set stored as RGB with a tinted channel) has std 0, and
that division would make every input non-finite; a near-zero std turns the last bit of noise into
huge activations. ``floor_std`` raises such a std to ``STD_FLOOR`` and says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from lbq.data.errors import DataError

# The smallest std (0..255 units) lbq divides by: one 8-bit level. A constant channel then enters
# the model as (x - mean) / 1, i.e. exactly 0, and a nearly constant one is amplified at most 1x.
STD_FLOOR = 1.0
CHANNEL_NAMES = ("red", "green", "blue")

log = logging.getLogger(__name__)


class PixelStats:
    """Exact per-channel pixel histograms of uint8 RGB images, giving float64 mean and std.

    Sums are kept as integer histograms ([3, 256] int64 counts), so merging chunks in any order
    gives the same result, and mean and variance are computed with exact rational arithmetic
    (no E[x^2] - E[x]^2 cancellation): the only roundings are the final conversion to float64
    and the square root. A constant channel gets a std of exactly 0.0.
    """

    def __init__(self) -> None:
        self.counts = np.zeros((3, 256), np.int64)

    def add(self, rgb: np.ndarray) -> None:
        """Adds the pixels of a uint8 [..., 3] array."""
        if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
            raise ValueError(
                f"PixelStats.add needs uint8 [..., 3] pixels, got {rgb.dtype} {rgb.shape}"
            )
        pixels = rgb.reshape(-1, 3)
        for c in range(3):
            self.counts[c] += np.bincount(pixels[:, c], minlength=256)

    def merge(self, other: PixelStats) -> None:
        """Adds another accumulator's pixels to this one."""
        self.counts += other.counts

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel in 0..255 units, population std (divides by N).

        Raises:
          DataError: when no pixel was added.
        """
        n = int(self.counts[0].sum())
        if n == 0:
            raise DataError("pixel statistics of an empty set of images are undefined")
        mean, std = [], []
        for counts in self.counts.tolist():  # Python ints: the sums below never overflow
            total = sum(v * k for v, k in enumerate(counts))
            total_sq = sum(v * v * k for v, k in enumerate(counts))
            mean.append(float(Fraction(total, n)))
            std.append(math.sqrt(Fraction(n * total_sq - total * total, n * n)))
        return tuple(mean), tuple(std)


def channel_name(index: int, num_channels: int) -> str:
    return CHANNEL_NAMES[index] if num_channels == 3 else f"channel {index}"


def std_floor_warnings(std: Sequence[float], what: str, floor: float = STD_FLOOR) -> list[str]:
    """One line per channel whose std is below ``floor`` (0..255 units), naming the channel."""
    return [
        f"{what}: the {channel_name(i, len(std))} channel's std is {v:.4g} (0..255 units), "
        f"below the floor {floor:g}; inputs are normalised with std {floor:g} for it, so a "
        f"(nearly) constant channel is not divided by zero"
        for i, v in enumerate(std)
        if v < floor
    ]


def floor_std(std: Sequence[float], what: str, floor: float = STD_FLOOR) -> tuple[float, ...]:
    """``std`` with every value below ``floor`` raised to it; logs one warning per such channel.

    Args:
      std: per-channel std in 0..255 units (from metadata, published constants or sampling).
      what: names the dataset in the messages, e.g. "dataset 'my_images'".
      floor: the smallest std returned (default ``STD_FLOOR``).

    Returns:
      The floored std, float64 values.

    Raises:
      DataError: when a value is not a finite number (NaN, inf): no floor can repair it.
    """
    values = tuple(float(v) for v in std)
    bad = [channel_name(i, len(values)) for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise DataError(f"{what}: the std of the {', '.join(bad)} channel is not finite: {values}")
    for line in std_floor_warnings(values, what, floor):
        log.warning("%s", line)
    return tuple(max(v, floor) for v in values)
