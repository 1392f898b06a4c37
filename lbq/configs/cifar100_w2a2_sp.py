"""CIFAR-100, PreResNet-20 W2A2 with stochastic precision (one stage).

Each residual block runs quantized with probability p(t), linear from 0.5 to 1 over the first
half of the 200 epochs; the second half is fully quantized, so the BatchNorm statistics match
the evaluated network.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_sp.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("sp", 2, variant)
