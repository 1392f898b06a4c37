"""The integer reference forward: a `Program` run in NumPy, quantized layers in integers.

Every quantized conv and dense layer multiplies integer activation codes (uint k-bit values,
held as int32) by integer weights (``int_step * code + int_offset``) with int32 accumulation,
then rescales once, to float32, by ``activation step * weight scale``. Everything the paper
keeps in full precision (stem conv, BatchNorm, residual adds, pooling of the last features,
classifier) runs in float32, as in lbq's forward on CPU.

Where it is exact: the codes are exact integers, and the int32 sums are exact (the program
builder rejects any layer whose worst-case sum could exceed int32). lbq's fake-quantized forward
computes the same sums in float32 on values like 1/3 that float32 cannot hold, so it differs from
this forward by float32 rounding (about 1e-7 relative per layer). The two agree on a code unless a
pre-activation lies within that rounding of a quantizer's decision boundary; such rare flips are
what the agreement checks in `lbq.deploy.verify` measure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lbq.deploy.errors import DeployError
from lbq.deploy.program import Program
from lbq.deploy.quantizers import activation_codes

F32 = np.float32


@dataclasses.dataclass(frozen=True)
class Codes:
    """A quantized activation: int32 codes (NHWC or [N, F]) and the value of one code step."""

    codes: np.ndarray
    step: float


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]):
    """``lbq.steps.normalize`` in NumPy: float32 ``(pixels - mean) / std``, correctly rounded.

    (XLA's float32 division on CPU is not correctly rounded: it is off by up to one ulp, so
    the comparisons in `lbq.deploy.verify` feed this same array to both forwards.)
    """
    return (np.asarray(images).astype(F32) - np.asarray(mean, F32)) / np.asarray(std, F32)


def _patches(x: np.ndarray, kernel: Sequence[int], strides, padding):
    """im2col: [N, H, W, C] -> ([N * Ho * Wo, kh * kw * C] in the HWIO kernel's order,
    (N, Ho, Wo)); zero padding."""
    kh, kw = kernel
    x = np.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, :: strides[0], :: strides[1]]
    n, ho, wo = windows.shape[:3]
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, -1), (n, ho, wo)


def _conv(x: np.ndarray, kernel: np.ndarray, strides, padding) -> np.ndarray:
    """Convolution of NHWC ``x`` with an HWIO kernel, in the dtype of ``x`` and ``kernel``."""
    cols, (n, ho, wo) = _patches(x, kernel.shape[:2], strides, padding)
    out = cols @ kernel.reshape(-1, kernel.shape[-1])
    return out.reshape(n, ho, wo, kernel.shape[-1])


class IntegerForward:
    """Runs a `Program`; construct once, call on batches.

    Args:
      program: the network (weights as unpacked codes).
      mean, std: per-channel input normalisation, 0..255 units.
      float_dtype: dtype of the full-precision parts: float32 (as lbq computes on CPU, the
        default) or float64 (then the whole forward is exact to about 1e-15, which is how
        the tests show that it computes the same function as lbq's model).
    """

    def __init__(
        self,
        program: Program,
        mean: Sequence[float],
        std: Sequence[float],
        float_dtype: type = np.float32,
    ):
        self.program = program
        self.mean = np.asarray(mean, F32)
        self.std = np.asarray(std, F32)
        self.dtype = np.dtype(float_dtype)
        # Integer weights, computed once: int_step * code + int_offset, int32.
        self.integer_weights = {
            op["name"]: (
                op["int_step"] * program.arrays[f"{op['name']}/codes"].astype(np.int32)
                + op["int_offset"]
            )
            for op in program.ops
            if op["op"] in ("qconv", "qdense")
        }

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Logits of a batch of images.

        Args:
          images: [N, H, W, 3] pixels, 0..255 (uint8 or float), eval-preprocessed.
          batch_size: images per pass (bounds memory).

        Returns:
          logits [N, num_classes] in the float dtype.

        Raises:
          DeployError: for images of the wrong rank or channel count.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DeployError(f"images must be [N, H, W, 3], got shape {images.shape}")
        chunks = [self._run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, 0), self.dtype)

    def _run(self, images: np.ndarray) -> np.ndarray:
        *_, (_, logits) = self.trace(images)
        return self._float(logits)

    def trace(self, images: np.ndarray) -> Iterator[tuple[dict[str, Any], Any]]:
        """Runs the program on one batch, yielding (operation, its output) in order.

        Outputs are float arrays in the float dtype, or `Codes` for quantized activations.
        """
        tensors = {"image": images}
        for op in self.program.ops:
            inputs = [tensors[name] for name in op["inputs"]]
            tensors[op["name"]] = getattr(self, f"_{op['op']}")(op, *inputs)
            yield op, tensors[op["name"]]

    def values(self, tensor) -> np.ndarray:
        """A traced output as float values (codes times their step)."""
        return self._float(tensor)

    def _float(self, x) -> np.ndarray:
        """A tensor's values in the float dtype (codes times their step)."""
        if isinstance(x, Codes):
            return x.codes.astype(self.dtype) * self.dtype.type(x.step)
        return x

    def _array(self, op, field: str) -> np.ndarray:
        return self.program.arrays[f"{op['name']}/{field}"].astype(self.dtype)

    def _bias(self, op, y: np.ndarray) -> np.ndarray:
        key = f"{op['name']}/bias"
        return y + self._array(op, "bias") if key in self.program.arrays else y

    # -- operations ---------------------------------------------------------------------

    def _normalize(self, op, x):
        # In float32 as lbq.steps.normalize; the network then runs in self.dtype.
        return normalize_images(x, self.mean, self.std).astype(self.dtype)

    def _conv(self, op, x):
        y = _conv(self._float(x), self._array(op, "kernel"), op["strides"], op["padding"])
        return self._bias(op, y)

    def _dense(self, op, x):
        return self._bias(op, self._float(x) @ self._array(op, "kernel"))

    def _rescale(self, op, x: Codes, acc: np.ndarray) -> np.ndarray:
        """The one float rescale of a quantized layer: exact int32 sums to the float dtype."""
        scale = np.float64(x.step) * self.program.arrays[f"{op['name']}/scale"].astype(np.float64)
        return self._bias(op, (acc * scale).astype(self.dtype))

    def _quantized_input(self, op, x) -> Codes:
        if not isinstance(x, Codes):
            raise DeployError(f"{op['name']}: a quantized layer needs a quantized input")
        return x

    def _qconv(self, op, x):
        x = self._quantized_input(op, x)
        weights = self.integer_weights[op["name"]]
        acc = _conv(x.codes, weights, op["strides"], op["padding"])
        if acc.dtype != np.int32:
            raise DeployError(f"{op['name']}: accumulation ran in {acc.dtype}, not int32")
        return self._rescale(op, x, acc)

    def _qdense(self, op, x):
        x = self._quantized_input(op, x)
        acc = x.codes @ self.integer_weights[op["name"]]
        return self._rescale(op, x, acc)

    def _quantize(self, op, x):
        # The codes of lbq's own quantizer, ties included (`activation_codes`); programs
        # written before the quantizer was recorded in the op are DoReFa.
        levels = (1 << op["bits"]) - 1
        quantizer = op.get("quantizer", "dorefa")
        codes = activation_codes(self._float(x), quantizer, op["bits"], op["clip_high"])
        return Codes(codes, float(op["clip_high"]) / levels)

    def _clip(self, op, x):
        t = self.dtype.type
        return np.clip(self._float(x), t(op["low"]), t(op["high"]))

    def _relu(self, op, x):
        return np.maximum(self._float(x), self.dtype.type(0))

    def _add(self, op, x, y):
        return self._float(x) + self._float(y)

    def _batch_norm(self, op, x):
        # flax.linen.BatchNorm in eval mode: (x - mean) * (rsqrt(var + eps) * scale) + bias.
        mul = 1 / np.sqrt(self._array(op, "var") + self.dtype.type(op["epsilon"]))
        mul = mul * self._array(op, "scale")
        return (self._float(x) - self._array(op, "mean")) * mul + self._array(op, "bias")

    def _max_pool(self, op, x):
        is_codes = isinstance(x, Codes)
        data = x.codes if is_codes else x
        fill = np.iinfo(data.dtype).min if is_codes else -np.inf
        pads = ((0, 0), tuple(op["padding"][0]), tuple(op["padding"][1]), (0, 0))
        padded = np.pad(data, pads, constant_values=fill)
        sh, sw = op["strides"]
        windows = sliding_window_view(padded, tuple(op["window"]), axis=(1, 2))[:, ::sh, ::sw]
        pooled = windows.max(axis=(-2, -1))
        return Codes(pooled, x.step) if is_codes else pooled

    def _global_avg_pool(self, op, x):
        return self._float(x).mean(axis=(1, 2), dtype=self.dtype)

    def _flatten(self, op, x):
        if isinstance(x, Codes):
            return Codes(x.codes.reshape(len(x.codes), -1), x.step)
        return x.reshape(len(x), -1)

    def _shortcut_pad(self, op, x):
        """lbq.models.resnet._zero_pad_shortcut: subsample, then zero channels on both sides."""
        data = x.codes if isinstance(x, Codes) else x
        stride = op["stride"]
        data = np.pad(data[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), op["pad_channels"]))
        return Codes(data, x.step) if isinstance(x, Codes) else data

    def _logit_scale(self, op, x):
        return self._float(x) * self._array(op, "scale")
