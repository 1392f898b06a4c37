"""CIFAR-100, PreResNet-20 W4A4 quantized directly (weights and activations from the start).

Run:

    python -m lbq.main --config=configs/cifar100_w4a4.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("direct", 4, variant)
