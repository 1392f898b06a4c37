"""ImageNet, ResNet-18 W2A2 with stochastic precision, from a full-precision model.

Blocks run quantized with probability linear from 0.5 to 1 over the first half of the 30
epochs; the second half is fully quantized. Set --config.init_from=WORKDIR_OF_imagenet_fp, or
torchvision's weights converted (`imagenet_fp.py`).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_sp.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_sp.py:resnet50
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.quant.w_bits, c.quant.a_bits = 2, 2
    c.stochastic.enabled = True
    c.stochastic.full_at = 0.5
    return recipes.finish(c, variant)
