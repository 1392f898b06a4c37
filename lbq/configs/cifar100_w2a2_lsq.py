"""CIFAR-100 flagship with LSQ: PreResNet-20 W2A2, learned step sizes for weights and activations.

The stages and teacher of `cifar100_w2a2.py` (ladder 32 -> 4 -> 2 with a jointly trained
full-precision teacher), with LSQ (Esser et al., arXiv 1902.08153; SPEC section 7) for every
quantized conv and activation. At 32 bits LSQ is the identity (weights) or a ReLU
(activations), so the ranges are calibrated on the trained network when the W4A4 stage starts
(`lbq.calibrate`) and are set again by LSQ's rule on the trained network when W2A2 starts.

Ranges: what measured best (docs/learned_ranges.md): activation ranges by LSQ's rule, LSQ weight
ranges set again by it at each bit-width drop, and, with conv inputs quantized, activation
ranges calibrated again at the drop too (``quant.activation_range_at_bit_change='calibrate'``:
+1.7 points over keeping them in the 4 -> 2 ladder at conv inputs, the same run up to the drop;
at block outputs keeping them, the default, measured better).

Placement: each quantized conv quantizes its own input (``model.activation_placement =
'conv_input'``; block outputs, shortcuts and additions stay full precision, as in LSQ and
APoT). With LSQ at W2A2 it measured above the authors' block-output placement for direct
(+0.8 point, two seeds each), joint distillation (+1.4) and the 4 -> 2 ladder with a teacher
(+1.5) on the CIFAR-10 fine-tuning protocol (docs/results/w2a2).

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
