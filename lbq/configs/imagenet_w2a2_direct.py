"""ImageNet, ResNet-18 W2A2 quantized directly from a full-precision model (the baseline).

Set --config.init_from=WORKDIR_OF_imagenet_fp, or torchvision's weights converted
(`imagenet_fp.py`).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_direct.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_direct.py:resnet50
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.quant.w_bits, c.quant.a_bits = 2, 2
    return recipes.finish(c, variant)
