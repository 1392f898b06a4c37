"""ImageNet, ResNet-18 W4A4, fine-tuned from a full-precision model.

Set --config.init_from=WORKDIR_OF_imagenet_fp.

WORKDIR_OF_imagenet_fp may instead be torchvision's ResNet weights, converted: download them
on a machine with network, then `python -m lbq.convert --from=torchvision --model=resnet18
--weights=resnet18.pth --out=RUN` and set init_from=RUN (README, "Starting from torchvision or
timm weights").

Run:

    python -m lbq.main --config=configs/imagenet_w4a4.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w4a4.py:resnet50

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/imagenet_w4a4.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.imagenet(default.get_config())
    c.quant.w_bits, c.quant.a_bits = 4, 4
    return recipes.finish(c, variant)
