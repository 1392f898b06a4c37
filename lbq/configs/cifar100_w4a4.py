"""CIFAR-100, PreResNet-20 W4A4 quantized directly (weights and activations from the start).

Run:

    python -m lbq.main --config=configs/cifar100_w4a4.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_w4a4.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100(default.get_config())
    c.quant.w_bits, c.quant.a_bits = 4, 4
    return recipes.finish(c, variant)
