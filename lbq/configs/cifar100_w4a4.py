"""CIFAR-100, PreResNet-20 W4A4 quantized directly (weights and activations from the start).

Run:

    python -m lbq.main --config=configs/cifar100_w4a4.py --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.apply_method(
        recipes.cifar100(default.get_config()), "direct", 4, epochs=200, fine_tune_lr=0.01
    )
    return recipes.finish(c, variant)
