"""A `Program` as a QONNX graph, and running such a graph with qonnx's own executor.

QONNX (https://github.com/fastmachinelearning/qonnx) is the ONNX dialect for arbitrary-precision
quantized networks that Brevitas writes and FINN compiles: a ``Quant`` node (domain
``qonnx.custom_op.general``; inputs x, scale, zero-point, bit-width; attributes signed, narrow,
rounding_mode) computes ``scale * (round(clip(x / scale + zeropt, min, max)) - zeropt)``.

- Every quantized activation is a ``Quant`` node (zeropt 0, k bits, unsigned) whose rounding
  is lbq's (`_emit_quantize`): DoReFa ``Quant(float64(x) n, scale 1) / n``, PACT
  ``Quant(x n, scale alpha) / n``, LSQ ``Quant(x, scale s)``; the clip is the Quant's clamp.
- Every quantized weight is ``Quant(w_q, scale = weight scale * int_step, zeropt =
  -int_offset / int_step, k bits, unsigned)`` on the on-grid ``w_q`` (so the node is exactly the
  identity on its initializer and the integer codes are unambiguous). For DoReFa that is
  scale 2/n and zeropt n/2: its grid {(2c - n)/n} is symmetric with no zero level, which makes
  the zero-point a half-integer. qonnx executes it as written; FINN's datatype inference
  currently accepts zero-point 0 only and reads such weights as FLOAT32.
- Full-precision parts are standard ONNX (opset 11): Conv, BatchNormalization, Add, Relu, Clip,
  MaxPool, GlobalAveragePool, MatMul, Slice/Pad for the option-A shortcut.

The graph is NCHW with input ``image``: float32 [batch, 3, H, W] pixels in 0..255 after the
manifest's resize/crop (the normalisation is the graph's first two nodes); output ``logits``.
Each program operation becomes the nodes whose outputs are named ``<op>`` or ``<op>/...``
(the last one is ``<op>``), so a graph can be checked operation by operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lbq.deploy.program import Program

QONNX_DOMAIN = "qonnx.custom_op.general"
INPUT = "image"
OUTPUT = "logits"
_INT64_MAX = np.iinfo(np.int64).max


class _Graph:
    """Collects ONNX nodes and initializers (NCHW layout throughout)."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def constant(self, name: str, value) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op_type: str, inputs: Sequence[str], output: str, **attrs) -> str:
        domain = QONNX_DOMAIN if op_type == "Quant" else ""
        self.nodes.append(
            self.helper.make_node(
                op_type, list(inputs), [output], name=output, domain=domain, **attrs
            )
        )
        return output

    def quant(self, name: str, x: str, scale, zeropt, bits: int) -> str:
        return self.node(
            "Quant",
            [
                x,
                self.constant(f"{name}/quant_scale", np.asarray(scale, np.float32)),
                self.constant(f"{name}/quant_zeropt", np.float32(zeropt)),
                self.constant(f"{name}/quant_bits", np.float32(bits)),
            ],
            name,
            signed=0,
            narrow=0,
            rounding_mode="ROUND",
        )


def _pads(padding) -> list[int]:
    """lbq's ((top, bottom), (left, right)) as ONNX [top, left, bottom, right]."""
    (top, bottom), (left, right) = padding
    return [int(top), int(left), int(bottom), int(right)]


def _weight(g: _Graph, program: Program, op, conv: bool) -> str:
    """The weight input of a (q)conv or (q)dense node, in ONNX layout."""
    name = op["name"]
    quantized = op["op"] in ("qconv", "qdense")
    values = program.weight_values(op) if quantized else program.arrays[f"{name}/kernel"]
    layout = (3, 2, 0, 1) if conv else (0, 1)  # HWIO -> OIHW; [in, out] stays
    weight = g.constant(f"{name}/weight", np.ascontiguousarray(values.transpose(layout)))
    if not quantized:
        return weight
    scale = program.arrays[f"{name}/scale"] * op["int_step"]
    if scale.ndim:  # per output channel: broadcast over OIHW or [in, out]
        scale = scale.reshape((-1, 1, 1, 1) if conv else (1, -1))
    zeropt = -op["int_offset"] / op["int_step"]
    return g.quant(f"{name}/weight_quant", weight, scale, zeropt, op["bits"])


def _with_bias(g: _Graph, program: Program, name: str, y: str) -> str:
    key = f"{name}/bias"
    if key not in program.arrays:
        return y
    return g.node("Add", [y, g.constant(key, program.arrays[key])], name)


def _emit_normalize(g: _Graph, name: str, x: str, mean, std) -> str:
    """(x - mean) / std per channel of the NCHW input, in the input's 0..255 units."""
    shape = (1, 3, 1, 1)
    centered = g.node(
        "Sub",
        [x, g.constant("mean", np.asarray(mean, np.float32).reshape(shape))],
        f"{name}/centered",
    )
    return g.node(
        "Div", [centered, g.constant("std", np.asarray(std, np.float32).reshape(shape))], name
    )


def _emit_shortcut_pad(g: _Graph, name: str, x: str, op) -> str:
    """The option-A shortcut: subsample by the stride, then zero-pad the channels."""
    stride = int(op["stride"])
    sliced = g.node(
        "Slice",
        [
            x,
            g.constant(f"{name}/starts", np.asarray([0, 0], np.int64)),
            g.constant(f"{name}/ends", np.asarray([_INT64_MAX] * 2, np.int64)),
            g.constant(f"{name}/axes", np.asarray([2, 3], np.int64)),
            g.constant(f"{name}/steps", np.asarray([stride, stride], np.int64)),
        ],
        f"{name}/subsampled",
    )
    low, high = (int(v) for v in op["pad_channels"])
    pads = np.asarray([0, low, 0, 0, 0, high, 0, 0], np.int64)
    return g.node("Pad", [sliced, g.constant(f"{name}/pads", pads)], name, mode="constant")


def _emit_quantize(g: _Graph, name: str, x: str, op) -> str:
    """An activation quantizer whose Quant node rounds exactly what lbq's quantizer rounds
    (`lbq.deploy.quantizers.activation_codes`; qonnx's Quant divides by its scale, clips, then
    rounds half to even).

    - DoReFa: ``Cast`` to float64, ``Mul`` by n (exact), ``Quant`` with scale 1 (the codes),
      ``Div`` by n. A float32 ``Mul`` would round ``x n`` (float32(1/6) * 3 gives 0.5), and a
      scale of 1/n would round ``x / (1/n)`` (0.5 / float32(1/7) gives 3.4999998).
    - PACT: ``Mul`` by n, ``Quant`` with scale alpha, ``Div`` by n: float32
      ``(x n) / alpha`` as lbq computes it, and lbq's value ``(c alpha) / n``.
    - LSQ: ``Quant`` with scale s: float32 ``x / s`` as lbq computes it, value ``c s``.
    """
    from onnx import TensorProto

    levels = (1 << op["bits"]) - 1
    quantizer = op.get("quantizer", "dorefa")
    n = g.constant(f"{name}/levels", np.float32(levels))
    if quantizer == "dorefa":
        wide = g.node("Cast", [x], f"{name}/float64", to=TensorProto.DOUBLE)
        scaled = g.node(
            "Mul", [wide, g.constant(f"{name}/levels64", np.float64(levels))], f"{name}/scaled"
        )
        codes = g.quant(f"{name}/codes", scaled, np.float32(1.0), 0.0, op["bits"])
        return g.node("Div", [codes, n], name)
    if quantizer == "pact":
        scaled = g.node("Mul", [x, n], f"{name}/scaled")
        clipped = g.quant(f"{name}/quant", scaled, np.float32(op["clip_high"]), 0.0, op["bits"])
        return g.node("Div", [clipped, n], name)
    if quantizer == "lsq":
        step = np.float32(np.float64(op["clip_high"]) / levels)  # exact: clip_high is s n
        return g.quant(name, x, step, 0.0, op["bits"])
    raise ValueError(f"activation quantizer {quantizer!r} of {name} has no QONNX form")


def _emit(g: _Graph, program: Program, op, inputs: list[str], mean, std) -> str:
    """ONNX nodes of one program operation; returns the output tensor name."""
    name, kind, x = op["name"], op["op"], inputs[0] if inputs else None
    if kind == "normalize":
        return _emit_normalize(g, name, x, mean, std)
    if kind in ("conv", "qconv"):
        weight = _weight(g, program, op, conv=True)
        out = name if f"{name}/bias" not in program.arrays else f"{name}/conv"
        y = g.node(
            "Conv",
            [x, weight],
            out,
            kernel_shape=list(_kernel_shape(program, op)),
            strides=list(op["strides"]),
            pads=_pads(op["padding"]),
        )
        return _with_bias(g, program, name, y)
    if kind in ("dense", "qdense"):
        out = name if f"{name}/bias" not in program.arrays else f"{name}/matmul"
        y = g.node("MatMul", [x, _weight(g, program, op, conv=False)], out)
        return _with_bias(g, program, name, y)
    if kind == "quantize":
        return _emit_quantize(g, name, x, op)
    if kind == "batch_norm":
        arrays = [
            g.constant(f"{name}/{f}", program.arrays[f"{name}/{f}"])
            for f in ("scale", "bias", "mean", "var")
        ]
        return g.node("BatchNormalization", [x, *arrays], name, epsilon=float(op["epsilon"]))
    if kind == "relu":
        return g.node("Relu", [x], name)
    if kind == "clip":
        low = g.constant(f"{name}/low", np.float32(op["low"]))
        high = g.constant(f"{name}/high", np.float32(op["high"]))
        return g.node("Clip", [x, low, high], name)
    if kind == "add":
        return g.node("Add", inputs, name)
    if kind == "max_pool":
        return g.node(
            "MaxPool",
            [x],
            name,
            kernel_shape=list(op["window"]),
            strides=list(op["strides"]),
            pads=_pads(op["padding"]),
        )
    if kind == "global_avg_pool":
        pooled = g.node("GlobalAveragePool", [x], f"{name}/pooled")
        return g.node("Flatten", [pooled], name, axis=1)
    if kind == "flatten":  # lbq flattens NHWC
        nhwc = g.node("Transpose", [x], f"{name}/nhwc", perm=[0, 2, 3, 1])
        return g.node("Flatten", [nhwc], name, axis=1)
    if kind == "shortcut_pad":
        return _emit_shortcut_pad(g, name, x, op)
    if kind == "logit_scale":
        return g.node(
            "Mul", [x, g.constant(f"{name}/scale", program.arrays[f"{name}/scale"])], name
        )
    raise ValueError(f"operation {kind!r} of {name} has no QONNX form")


def _kernel_shape(program: Program, op) -> tuple[int, int]:
    """(kh, kw) of a conv or qconv operation."""
    if op["op"] == "qconv":
        return tuple(op["shape"][:2])
    return program.arrays[f"{op['name']}/kernel"].shape[:2]


def to_qonnx(
    program: Program,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int,
    num_classes: int,
    batch: int = 1,
) -> Any:
    """The QONNX model (an ``onnx.ModelProto`` with inferred shapes) of a program.

    Args:
      program: the network.
      mean, std: input normalisation, 0..255 units.
      image_size: input height and width.
      num_classes: logits per image.
      batch: the graph's fixed batch size (qonnx's executor needs every shape fixed).
    """
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    g = _Graph()
    tensors = {"image": INPUT}
    for op in program.ops:
        inputs = [tensors[name] for name in op["inputs"]]
        tensors[op["name"]] = _emit(g, program, op, inputs, mean, std)
    g.nodes.append(helper.make_node("Identity", [tensors[program.output]], [OUTPUT], name=OUTPUT))
    graph = helper.make_graph(
        g.nodes,
        "lbq",
        [
            helper.make_tensor_value_info(
                INPUT, TensorProto.FLOAT, [batch, 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch, num_classes])],
        initializer=g.initializers,
    )
    model = qonnx_make_model(graph, producer_name="lbq")
    return ModelWrapper(model).transform(InferShapes()).model


def run_qonnx(model: Any, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    """Logits of uint8 NHWC images from a QONNX model, run by ``qonnx.core.onnx_exec``.

    Args:
      model: an ``onnx.ModelProto`` or a path to a .onnx file.
      images: [N, H, W, 3] pixels 0..255, eval-preprocessed.
      batch_size: images per executor call (the graph's batch size is changed to match).

    Returns:
      float32 logits [N, num_classes].
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.change_batchsize import ChangeBatchSize
    from qonnx.transformation.infer_shapes import InferShapes

    base = ModelWrapper(model)
    by_size: dict[int, Any] = {}
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size], np.float32).transpose(0, 3, 1, 2)
        n = len(chunk)
        if n not in by_size:
            by_size[n] = base.transform(ChangeBatchSize(n)).transform(InferShapes())
        result = execute_onnx(by_size[n], {INPUT: np.ascontiguousarray(chunk)})
        outputs.append(np.asarray(result[OUTPUT], np.float32))
    return np.concatenate(outputs)
