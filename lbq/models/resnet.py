"""ResNets of the paper: CIFAR ResNet-20/32/56, PreResNet-20, ImageNet ResNet-18/34/50.

Full-precision parts (SPEC section 1): the stem conv, the classifier and its input,
BatchNorm and the residual additions. Every conv inside a block is quantized, the 1x1
downsample convs included, and so is every block activation, except the activation after the
last block's residual add, which stays a plain ReLU so that the pooled feature feeding the
classifier is full precision.

Where activations are quantized is the network's ``activation_placement`` (SPEC section 9,
`lbq.models.common.QuantNetwork`). The rest of this docstring describes ``'block_output'``, the
authors' design; with ``'conv_input'`` every activation is a ReLU and each quantized conv (the
1x1 projection shortcuts included) quantizes its own input at its layer's ``a_bits``, so block
outputs, shortcuts and residual additions stay full precision.

Layer precision: a layer's ``a_bits`` quantizes the activation that layer's output feeds
inside its block (for a post-activation block, the ReLU after conv1 takes conv1's, the one
after the residual add takes the last conv's). The activation after the full-precision stem
takes the precision of the first block's first conv, so that every quantized conv sees
low-bit inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lbq.models.common import QuantNetwork
from lbq.quant.layers import QuantConv
from lbq.quant.precision import Precision


class BlockPlan(NamedTuple):
    name: str
    stage: int
    features: int
    stride: int
    projection: bool  # a 1x1 conv shortcut
    last: bool


def _plan(stage_sizes, widths, expansion, in_features, shortcut) -> list[BlockPlan]:
    plans = []
    for stage, (count, width) in enumerate(zip(stage_sizes, widths, strict=True)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            out = width * expansion
            changes = stride != 1 or in_features != out
            plans.append(
                BlockPlan(
                    f"stage{stage + 1}_block{index}",
                    stage,
                    width,
                    stride,
                    changes and shortcut == "B",
                    False,
                )
            )
            in_features = out
    plans[-1] = plans[-1]._replace(last=True)
    return plans


def _zero_pad_shortcut(x: jax.Array, features: int, stride: int) -> jax.Array:
    """He et al.'s option A: subsample, then zero-pad the new channels (no parameters)."""
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _ResNetBase(QuantNetwork):
    """Shared plumbing: the block plan, layer names and the per-block layer precisions."""

    def plan(self) -> list[BlockPlan]:
        raise NotImplementedError

    def block_layer_names(self, block: BlockPlan) -> tuple[str, ...]:
        raise NotImplementedError

    def layer_names(self) -> tuple[str, ...]:
        return tuple(
            f"{block.name}/{layer}"
            for block in self.plan()
            for layer in self.block_layer_names(block)
        )

    def block_precisions(self, precision: Precision | None, block: BlockPlan) -> dict:
        return {
            layer: self.layer_precision(precision, f"{block.name}/{layer}")
            for layer in self.block_layer_names(block)
        }

    def conv(self, features, kernel, stride, name):
        return self.quant_conv(features, kernel, stride, kernel // 2, name)


class CifarResNet(_ResNetBase):
    """CIFAR ResNet of He et al. (depth 6n+2, widths 16/32/64), post-activation blocks.

    Attributes:
      depth: 20, 32, 56, ... (6n + 2).
      shortcut: 'A' (zero-padded identity, as He et al., 0.27M parameters at depth 20) or
        'B' (1x1 conv + BN, which the quantizer then also covers).
      preact: pre-activation blocks (PreResNet, He et al. 2016).
    """

    depth: int = 20
    shortcut: str = "A"
    preact: bool = False

    def plan(self) -> list[BlockPlan]:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"depth={self.depth} is not 6n+2 with n >= 1 (20, 32, 56, ...)")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"shortcut={self.shortcut!r} is not one of 'A', 'B'")
        n = (self.depth - 2) // 6
        return _plan((n, n, n), (16, 32, 64), 1, 16, self.shortcut)

    def block_layer_names(self, block: BlockPlan) -> tuple[str, ...]:
        return ("conv1", "conv2", "shortcut") if block.projection else ("conv1", "conv2")

    @nn.compact
    def __call__(self, x, precision: Precision | None = None, train: bool = False):
        """Returns (logits, {stage name: stage output})."""
        self.check_inputs(x, precision, min_size=8)
        plans = self.plan()
        x = x.astype(self.dtype)
        x = self.conv(16, 3, 1, "stem")(x, None)
        first = self.block_precisions(precision, plans[0])["conv1"]
        if not self.preact:
            x = self.act(self.batch_norm(train, "stem_bn")(x), first, "stem_act")
        features = {}
        for block in plans:
            layers = self.block_precisions(precision, block)
            block_fn = _preact_block if self.preact else _basic_block
            x = block_fn(self, x, block, layers, train)
            features[f"stage{block.stage + 1}"] = x
        if self.preact:
            x = nn.relu(self.batch_norm(train, "final_bn")(x))
        return self.classify(jnp.mean(x, axis=(1, 2))), features


def _shortcut(net, x, block, layers, features):
    if block.projection:
        y = net.conv(features, 1, block.stride, f"{block.name}_shortcut")(x, layers["shortcut"])
        return y
    if block.stride != 1 or x.shape[-1] != features:
        return _zero_pad_shortcut(x, features, block.stride)
    return x


def _basic_block(net, x, block, layers, train):
    conv1 = net.conv(block.features, 3, block.stride, f"{block.name}_conv1")
    conv2 = net.conv(block.features, 3, 1, f"{block.name}_conv2")
    y = net.act(
        net.batch_norm(train, f"{block.name}_bn1")(conv1(x, layers["conv1"])),
        layers["conv1"],
        f"{block.name}_act1",
    )
    y = net.batch_norm(train, f"{block.name}_bn2")(conv2(y, layers["conv2"]))
    residual = _shortcut(net, x, block, layers, block.features)
    if block.projection:
        residual = net.batch_norm(train, f"{block.name}_shortcut_bn")(residual)
    y = y + residual
    return net.act(y, None if block.last else layers["conv2"], f"{block.name}_act2")


def _preact_block(net, x, block, layers, train):
    y = net.act(
        net.batch_norm(train, f"{block.name}_bn1")(x), layers["conv1"], f"{block.name}_act1"
    )
    # The projection shortcut reads the pre-activated input, as in PreResNet.
    residual = _shortcut(net, y if block.projection else x, block, layers, block.features)
    y = net.conv(block.features, 3, block.stride, f"{block.name}_conv1")(y, layers["conv1"])
    y = net.act(
        net.batch_norm(train, f"{block.name}_bn2")(y), layers["conv2"], f"{block.name}_act2"
    )
    y = net.conv(block.features, 3, 1, f"{block.name}_conv2")(y, layers["conv2"])
    return y + residual


_IMAGENET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


class ImageNetResNet(_ResNetBase):
    """ImageNet ResNet-18/34 (basic blocks) and ResNet-50 (bottleneck, stride on the 3x3).

    The downsample shortcut is a quantized 1x1 conv + BN (option B), as in torchvision.
    """

    depth: int = 18

    @property
    def bottleneck(self) -> bool:
        return self.depth >= 50

    def plan(self) -> list[BlockPlan]:
        if self.depth not in _IMAGENET_STAGES:
            raise ValueError(f"depth={self.depth} is not one of {sorted(_IMAGENET_STAGES)}")
        expansion = 4 if self.bottleneck else 1
        return _plan(_IMAGENET_STAGES[self.depth], (64, 128, 256, 512), expansion, 64, "B")

    def block_layer_names(self, block: BlockPlan) -> tuple[str, ...]:
        convs = ("conv1", "conv2", "conv3") if self.bottleneck else ("conv1", "conv2")
        return (*convs, "shortcut") if block.projection else convs

    @nn.compact
    def __call__(self, x, precision: Precision | None = None, train: bool = False):
        """Returns (logits, {stage name: stage output})."""
        self.check_inputs(x, precision, min_size=32)
        plans = self.plan()
        x = x.astype(self.dtype)
        x = QuantConv(64, (7, 7), (2, 2), [(3, 3), (3, 3)], dtype=self.dtype, name="stem")(x)
        first = self.block_precisions(precision, plans[0])["conv1"]
        x = self.act(self.batch_norm(train, "stem_bn")(x), first, "stem_act")
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        features = {}
        for block in plans:
            layers = self.block_precisions(precision, block)
            x = self.block(x, block, layers, train)
            features[f"stage{block.stage + 1}"] = x
        return self.classify(jnp.mean(x, axis=(1, 2))), features

    def block(self, x, block, layers, train):
        if not self.bottleneck:
            return _basic_block(self, x, block, layers, train)
        names = block.name
        width = block.features
        y = self.conv(width, 1, 1, f"{names}_conv1")(x, layers["conv1"])
        y = self.act(self.batch_norm(train, f"{names}_bn1")(y), layers["conv1"], f"{names}_act1")
        y = self.conv(width, 3, block.stride, f"{names}_conv2")(y, layers["conv2"])
        y = self.act(self.batch_norm(train, f"{names}_bn2")(y), layers["conv2"], f"{names}_act2")
        y = self.conv(width * 4, 1, 1, f"{names}_conv3")(y, layers["conv3"])
        y = self.batch_norm(train, f"{names}_bn3")(y)
        residual = x
        if block.projection:
            residual = self.conv(width * 4, 1, block.stride, f"{names}_shortcut")(
                x, layers["shortcut"]
            )
            residual = self.batch_norm(train, f"{names}_shortcut_bn")(residual)
        return self.act(y + residual, None if block.last else layers["conv3"], f"{names}_act3")
