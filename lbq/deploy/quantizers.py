"""The integer form of each lbq quantizer: one case per quantizer name.

A quantized kernel becomes k-bit codes c (stored packed) and the integer weights
``q = int_step * c + int_offset`` with ``w_q = scale * q``. A quantized activation becomes
codes ``a = round(clip(x, 0, clip_high) * levels / clip_high)`` with value ``a * clip_high /
levels``. A quantized conv then computes ``sum(a * q)`` exactly in int32 and rescales once by
``scale * clip_high / levels``.

DoReFa (SPEC section 1): ``w_q = 2 Q_k(u) - 1 = (2c - n) / n`` with ``n = 2^k - 1`` and c the
level index of ``Q_k``, so ``int_step = 2``, ``int_offset = -n`` (odd integers in [-n, n]) and
``scale = 1/n``, per tensor even with per-channel maxima (the max only normalizes). Activations
clip to [0, 1]: ``clip_high = 1``.

LSQ weights (SPEC section 7): ``w_q = s round(clip(w / s, -Q_N, Q_P))`` with the step
``s = r / (2^k - 1)`` of the learned ``weight_range`` r (`lbq.quant.layers.lsq_range_quantize`),
so the code is ``c = w_q / s + Q_N`` in [0, 2^k - 1], ``int_step = 1``, ``int_offset = -Q_N``
and ``scale = s`` (per tensor, or [out] per channel). PACT activations clip to the learned
``clip`` alpha: ``clip_high = alpha``. LSQ activations ``s round(clip(x / s, 0, 2^k - 1))`` are
the same grid with ``clip_high = s (2^k - 1)``. Each case reads the learned value exactly as
lbq's forward does (float32, through `learned_range`), so the codes are the forward's.

Adding a quantizer is one more function in each table below.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbq.deploy.errors import DeployError
from lbq.quant.layers import (
    CLIP_PARAM,
    RANGE_PARAM,
    WEIGHT_RANGE_PARAM,
    lsq_level_count,
    lsq_range_quantize,
)
from lbq.quant.quantizers import learned_range, lsq_bounds, quantize_weight

# Largest distance of a recovered code from an integer that still counts as exact. lbq's own
# float32 quantizer output is within a few ulps of the grid, far below this.
_GRID_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class WeightGrid:
    """A quantized kernel in integer form.

    Attributes:
      codes: uint8 level indices in [0, 2^bits - 1], the kernel's shape.
      bits: bit-width k.
      int_step, int_offset: the integer weight of code c is ``int_step * c + int_offset``.
      scale: float64, shape [] (per tensor) or [out] (per output channel): ``w_q = scale * q``.
        float64 so that 1/n is stored as exactly as the rescale can use it.
      values: the float32 ``w_q`` exactly as lbq's fake-quantized forward uses it.
    """

    codes: np.ndarray
    bits: int
    int_step: int
    int_offset: int
    scale: np.ndarray
    values: np.ndarray

    def integers(self) -> np.ndarray:
        """The integer weights ``int_step * codes + int_offset`` as int32."""
        return self.int_step * self.codes.astype(np.int32) + self.int_offset

    def max_abs_integer(self) -> int:
        levels = (1 << self.bits) - 1
        return max(abs(self.int_offset), abs(self.int_step * levels + self.int_offset))


@dataclasses.dataclass(frozen=True)
class ActivationGrid:
    """A quantized activation: ``code = round(clip(x, 0, clip_high) * levels / clip_high)``.

    Attributes:
      bits: bit-width k; levels = 2^k - 1.
      clip_high: upper clip value (1.0 for DoReFa's clip(0, 1)).
    """

    bits: int
    clip_high: float

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        """Value of one code step."""
        return self.clip_high / self.levels


def _codes_from_values(
    values: np.ndarray, inv_scale: float, int_step: int, int_offset: int, what: str
) -> np.ndarray:
    """Level indices c of on-grid values: ``values * inv_scale = int_step * c + int_offset``."""
    exact = (values.astype(np.float64) * inv_scale - int_offset) / int_step
    codes = np.rint(exact)
    if exact.size and np.max(np.abs(exact - codes)) > _GRID_TOLERANCE:
        raise DeployError(f"{what}: quantized weights are not on the expected grid")
    return codes.astype(np.uint8)


@functools.partial(jax.jit, static_argnames="per_channel")
def _dorefa_values(kernel: jax.Array, bits: jax.Array, per_channel: bool) -> jax.Array:
    # The trained quantizer itself, compiled as in the eval step, so that the codes are the
    # ones lbq's forward uses.
    return quantize_weight(kernel, bits, per_channel=per_channel)


def dorefa_weight_grid(
    params: Mapping[str, Any], bits: int, per_channel: bool, what: str
) -> WeightGrid:
    """DoReFa weights (SPEC section 1): codes c with ``w_q = (2c - n) / n``."""
    kernel = jnp.asarray(params["kernel"])  # float32 as trained (float64 in x64 checks)
    values = np.asarray(_dorefa_values(kernel, jnp.float32(bits), per_channel))
    n = (1 << bits) - 1
    codes = _codes_from_values(values, n, 2, -n, what)
    return WeightGrid(codes, bits, 2, -n, np.asarray(1.0 / n, np.float64), values)


def dorefa_activation_grid(
    params: Mapping[str, Any] | None, bits: int, what: str
) -> ActivationGrid:
    """DoReFa activations (SPEC section 1): ``Q_k(clip(a, 0, 1))``."""
    del params, what
    return ActivationGrid(bits, 1.0)


def _learned(params: Mapping[str, Any] | None, field: str, what: str) -> jax.Array:
    """A learned clip or range parameter as float32, or DeployError naming the layer."""
    if params is None or field not in params:
        raise DeployError(f"{what}: the checkpoint has no learned '{field}' parameter")
    return jnp.asarray(params[field], jnp.float32)


def _lsq_step(value_range: jax.Array, bits: int) -> np.ndarray:
    """LSQ's step ``s = learned_range(r / (2^k - 1))`` in float32, as lbq's forward computes it."""
    return np.asarray(learned_range(value_range / lsq_level_count(jnp.float32(bits))))


@functools.partial(jax.jit, static_argnames="num_features")
def _lsq_values(kernel: jax.Array, value_range: jax.Array, bits: jax.Array, num_features: int):
    # The trained quantizer itself, as in the eval step (see _dorefa_values).
    return lsq_range_quantize(kernel, value_range, bits, signed=True, num_features=num_features)


def lsq_weight_grid(
    params: Mapping[str, Any], bits: int, per_channel: bool, what: str
) -> WeightGrid:
    """LSQ weights (SPEC section 7): codes c with ``w_q = s (c - Q_N)``."""
    if bits < 2:
        raise DeployError(f"{what}: LSQ weights need at least 2 bits (got {bits})")
    kernel = jnp.asarray(params["kernel"])
    value_range = _learned(params, WEIGHT_RANGE_PARAM, what)
    shared = kernel.shape[-1] if per_channel else 1
    values = np.asarray(_lsq_values(kernel, value_range, jnp.float32(bits), kernel.size // shared))
    step = _lsq_step(value_range, bits).astype(np.float64)
    q_n = int(lsq_bounds(bits, signed=True)[0])
    codes = _codes_from_values(values, 1.0 / step, 1, -q_n, what)
    return WeightGrid(codes, bits, 1, -q_n, step, values)


def pact_activation_grid(params: Mapping[str, Any] | None, bits: int, what: str) -> ActivationGrid:
    """PACT activations (SPEC section 7): ``Q_k(clip(x, 0, alpha))`` with the learned alpha."""
    clip = np.asarray(learned_range(_learned(params, CLIP_PARAM, what)))
    return ActivationGrid(bits, float(clip))


def lsq_activation_grid(params: Mapping[str, Any] | None, bits: int, what: str) -> ActivationGrid:
    """LSQ activations (SPEC section 7): ``s round(clip(x / s, 0, 2^k - 1))``, the grid of
    ``clip_high = s (2^k - 1)`` (exact in float64: s has 24 significant bits, 2^k - 1 at most 8)."""
    step = float(_lsq_step(_learned(params, RANGE_PARAM, what), bits))
    return ActivationGrid(bits, step * ((1 << bits) - 1))


WeightCase = Callable[[Mapping[str, Any], int, bool, str], WeightGrid]
ActivationCase = Callable[[Mapping[str, Any] | None, int, str], ActivationGrid]

WEIGHT_QUANTIZERS: dict[str, WeightCase] = {"dorefa": dorefa_weight_grid, "lsq": lsq_weight_grid}
ACTIVATION_QUANTIZERS: dict[str, ActivationCase] = {
    "dorefa": dorefa_activation_grid,
    "pact": pact_activation_grid,
    "lsq": lsq_activation_grid,
}


def _case(table: Mapping[str, Any], field: str, name: str):
    if name not in table:
        raise DeployError(
            f"quant.{field}={name!r} cannot be exported yet; export supports {sorted(table)}"
        )
    return table[name]


def weight_case(name: str) -> WeightCase:
    """The integer form of weight quantizer ``name``; DeployError if export lacks it."""
    return _case(WEIGHT_QUANTIZERS, "weight_quantizer", name)


def activation_case(name: str) -> ActivationCase:
    """The integer form of activation quantizer ``name``; DeployError if export lacks it."""
    return _case(ACTIVATION_QUANTIZERS, "activation_quantizer", name)


# ------------------------------------------------------------------ activation codes (NumPy)


def _round_product(z: np.ndarray, levels: int) -> np.ndarray:
    """``round(z * levels)`` of exact arithmetic, ties to even, for ``z`` float32 or float64.

    The NumPy form of `lbq.quant.quantizers._round_product`. A float32 ``z`` times a level
    count of at most 8 bits is exact in float64 (24 + 8 significant bits). A float64 product
    rounds; it matters only where it lands exactly on a half-integer ``h``: then
    ``z * 2^k - h`` is exact (``2^k = levels + 1``) and its comparison with ``z`` says on which
    side of ``h`` the exact product lies.
    """
    if z.dtype != np.float64:
        return np.rint(z.astype(np.float64) * levels)
    product = z * np.float64(levels)
    nearest = np.rint(product)
    half = np.floor(product) + 0.5
    landed_on_half = (product == half) & (np.abs(product) < 2.0**52)
    excess = z * np.float64(levels + 1) - half
    resolved = np.where(excess > z, half + 0.5, np.where(excess < z, half - 0.5, nearest))
    return np.where(landed_on_half, resolved, nearest)


def activation_codes(x: np.ndarray, quantizer: str, bits: int, clip_high: float) -> np.ndarray:
    """The integer codes that lbq's activation quantizer ``quantizer`` gives for ``x``.

    The rounding rule (docs/deploy.md, "Rounding"): a code is the round-half-to-even of the
    pre-rounding value that lbq's quantizer (`lbq.quant.quantizers`) computes:

    - ``dorefa`` (`quantize_activation`): ``x n`` in exact arithmetic, ``n = 2^k - 1``, on
      ``clip(x, 0, 1)``, for every input dtype;
    - ``pact`` (`pact_activation_grid`): ``(clip(x, 0, alpha) * n) / alpha``, each operation
      rounded in ``x``'s dtype (float32, or float64 in the exact checks), ``alpha = clip_high``;
    - ``lsq`` (`lsq_quantize`, unsigned): ``clip(x / s, 0, n)`` with the division rounded in
      ``x``'s dtype, ``s = clip_high / n``.

    bfloat16 and float16 activations are converted exactly to float32 first, as lbq does.

    Args:
      x: pre-activations, any shape, float32 or float64 (float32 holds every bfloat16 value).
      quantizer: 'dorefa', 'pact' or 'lsq'.
      bits: k, 1..8.
      clip_high: the grid's top value (1 for DoReFa, alpha for PACT, ``s n`` for LSQ).

    Returns:
      int32 codes in [0, 2^k - 1], the shape of ``x``.

    Raises:
      DeployError: for a quantizer without an integer form.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    t = x.dtype.type
    levels = (1 << bits) - 1
    if quantizer == "dorefa":
        codes = _round_product(np.clip(x, t(0), t(1)), levels)
    elif quantizer == "pact":
        alpha = t(clip_high)
        codes = np.rint((np.clip(x, t(0), alpha) * t(levels)) / alpha)
    elif quantizer == "lsq":
        step = t(np.float64(clip_high) / levels)  # exact: clip_high is s n, computed in float64
        codes = np.rint(np.clip(x / step, t(0), t(levels)))
    else:
        raise DeployError(f"activation quantizer {quantizer!r} has no integer form")
    return codes.astype(np.int32)
