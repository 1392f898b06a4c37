"""CIFAR-100 flagship: PreResNet-20 W2A2 with the paper's methods combined.

Combination: the decreasing ladder 32 -> 4 -> 2 with a jointly trained full-precision teacher in
every stage. The paper reports its best low-bit results from progressive quantization guided by
a full-precision network; stochastic precision gives the benefit of progression within a stage,
so it is left out where explicit stages already provide it (turn it on with
--config.stochastic.enabled=True to combine all three). Epochs: 80 at 32 bits (lr 0.1), then 60
at W4A4 and 60 at W2A2 (lr 0.01): 200 in all, as the baseline.

Quantizers and placement: the paper's DoReFa ones at block outputs, so that this config
reproduces the paper; `cifar100_w2a2_lsq.py` and `_pact.py` are this recipe with the quantizers
and placement that measured best (docs/learned_ranges.md).

Run:

    python -m lbq.main --config=configs/cifar100_w2a2.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("best", 2, variant)
