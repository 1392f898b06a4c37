"""ImageNet flagship with PACT activations: ResNet-18 W2A2 fine-tuned with learned clips.

The stages and teacher of `imagenet_w2a2.py` (weights-then-activations, jointly fine-tuned
full-precision teacher), with every quantized activation a PACT activation (SPEC section 7).
Weights stay DoReFa's, as in the PACT paper. Set --config.init_from=WORKDIR_OF_imagenet_fp: the
clips are then calibrated on that model's own activations before the first step
(``quant.activation_calibration``, ``quant.calibration_batches``; `lbq.calibrate`).

Clips and placement: what measured best (docs/learned_ranges.md): clips calibrated by LSQ's
rule (the default); each quantized conv quantizing its own input
(``model.activation_placement='conv_input'``).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_pact.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_pact.py:resnet50
"""

from lbq.configs import imagenet_w2a2, recipes


def get_config(variant: str = ""):
    c = imagenet_w2a2.get_config()
    c.quant.activation_quantizer = "pact"
    c.model.activation_placement = "conv_input"
    return recipes.finish(c, variant)
