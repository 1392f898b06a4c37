"""Agreement of an exported model with lbq's fake-quantized forward.

The reference is lbq's own eval-mode forward (``model.apply(..., train=False)`` on
``lbq.steps.normalize``d images, jitted, float32), at the exported bit-widths with every layer
quantized. The candidates are the integer reference forward and the QONNX graph run by qonnx.

Tolerance, as measured (docs/deploy.md): the integer forward matches the float32 reference up
to float32 rounding, except where a pre-activation falls within that rounding of a quantizer's
decision boundary and one code flips by one level. `logit_agreement` therefore reports the
fraction of images whose top-1 agrees, and the logit differences as a distribution (max and
the 99.9th percentile of each image's largest difference), relative to the logits' own range.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lbq.deploy.integer import normalize_images
from lbq.quant.precision import Precision

# Logits of an image agree "within tolerance" when the largest difference is at most this
# fraction of the image's largest reference logit magnitude (at least 1). Measured differences
# without a code flip are ~1e-6 of it; a flipped code moves logits by ~1e-3..1e-2 of it.
LOGIT_RTOL = 1e-3

# The export's own check (`lbq.export --check_images`) fails when, on its images, either
# candidate agrees with lbq's top-1 on fewer than this fraction of the images ...
CHECK_MIN_AGREEMENT = 0.98
# ... or differs by more than this fraction of an image's largest |lbq logit| (at least 1).
# Measured in float32 (docs/deploy.md): top-1 agreement >= 99.90 % and largest relative
# difference <= 0.13 (W2A2, W4A4, W8A8 ResNet-20, 2,000-10,000 images), from codes that flip
# where a pre-activation lies within float32 rounding of a decision boundary.
CHECK_MAX_REL_DIFF = 0.5


def fake_quant_logits(
    model: Any,
    variables: dict[str, Any],
    w_bits: Sequence[float],
    a_bits: Sequence[float],
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    float64: bool = False,
    dtype: Any = None,
) -> np.ndarray:
    """lbq's fake-quantized eval forward: logits [N, classes] of uint8 [N, H, W, 3] images.

    Runs in float32 (lbq's CPU compute dtype), or with ``float64`` the same model code in
    float64 (JAX's x64 mode, for this call only; pass float64 variables to have the weights
    quantized in float64 too), or in ``dtype`` (e.g. the run's own compute dtype, bfloat16,
    as `lbq.evaluate` runs it). The images are normalised by `normalize_images`, the array the
    integer forward computes too, so that both forwards see the same input.

    Returns:
      logits [N, classes] as float32 (float64 with ``float64``).
    """
    if dtype is None:
        dtype = jnp.float64 if float64 else jnp.float32
    with jax.enable_x64(float64):
        forward = _compiled_forward(model.clone(dtype=dtype))
        precision = Precision(
            jnp.asarray(w_bits, jnp.float32),
            jnp.asarray(a_bits, jnp.float32),
            jnp.ones(len(w_bits), jnp.float32),
        )
        variables = {
            "params": variables["params"],
            "batch_stats": variables.get("batch_stats", {}),
        }
        outputs = [
            np.asarray(
                forward(
                    variables, normalize_images(images[i : i + batch_size], mean, std), precision
                )
            )
            for i in range(0, len(images), batch_size)
        ]
    return np.concatenate(outputs).astype(np.float64 if float64 else np.float32)


@functools.lru_cache(maxsize=16)
def _compiled_forward(model: Any):
    """One compiled eval forward per network; the bit-widths are data, as in training."""
    return jax.jit(lambda variables, x, precision: model.apply(variables, x, precision)[0])


def logit_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Agreement figures of two [N, classes] logit arrays.

    Returns:
      images; top1_agreement (fraction); top1_mismatches (count); max_abs_diff;
      p999_abs_diff (99.9th percentile over images of each image's largest difference);
      max_rel_diff (largest difference over the image's largest |reference logit|, >= 1);
      within_tolerance (fraction of images with relative difference <= LOGIT_RTOL);
      max_abs_logit.
    """
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shapes {reference.shape} and {candidate.shape} differ")
    n = len(reference)
    same = np.argmax(reference, -1) == np.argmax(candidate, -1)
    per_image = np.abs(reference - candidate).max(axis=-1) if n else np.zeros(0)
    magnitude = np.maximum(np.abs(reference).max(axis=-1), 1.0) if n else np.ones(0)
    relative = per_image / magnitude
    return {
        "images": int(n),
        "top1_agreement": float(same.mean()) if n else 1.0,
        "top1_mismatches": int((~same).sum()),
        "max_abs_diff": float(per_image.max()) if n else 0.0,
        "p999_abs_diff": float(np.percentile(per_image, 99.9)) if n else 0.0,
        "max_rel_diff": float(relative.max()) if n else 0.0,
        "within_tolerance": float((relative <= LOGIT_RTOL).mean()) if n else 1.0,
        "max_abs_logit": float(np.abs(reference).max()) if n else 0.0,
    }


def check_verdict(
    figures: dict[str, float],
    min_agreement: float = CHECK_MIN_AGREEMENT,
    max_rel_diff: float = CHECK_MAX_REL_DIFF,
) -> str | None:
    """None when `logit_agreement`'s ``figures`` are within the export check's tolerance, else what
    disagreed: the top-1 agreement and the largest logit difference against their bounds."""
    low_agreement = figures["top1_agreement"] < min_agreement
    far = figures["max_rel_diff"] > max_rel_diff
    if not (low_agreement or far):
        return None
    return (
        f"top-1 agreement {100 * figures['top1_agreement']:.2f} % ({figures['top1_mismatches']} "
        f"of {figures['images']} images differ; tolerance >= {100 * min_agreement:.2f} %), "
        f"max |logit diff| {figures['max_abs_diff']:.3g} ({figures['max_rel_diff']:.3g} of the "
        f"largest |logit|; tolerance <= {max_rel_diff:g})"
    )
