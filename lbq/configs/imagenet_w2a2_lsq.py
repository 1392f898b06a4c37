"""ImageNet flagship with LSQ: ResNet-18 W2A2 fine-tuned with learned step sizes.

The stages and teacher of `imagenet_w2a2.py` (weights-then-activations, jointly fine-tuned
full-precision teacher), with LSQ (SPEC section 7) for every quantized conv and activation. Set
--config.init_from=WORKDIR_OF_imagenet_fp: the weight ranges are calibrated by LSQ's rule before
the first step, the activation ranges on the fine-tuned network when the W2A2 stage starts
(`lbq.calibrate`).

WORKDIR_OF_imagenet_fp may instead be torchvision's ResNet weights, converted (`imagenet_fp.py`).

Ranges: the defaults measured best (docs/learned_ranges.md): activation ranges by LSQ's rule,
LSQ weight ranges set again by it at each bit-width drop.

Placement: each quantized conv quantizes its own input (``model.activation_placement =
'conv_input'``; block outputs, shortcuts and additions stay full precision, as in LSQ and
APoT). With LSQ at W2A2 it measured above the authors' block-output placement for direct
(+0.8 point, two seeds each), joint distillation (+1.4) and the 4 -> 2 ladder with a teacher
(+1.5) on the CIFAR-10 fine-tuning protocol (docs/results/w2a2).

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
