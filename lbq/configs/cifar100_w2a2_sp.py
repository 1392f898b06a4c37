"""CIFAR-100, PreResNet-20 W2A2 with stochastic precision (one stage).

Each residual block runs quantized with probability p(t), linear from 0.5 to 1 over the first
half of the 200 epochs; the second half is fully quantized, so the BatchNorm statistics match
the evaluated network.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_sp.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_w2a2_sp.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100(default.get_config())
    c.quant.w_bits, c.quant.a_bits = 2, 2
    c.stochastic.enabled = True
    c.stochastic.unit = "block"
    c.stochastic.schedule = "linear"
    c.stochastic.p_start = 0.5
    c.stochastic.full_at = 0.5
    return recipes.finish(c, variant)
