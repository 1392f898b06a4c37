"""CIFAR-100 flagship with LSQ: PreResNet-20 W2A2, learned step sizes for weights and activations.

The stages and teacher of `cifar100_w2a2.py` (ladder 32 -> 4 -> 2 with a jointly trained
full-precision teacher), with LSQ (Esser et al., arXiv 1902.08153; SPEC section 7) for every
quantized conv and activation. At 32 bits LSQ is the identity (weights) or a ReLU
(activations), so the ranges are calibrated on the trained network when the W4A4 stage starts
(`lbq.calibrate`) and are set again by LSQ's rule on the trained network when W2A2 starts.

Ranges and placement: what measured best (docs/learned_ranges.md): LSQ's rule for the
activation ranges and, at each bit-width drop, the weight ranges; each quantized conv quantizing
its own input (``model.activation_placement='conv_input'``), where calibrating the activation
ranges again at the drop too (``quant.activation_range_at_bit_change='calibrate'``) gained 1.7
points.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_lsq.py --workdir=WORKDIR
"""

from lbq.configs import cifar100_w2a2, recipes


def get_config(variant: str = ""):
    c = cifar100_w2a2.get_config()
    c.quant.weight_quantizer = "lsq"
    c.quant.activation_quantizer = "lsq"
    c.model.activation_placement = "conv_input"
    c.quant.activation_range_at_bit_change = "calibrate"
    return recipes.finish(c, variant)
