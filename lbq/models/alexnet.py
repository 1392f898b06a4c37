"""AlexNet with BatchNorm, ImageNet and CIFAR variants.

Each conv and hidden dense layer is followed by BatchNorm (so it has no bias) and the
activation. The first conv and the classifier are full precision; the activation after the
last hidden layer, which feeds the classifier, stays a plain ReLU. For AlexNet the units of
stochastic precision are single layers: each quantized layer is its own block. With
``activation_placement='conv_input'`` (SPEC section 9) every activation is a ReLU and each
quantized layer quantizes its own input instead.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn

from lbq.models.common import QuantNetwork
from lbq.quant.layers import QuantConv, QuantDense
from lbq.quant.precision import Precision


class ConvSpec(NamedTuple):
    features: int
    kernel: int
    stride: int
    padding: int
    pool: bool  # 3x3 max-pool, stride 2, after the activation


# torchvision's AlexNet layout (64-192-384-256-256 convs, two 4096 hidden layers).
_IMAGENET = (
    ConvSpec(64, 11, 4, 2, True),
    ConvSpec(192, 5, 1, 2, True),
    ConvSpec(384, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, True),
)
# A 32x32 variant: a 5x5 stem at stride 1 and SAME pools, so three pools leave 4x4 maps.
_CIFAR = (
    ConvSpec(64, 5, 1, 2, True),
    ConvSpec(192, 5, 1, 2, True),
    ConvSpec(384, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, False),
    ConvSpec(256, 3, 1, 1, True),
)


class AlexNet(QuantNetwork):
    """AlexNet-BN.

    Attributes:
      variant: 'imagenet' (224x224 input, 6x6 final maps) or 'cifar' (32x32 input).
      hidden: width of the two hidden dense layers (4096 for ImageNet).
    """

    variant: str = "imagenet"
    hidden: int = 4096

    def convs(self) -> tuple[ConvSpec, ...]:
        if self.variant not in ("imagenet", "cifar"):
            raise ValueError(f"variant={self.variant!r} is not one of 'imagenet', 'cifar'")
        return _IMAGENET if self.variant == "imagenet" else _CIFAR

    def layer_names(self) -> tuple[str, ...]:
        convs = [f"conv{i + 1}/conv" for i in range(1, len(self.convs()))]
        return (*convs, "fc6/dense", "fc7/dense")

    @nn.compact
    def __call__(self, x, precision: Precision | None = None, train: bool = False):
        """Returns (logits, {'conv4': ..., 'conv5': ...}), the last two conv outputs."""
        imagenet = self.variant == "imagenet"
        self.check_inputs(x, precision, min_size=224 if imagenet else 32)
        x = x.astype(self.dtype)
        names = self.layer_names()
        features = {}
        for i, spec in enumerate(self.convs()):
            first = i == 0
            layer = None if first else self.layer_precision(precision, names[i - 1])
            pad = [(spec.padding, spec.padding)] * 2
            conv = QuantConv(
                spec.features,
                (spec.kernel,) * 2,
                (spec.stride,) * 2,
                pad,
                name=f"conv{i + 1}",
                **self.layer_options(),
            )
            x = self.batch_norm(train, f"bn{i + 1}")(conv(x, layer))
            # The activation after the full-precision first conv takes conv2's precision.
            act = self.layer_precision(precision, names[0]) if first else layer
            x = self.act(x, act, f"act{i + 1}")
            if spec.pool:
                window = "VALID" if imagenet else ((0, 1), (0, 1))
                x = nn.max_pool(x, (3, 3), (2, 2), padding=window)
            features[f"conv{i + 1}"] = x
        if imagenet and x.shape[1:3] != (6, 6):
            raise ValueError(
                f"AlexNet(imagenet) needs 224..254 px inputs (6x6 final maps), got maps of "
                f"{x.shape[1:3]}"
            )
        x = x.reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            layer = self.layer_precision(precision, f"{name}/dense")
            dense = QuantDense(
                self.hidden,
                use_bias=False,
                name=name,
                **self.layer_options(),
            )
            x = self.batch_norm(train, f"{name}_bn")(dense(x, layer))
            x = self.act(x, None if name == "fc7" else layer, f"{name}_act")
        return self.classify(x), {k: features[k] for k in ("conv4", "conv5")}
