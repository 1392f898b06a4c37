"""CIFAR-100, AlexNet-BN (32x32 variant) W2A2, quantized directly.

Run:

    python -m lbq.main --config=configs/cifar100_alexnet_w2a2.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    c = recipes.cifar100()
    c.model.name = "alexnet_cifar"
    c.quant.w_bits, c.quant.a_bits = 2, 2
    return recipes.finish(c, variant)
