"""Pieces shared by the lbq networks."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lbq.quant.layers import (
    DEFAULT_QUANTIZER,
    PACT_INITIAL_CLIP,
    LayerPrecision,
    QuantConv,
    quantized_activation,
)
from lbq.quant.precision import Precision

Dtype = Any

# Where a quantized network quantizes its activations (SPEC section 9): 'block_output' (the
# authors' code: each block activation is quantized in place of its ReLU, so shortcuts and the
# next block read k-bit values) or 'conv_input' (each quantized conv or dense layer quantizes its
# own input; block outputs, shortcuts and residual additions stay full precision, as LSQ, APoT
# and Brevitas do).
BLOCK_OUTPUT, CONV_INPUT = "block_output", "conv_input"
ACTIVATION_PLACEMENTS = (BLOCK_OUTPUT, CONV_INPUT)

# BatchNorm's running-average momentum (Flax convention; PyTorch's 0.1), which
# `lbq.calibrate` also needs to recover a batch's statistics.
BATCH_NORM_MOMENTUM = 0.9


class QuantNetwork(nn.Module):
    """Base of the lbq networks: named quantized layers and a per-layer precision input.

    Subclasses define ``layer_names()`` (static: computed from the hyperparameters, not by
    tracing) and call ``self.layer_precision(precision, name)`` for each quantized layer.
    ``quantized=False`` gives the full-precision network with plain ReLU (the teacher).

    Quantizers (static; `lbq.quant.layers`): ``weight_quantizer`` ('dorefa', 'lsq') for every
    quantized conv and dense layer, ``activation_quantizer`` ('dorefa', 'pact', 'lsq') for every
    quantized activation, ``init_range`` the initial PACT clip / LSQ activation range.
    ``activation_placement`` (static): ``'block_output'`` or ``'conv_input'`` (SPEC section 9;
    see `ACTIVATION_PLACEMENTS`). With ``'conv_input'`` every activation of the network is a
    plain ReLU and each quantized layer quantizes its own input with its layer's ``a_bits``
    (`lbq.quant.layers.QuantConv`'s ``quantize_input``; the quantizer is its submodule
    ``input_quantizer``).
    """

    num_classes: int = 10
    quantized: bool = True
    per_channel: bool = False
    logit_scale: bool = False
    weight_quantizer: str = DEFAULT_QUANTIZER
    activation_quantizer: str = DEFAULT_QUANTIZER
    init_range: float = PACT_INITIAL_CLIP
    activation_placement: str = BLOCK_OUTPUT
    dtype: Dtype = jnp.float32

    def layer_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def blocks(self) -> tuple[str, ...]:
        """The block names, in order: the units of stochastic precision by default."""
        from lbq.quant.precision import block_of

        return tuple(dict.fromkeys(block_of(n) for n in self.layer_names()))

    def layer_precision(self, precision: Precision | None, name: str) -> LayerPrecision | None:
        """The precision of layer ``name``, or None in a full-precision network."""
        if not self.quantized:
            return None
        return precision.layer(self.layer_names().index(name))

    def check_inputs(self, x: jax.Array, precision: Precision | None, min_size: int) -> None:
        """Raises a clear ValueError for inputs this network cannot take."""
        name = type(self).__name__
        if x.ndim != 4 or x.shape[1] < min_size or x.shape[2] < min_size:
            raise ValueError(
                f"{name} input shape {tuple(x.shape)} is not supported: expected "
                f"[batch, height, width, channels] with height and width >= {min_size}"
            )
        if self.quantized:
            count = len(self.layer_names())
            if precision is None:
                raise ValueError(
                    f"{name} is quantized and needs a precision spec with {count} layers "
                    "(lbq.quant.make_precision(model.layer_names(), w_bits, a_bits))"
                )
            if precision.w_bits.shape != (count,):
                raise ValueError(
                    f"precision spec has shape {precision.w_bits.shape}, but {name} has "
                    f"{count} quantized layers: {self.layer_names()}"
                )

    def act(self, x: jax.Array, precision, name: str) -> jax.Array:
        """The nonlinearity at one place of the network: ReLU for ``precision=None`` or with
        ``activation_placement='conv_input'``, else the network's activation quantizer (a
        submodule called ``name`` for PACT and LSQ)."""
        if self.activation_placement == CONV_INPUT:
            return nn.relu(x)
        return quantized_activation(x, precision, self.activation_quantizer, self.init_range, name)

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments that every quantized `QuantConv` / `QuantDense` of this
        network takes: weight quantizer, per-channel flag, dtype and, with
        ``activation_placement='conv_input'``, its input quantizer."""
        return {
            "per_channel": self.per_channel,
            "weight_quantizer": self.weight_quantizer,
            "quantize_input": self.activation_placement == CONV_INPUT,
            "activation_quantizer": self.activation_quantizer,
            "init_range": self.init_range,
            "dtype": self.dtype,
        }

    def quant_conv(self, features: int, kernel: int, stride: int, padding: int, name: str):
        """A quantized conv with this network's `layer_options`."""
        return QuantConv(
            features,
            (kernel, kernel),
            (stride, stride),
            padding=[(padding, padding)] * 2,
            name=name,
            **self.layer_options(),
        )

    def classify(self, x: jax.Array) -> jax.Array:
        """The full-precision classifier: dense layer, then the optional logit scale."""
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        logits = logits.astype(jnp.float32)
        if self.logit_scale:
            # The authors' CIFAR ResNet multiplies its logits by a learnable scalar.
            scale = self.param("logit_scale", nn.initializers.constant(0.01), (), jnp.float32)
            logits = logits * scale
        return logits

    def batch_norm(self, train: bool, name: str | None = None) -> nn.BatchNorm:
        """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5), never folded."""
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=1e-5,
            dtype=self.dtype,
            name=name,
        )
