"""CIFAR-100, full-precision PreResNet-20 (ReLU): the baseline and the teacher to start from.

Run:

    python -m lbq.main --config=configs/cifar100_fp.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_fp.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100(default.get_config())
    c.model.quantized = False
    return recipes.finish(c, variant)
