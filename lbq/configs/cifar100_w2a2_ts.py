"""CIFAR-100, PreResNet-20 W2A2, progressive: weights first, then activations ("TS").

Epochs: 100 with W2A32 (lr 0.1, x0.1 at 40% and 60%), then 100 with W2A2 from those weights
(lr 0.01, same shape). The 200-epoch total matches the direct baseline; the second stage starts
from a converged network, so a tenth of the learning rate fine-tunes rather than restarts.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_ts.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("ts", 2, variant)
