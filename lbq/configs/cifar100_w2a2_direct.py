"""CIFAR-100, PreResNet-20 W2A2 quantized directly: the baseline the methods must beat.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_direct.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("direct", 2, variant)
