"""CIFAR-100, PreResNet-20 W2A2 quantized directly: the baseline the methods must beat.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_direct.py --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.apply_method(
        recipes.cifar100(default.get_config()), "direct", 2, epochs=200, fine_tune_lr=0.01
    )
    return recipes.finish(c, variant)
