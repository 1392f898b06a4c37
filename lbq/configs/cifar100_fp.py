"""CIFAR-100, full-precision PreResNet-20 (ReLU): the baseline and the teacher to start from.

Run:

    python -m lbq.main --config=configs/cifar100_fp.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("fp", 32, variant)
