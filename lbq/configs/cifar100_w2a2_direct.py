"""CIFAR-100, PreResNet-20 W2A2 quantized directly: the baseline the methods must beat.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_direct.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_w2a2_direct.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100(default.get_config())
    c.quant.w_bits, c.quant.a_bits = 2, 2
    return recipes.finish(c, variant)
