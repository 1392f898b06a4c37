"""ImageNet, ResNet-18 W4A4, fine-tuned from a full-precision model.

Set --config.init_from=WORKDIR_OF_imagenet_fp, or torchvision's weights converted
(`imagenet_fp.py`).

Run:

    python -m lbq.main --config=configs/imagenet_w4a4.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w4a4.py:resnet50
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.quant.w_bits, c.quant.a_bits = 4, 4
    return recipes.finish(c, variant)
