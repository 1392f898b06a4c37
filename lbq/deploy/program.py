"""A trained lbq network as a program: operations on named NHWC tensors plus their arrays.

The program is what gets exported. Its operations are plain JSON (they go into the manifest),
its arrays go into the packed file, and both the integer reference forward
(`lbq.deploy.integer`) and the QONNX writer (`lbq.deploy.qonnx_export`) interpret the same list,
so the two cannot drift apart. The builders below walk each network exactly as its Flax
``__call__`` does (lbq.models.resnet, lbq.models.alexnet); the integer-vs-fake-quant checks in
tests/test_deploy.py are what keeps them in step.

Operations (``op`` field; ``inputs`` names earlier outputs or ``image``):

- ``normalize``: ``(pixels - mean) / std`` with the manifest's dataset statistics.
- ``conv`` / ``dense``: full-precision layers (arrays ``kernel`` HWIO or [in, out], ``bias``).
- ``qconv`` / ``qdense``: quantized layers. Arrays ``codes`` (uint8, the kernel's shape; packed
  in the file) and ``scale``; fields ``bits``, ``int_step``, ``int_offset`` (see
  `lbq.deploy.quantizers`). The input must be a quantized activation.
- ``quantize``: activation quantizer (``bits``, ``clip_high``); its output is integer codes.
- ``clip`` (clip(0, 1), a 32-bit activation), ``relu``, ``add``, ``batch_norm`` (arrays
  ``mean``, ``var``, ``scale``, ``bias``; ``epsilon``), ``max_pool`` (``window``,
  ``strides``, ``padding``), ``global_avg_pool``, ``flatten`` (NHWC order),
  ``shortcut_pad`` (He et al.'s option A: ``stride``, ``pad_channels`` zero channels
  before and after), ``logit_scale``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from lbq.deploy.errors import DeployError
from lbq.deploy.pack import MAX_BITS
from lbq.deploy.quantizers import activation_case, weight_case
from lbq.models.alexnet import AlexNet
from lbq.models.common import BLOCK_OUTPUT, CONV_INPUT
from lbq.models.resnet import CifarResNet, ImageNetResNet, _ResNetBase
from lbq.quant.quantizers import FULL_PRECISION_BITS

BN_EPSILON = 1e-5  # QuantNetwork.batch_norm (PyTorch's default)
INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class Program:
    """A network as operations (JSON-ready dicts) and arrays.

    Attributes:
      ops: the operations in execution order; the last one's output is the logits.
      arrays: {"<op name>/<field>": array}; ``codes`` are unpacked uint8 here.
      layers: the quantized layers in the network's ``layer_names()`` order: name, op,
        w_bits, a_bits.
    """

    ops: list[dict[str, Any]]
    arrays: dict[str, np.ndarray]
    layers: list[dict[str, Any]]

    @property
    def output(self) -> str:
        return self.ops[-1]["name"]

    def weight_values(self, op: Mapping[str, Any]) -> np.ndarray:
        """The float32 ``w_q`` of a qconv/qdense op, from its codes and scale."""
        q = op["int_step"] * self.arrays[f"{op['name']}/codes"].astype(np.int32)
        scale = self.arrays[f"{op['name']}/scale"].astype(np.float64)
        return (scale * (q + op["int_offset"])).astype(np.float32)


class _Builder:
    """Appends operations while walking a network; tracks each tensor's channels and grid."""

    def __init__(self, variables, w_bits, a_bits, layer_names, per_channel, quantizers, placement):
        self.params = variables["params"]
        self.placement = placement
        self.stats = variables.get("batch_stats", {})
        self.bits = {
            name: (int(w), int(a)) for name, w, a in zip(layer_names, w_bits, a_bits, strict=True)
        }
        self.per_channel = per_channel
        self.weight_case = weight_case(quantizers[0])
        self.activation_case = activation_case(quantizers[1])
        self.quantizers = quantizers
        self.ops: list[dict[str, Any]] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.channels: dict[str, int] = {"image": 3}
        self.grid: dict[str, tuple[int, float]] = {}  # quantized tensor -> (bits, clip_high)
        self.layer_op: dict[str, str] = {}

    def _param(self, module: str, field: str, tree=None) -> np.ndarray:
        tree = self.params if tree is None else tree
        try:
            return np.asarray(tree[module][field], np.float32)
        except KeyError:
            raise DeployError(f"the checkpoint has no {module}/{field}") from None

    def _add(self, op: str, name: str, inputs, channels: int, arrays=None, **fields) -> str:
        self.ops.append({"name": name, "op": op, "inputs": list(inputs), **fields})
        for key, value in (arrays or {}).items():
            self.arrays[f"{name}/{key}"] = value
        self.channels[name] = channels
        return name

    def _layer_bits(self, layer: str) -> tuple[int, int]:
        w, a = self.bits[layer]
        for field, value in (("w_bits", w), ("a_bits", a)):
            if MAX_BITS < value < FULL_PRECISION_BITS or value < 1:
                raise DeployError(
                    f"layer {layer} has {field}={value}: export packs 1..{MAX_BITS}-bit codes "
                    f"(or {FULL_PRECISION_BITS} for full precision)"
                )
        return w, a

    # -- layers -------------------------------------------------------------------------

    def normalize(self) -> str:
        return self._add("normalize", "normalize", ["image"], 3)

    def conv(self, name: str, x: str, stride: int, padding, layer: str | None = None) -> str:
        """A conv (module ``name``), quantized when ``layer`` runs at <= 8 weight bits."""
        kernel = self._param(name, "kernel")
        geometry = {"strides": [stride, stride], "padding": [list(p) for p in padding]}
        return self._weighted("conv", name, x, kernel, layer, geometry)

    def dense(self, name: str, x: str, layer: str | None = None) -> str:
        kernel = self._param(name, "kernel")
        return self._weighted("dense", name, x, kernel, layer, {})

    def _weighted(self, kind, name, x, kernel, layer, geometry) -> str:
        if layer is not None and self.placement == CONV_INPUT:
            # QuantConv / QuantDense with quantize_input: the layer's own input quantizer.
            quantizer = self.params[name].get("input_quantizer")
            x = self._activation_quantizer(f"{name}_input", x, layer, quantizer)
        arrays = {}
        if "bias" in self.params[name]:
            arrays["bias"] = self._param(name, "bias")
        out_channels = kernel.shape[-1]
        w_bits = self._layer_bits(layer)[0] if layer is not None else FULL_PRECISION_BITS
        if w_bits >= FULL_PRECISION_BITS:
            arrays["kernel"] = kernel
            return self._add(kind, name, [x], out_channels, arrays, **geometry)
        if x not in self.grid:
            raise DeployError(
                f"layer {layer} has {w_bits}-bit weights but a full-precision input (a_bits="
                f"{FULL_PRECISION_BITS} upstream): the integer forward needs quantized inputs"
            )
        grid = self.weight_case(self.params[name], w_bits, self.per_channel, f"layer {layer}")
        in_bits, _ = self.grid[x]
        fan_in = int(np.prod(kernel.shape[:-1]))
        worst = fan_in * ((1 << in_bits) - 1) * grid.max_abs_integer()
        if worst > INT32_MAX:
            raise DeployError(
                f"layer {layer}: {fan_in} products of {in_bits}-bit activations and "
                f"{w_bits}-bit weights can reach {worst}, beyond int32"
            )
        arrays.update(codes=grid.codes, scale=grid.scale)
        self.layer_op[layer] = name
        return self._add(
            f"q{kind}",
            name,
            [x],
            out_channels,
            arrays,
            layer=layer,
            bits=w_bits,
            quantizer=self.quantizers[0],
            int_step=grid.int_step,
            int_offset=grid.int_offset,
            shape=list(kernel.shape),
            **geometry,
        )

    def batch_norm(self, name: str, x: str) -> str:
        arrays = {
            "mean": self._param(name, "mean", self.stats),
            "var": self._param(name, "var", self.stats),
            "scale": self._param(name, "scale"),
            "bias": self._param(name, "bias"),
        }
        return self._add("batch_norm", name, [x], self.channels[x], arrays, epsilon=BN_EPSILON)

    def activation(self, name: str, x: str, layer: str | None) -> str:
        """QuantNetwork.act: ReLU (``layer`` None, or conv-input placement), else the
        activation quantizer ``name`` at ``layer``'s a_bits."""
        if layer is None or self.placement == CONV_INPUT:
            return self._add("relu", name, [x], self.channels[x])
        return self._activation_quantizer(name, x, layer, self.params.get(name))

    def _activation_quantizer(self, name: str, x: str, layer: str, params) -> str:
        """lbq.quant.layers.quantized_activation (parameters ``params``, None for DoReFa):
        clip(0, 1) at 32 bits, else quantize."""
        a_bits = self._layer_bits(layer)[1]
        if a_bits >= FULL_PRECISION_BITS:
            return self._full_precision_activation(name, x, layer, params)
        grid = self.activation_case(params, a_bits, f"layer {layer}")
        self.grid[name] = (a_bits, grid.clip_high)
        return self._add(
            "quantize",
            name,
            [x],
            self.channels[x],
            layer=layer,
            bits=a_bits,
            quantizer=self.quantizers[1],
            clip_high=grid.clip_high,
        )

    def _full_precision_activation(self, name: str, x: str, layer: str, params) -> str:
        """A quantizer at 32 bits (`lbq.quant.layers`): DoReFa clips to [0, 1], PACT to its
        learned clip, LSQ is a ReLU."""
        quantizer = self.quantizers[1]
        if quantizer == "lsq":
            return self._add("relu", name, [x], self.channels[x])
        high = 1.0
        if quantizer == "pact":
            high = self.activation_case(params, 1, f"layer {layer}").clip_high
        return self._add("clip", name, [x], self.channels[x], low=0.0, high=high)

    def relu(self, name: str, x: str) -> str:
        return self.activation(name, x, None)

    def add(self, name: str, x: str, y: str) -> str:
        return self._add("add", name, [x, y], self.channels[x])

    def max_pool(self, name: str, x: str, window: int, stride: int, padding) -> str:
        out = self._add(
            "max_pool",
            name,
            [x],
            self.channels[x],
            window=[window, window],
            strides=[stride, stride],
            padding=[list(p) for p in padding],
        )
        if x in self.grid:  # the max of codes is a code: pooling stays on the grid
            self.grid[out] = self.grid[x]
        return out

    def shortcut_pad(self, name: str, x: str, features: int, stride: int) -> str:
        extra = features - self.channels[x]
        pad = [extra // 2, extra - extra // 2]  # lbq.models.resnet._zero_pad_shortcut
        out = self._add("shortcut_pad", name, [x], features, stride=stride, pad_channels=pad)
        if x in self.grid:  # subsampling and zero channels (code 0) stay on the grid
            self.grid[out] = self.grid[x]
        return out

    def global_avg_pool(self, name: str, x: str) -> str:
        return self._add("global_avg_pool", name, [x], self.channels[x])

    def flatten(self, name: str, x: str, size: int) -> str:
        out = self._add("flatten", name, [x], size)
        if x in self.grid:
            self.grid[out] = self.grid[x]
        return out

    def classify(self, x: str, logit_scale: bool) -> str:
        out = self.dense("classifier", x)
        if logit_scale:
            scale = np.asarray(self.params["logit_scale"], np.float32)
            out = self._add(
                "logit_scale", "logit_scale", [out], self.channels[out], {"scale": scale}
            )
        return out


# ----------------------------------------------------------------------------- networks


def _same_padding(kernel: int) -> list[tuple[int, int]]:
    return [(kernel // 2, kernel // 2)] * 2


def _block_conv(b: _Builder, x: str, block_name: str, layer: str, stride: int) -> str:
    """``_ResNetBase.conv``: padding k // 2, the layer's precision."""
    name = f"{block_name}_{layer}"
    kernel = b._param(name, "kernel").shape[0]
    return b.conv(name, x, stride, _same_padding(kernel), f"{block_name}/{layer}")


def _shortcut(b: _Builder, x: str, block, features: int) -> str:
    """lbq.models.resnet._shortcut."""
    if block.projection:
        return _block_conv(b, x, block.name, "shortcut", block.stride)
    if block.stride != 1 or b.channels[x] != features:
        return b.shortcut_pad(f"{block.name}_shortcut_pad", x, features, block.stride)
    return x


def _basic_block(b: _Builder, x: str, block) -> str:
    """lbq.models.resnet._basic_block."""
    n = block.name
    y = _block_conv(b, x, n, "conv1", block.stride)
    y = b.activation(f"{n}_act1", b.batch_norm(f"{n}_bn1", y), f"{n}/conv1")
    y = b.batch_norm(f"{n}_bn2", _block_conv(b, y, n, "conv2", 1))
    residual = _shortcut(b, x, block, block.features)
    if block.projection:
        residual = b.batch_norm(f"{n}_shortcut_bn", residual)
    y = b.add(f"{n}_add", y, residual)
    return b.activation(f"{n}_act2", y, None if block.last else f"{n}/conv2")


def _preact_block(b: _Builder, x: str, block) -> str:
    """lbq.models.resnet._preact_block."""
    n = block.name
    y = b.activation(f"{n}_act1", b.batch_norm(f"{n}_bn1", x), f"{n}/conv1")
    residual = _shortcut(b, y if block.projection else x, block, block.features)
    y = _block_conv(b, y, n, "conv1", block.stride)
    y = b.activation(f"{n}_act2", b.batch_norm(f"{n}_bn2", y), f"{n}/conv2")
    y = _block_conv(b, y, n, "conv2", 1)
    return b.add(f"{n}_add", y, residual)


def _bottleneck_block(b: _Builder, x: str, block) -> str:
    """ImageNetResNet.block for depth >= 50."""
    n = block.name
    y = _block_conv(b, x, n, "conv1", 1)
    y = b.activation(f"{n}_act1", b.batch_norm(f"{n}_bn1", y), f"{n}/conv1")
    y = _block_conv(b, y, n, "conv2", block.stride)
    y = b.activation(f"{n}_act2", b.batch_norm(f"{n}_bn2", y), f"{n}/conv2")
    y = b.batch_norm(f"{n}_bn3", _block_conv(b, y, n, "conv3", 1))
    residual = x
    if block.projection:
        residual = _block_conv(b, x, n, "shortcut", block.stride)
        residual = b.batch_norm(f"{n}_shortcut_bn", residual)
    y = b.add(f"{n}_add", y, residual)
    return b.activation(f"{n}_act3", y, None if block.last else f"{n}/conv3")


def _cifar_resnet(b: _Builder, net: CifarResNet) -> None:
    """CifarResNet.__call__."""
    plans = net.plan()
    x = b.conv("stem", b.normalize(), 1, _same_padding(3))
    if not net.preact:
        x = b.activation("stem_act", b.batch_norm("stem_bn", x), f"{plans[0].name}/conv1")
    for block in plans:
        x = (_preact_block if net.preact else _basic_block)(b, x, block)
    if net.preact:
        x = b.relu("final_relu", b.batch_norm("final_bn", x))
    b.classify(b.global_avg_pool("pool", x), net.logit_scale)


def _imagenet_resnet(b: _Builder, net: ImageNetResNet) -> None:
    """ImageNetResNet.__call__."""
    plans = net.plan()
    x = b.conv("stem", b.normalize(), 2, [(3, 3), (3, 3)])
    x = b.activation("stem_act", b.batch_norm("stem_bn", x), f"{plans[0].name}/conv1")
    x = b.max_pool("stem_pool", x, 3, 2, [(1, 1), (1, 1)])
    for block in plans:
        x = (_bottleneck_block if net.bottleneck else _basic_block)(b, x, block)
    b.classify(b.global_avg_pool("pool", x), net.logit_scale)


def _alexnet(b: _Builder, net: AlexNet, image_size: int) -> None:
    """AlexNet.__call__."""
    imagenet = net.variant == "imagenet"
    names = net.layer_names()
    x, size = b.normalize(), image_size
    for i, spec in enumerate(net.convs()):
        layer = None if i == 0 else names[i - 1]
        x = b.conv(f"conv{i + 1}", x, spec.stride, [(spec.padding, spec.padding)] * 2, layer)
        size = (size + 2 * spec.padding - spec.kernel) // spec.stride + 1
        x = b.activation(f"act{i + 1}", b.batch_norm(f"bn{i + 1}", x), layer or names[0])
        if spec.pool:
            window = [(0, 0), (0, 0)] if imagenet else [(0, 1), (0, 1)]
            x = b.max_pool(f"pool{i + 1}", x, 3, 2, window)
            size = (size + sum(window[0]) - 3) // 2 + 1
    x = b.flatten("flatten", x, b.channels[x] * size * size)
    for name in ("fc6", "fc7"):
        x = b.batch_norm(f"{name}_bn", b.dense(name, x, f"{name}/dense"))
        x = b.activation(f"{name}_act", x, None if name == "fc7" else f"{name}/dense")
    b.classify(x, net.logit_scale)


def build_program(
    model: Any,
    variables: Mapping[str, Any],
    w_bits,
    a_bits,
    *,
    image_size: int,
    quantizers: tuple[str, str] | None = None,
) -> Program:
    """The program of a trained lbq network at the given per-layer bit-widths.

    Args:
      model: an lbq network (lbq.models), quantized.
      variables: {'params': ..., 'batch_stats': ...} of that network.
      w_bits, a_bits: per-layer bit-widths, in ``model.layer_names()`` order (length L).
      image_size: input height and width in pixels (the flatten size of AlexNet follows).
      quantizers: (weight quantizer, activation quantizer) names; default the model's own.

    Returns:
      The `Program`.

    Raises:
      DeployError: for a full-precision model, an architecture or quantizer export does not
        cover, a bit-width between 9 and 31, a quantized layer fed by a full-precision
        activation, a layer whose int32 accumulation could overflow, or missing variables.
    """
    if not getattr(model, "quantized", False):
        raise DeployError(
            "the network is full precision (model.quantized=False); export writes low-bit models"
        )
    if quantizers is None:
        quantizers = (model.weight_quantizer, model.activation_quantizer)
    names = model.layer_names()
    if len(w_bits) != len(names) or len(a_bits) != len(names):
        raise DeployError(f"{len(w_bits)} bit-widths given for {len(names)} quantized layers")
    placement = getattr(model, "activation_placement", BLOCK_OUTPUT)
    b = _Builder(variables, w_bits, a_bits, names, model.per_channel, quantizers, placement)
    if isinstance(model, CifarResNet):
        _cifar_resnet(b, model)
    elif isinstance(model, ImageNetResNet):
        _imagenet_resnet(b, model)
    elif isinstance(model, AlexNet):
        _alexnet(b, model, image_size)
    else:
        kind = "ResNet" if isinstance(model, _ResNetBase) else type(model).__name__
        raise DeployError(f"export does not cover {kind} networks yet")
    layers = [
        {"name": n, "op": b.layer_op.get(n), "w_bits": b.bits[n][0], "a_bits": b.bits[n][1]}
        for n in names
    ]
    return Program(b.ops, b.arrays, layers)
