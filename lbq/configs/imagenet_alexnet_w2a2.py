"""ImageNet, AlexNet-BN W2A2, fine-tuned from a full-precision AlexNet-BN.

Set --config.init_from=WORKDIR of a full-precision run (imagenet_fp.py with
--config.model.name=alexnet).

torchvision's AlexNet converts (`python -m lbq.convert --model=alexnet`), but it has no
BatchNorm: the converted AlexNet-BN is exact in evaluation only (docs/convert.md, "AlexNet").

Run:

    python -m lbq.main --config=configs/imagenet_alexnet_w2a2.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.model.name = "alexnet"
    c.quant.w_bits, c.quant.a_bits = 2, 2
    return recipes.finish(c, variant)
