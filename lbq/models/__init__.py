"""The paper's networks, by name."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from lbq.models.alexnet import AlexNet
from lbq.models.common import ACTIVATION_PLACEMENTS, QuantNetwork
from lbq.models.resnet import CifarResNet, ImageNetResNet
from lbq.quant.layers import ACTIVATION_QUANTIZERS, WEIGHT_QUANTIZERS

_REGISTRY = {
    "resnet20": (CifarResNet, {"depth": 20}),
    "resnet32": (CifarResNet, {"depth": 32}),
    "resnet56": (CifarResNet, {"depth": 56}),
    "preresnet20": (CifarResNet, {"depth": 20, "preact": True}),
    "resnet18": (ImageNetResNet, {"depth": 18}),
    "resnet34": (ImageNetResNet, {"depth": 34}),
    "resnet50": (ImageNetResNet, {"depth": 50}),
    "alexnet": (AlexNet, {"variant": "imagenet"}),
    "alexnet_cifar": (AlexNet, {"variant": "cifar", "hidden": 1024}),
}

MODEL_NAMES = tuple(_REGISTRY)
# The CIFAR-style ResNets (3x3 stem, three stages), which take the `shortcut` option.
CIFAR_MODELS = tuple(name for name, (cls, _) in _REGISTRY.items() if cls is CifarResNet)
# Every network built for 32x32 inputs (the rest expect ImageNet-size images).
SMALL_INPUT_MODELS = (*CIFAR_MODELS, "alexnet_cifar")


def get_model(
    name: str,
    *,
    num_classes: int,
    quantized: bool = True,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> QuantNetwork:
    """Builds a network by name.

    Args:
      name: one of `MODEL_NAMES`.
      num_classes: classifier outputs.
      quantized: False gives the full-precision network with plain ReLU.
      dtype: compute dtype (bfloat16 on accelerators, float32 on CPU).
      **kwargs: architecture options (per_channel, logit_scale, shortcut, hidden) and the
        quantizers (weight_quantizer: 'dorefa' or 'lsq'; activation_quantizer: 'dorefa',
        'pact' or 'lsq'; init_range: the initial PACT clip or LSQ activation range, > 0;
        activation_placement: 'block_output' or 'conv_input', SPEC section 9).

    Raises:
      ValueError: for an unknown name, quantizer or placement, or a non-positive init_range.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model.name={name!r} is not a known network; choose one of {MODEL_NAMES}")
    for field, known in (
        ("weight_quantizer", WEIGHT_QUANTIZERS),
        ("activation_quantizer", ACTIVATION_QUANTIZERS),
        ("activation_placement", ACTIVATION_PLACEMENTS),
    ):
        if kwargs.get(field, known[0]) not in known:
            raise ValueError(f"{field}={kwargs[field]!r} is not one of {known}")
    if not kwargs.get("init_range", 1.0) > 0:
        raise ValueError(f"init_range={kwargs['init_range']!r} must be > 0")
    cls, defaults = _REGISTRY[name]
    return cls(num_classes=num_classes, quantized=quantized, dtype=dtype, **{**defaults, **kwargs})


__all__ = [
    "ACTIVATION_PLACEMENTS",
    "MODEL_NAMES",
    "AlexNet",
    "CifarResNet",
    "ImageNetResNet",
    "QuantNetwork",
    "get_model",
]
