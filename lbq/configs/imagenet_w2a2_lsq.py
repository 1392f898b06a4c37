"""ImageNet flagship with LSQ: ResNet-18 W2A2 fine-tuned with learned step sizes.

The stages and teacher of `imagenet_w2a2.py` (weights-then-activations, jointly fine-tuned
full-precision teacher), with LSQ (SPEC section 7) for every quantized conv and activation. Set
--config.init_from=WORKDIR_OF_imagenet_fp: the weight ranges are calibrated by LSQ's rule before
the first step, the activation ranges on the fine-tuned network when the W2A2 stage starts
(`lbq.calibrate`).

Ranges and placement: what measured best (docs/learned_ranges.md): LSQ's rule for the
activation ranges and, at each bit-width drop, the weight ranges (the defaults); each quantized
conv quantizing its own input (``model.activation_placement='conv_input'``).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_lsq.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_lsq.py:resnet50
"""

from lbq.configs import imagenet_w2a2, recipes


def get_config(variant: str = ""):
    c = imagenet_w2a2.get_config()
    c.quant.weight_quantizer = "lsq"
    c.quant.activation_quantizer = "lsq"
    c.model.activation_placement = "conv_input"
    return recipes.finish(c, variant)
