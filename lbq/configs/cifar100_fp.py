"""CIFAR-100, full-precision PreResNet-20 (ReLU): the baseline and the teacher to start from.

Run:

    python -m lbq.main --config=configs/cifar100_fp.py --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.apply_method(
        recipes.cifar100(default.get_config()), "fp", 32, epochs=200, fine_tune_lr=0.01
    )
    return recipes.finish(c, variant)
