"""CIFAR-100, PreResNet-20 W2A2, progressive: decreasing bit-width 32 -> 8 -> 4 -> 2 ("PQ").

Epochs: 80 at 32 bits (lr 0.1), then 40 each at 8, 4 and 2 bits (lr 0.01), all with x0.1 at 40%
and 60% of the stage. The full-precision stage learns the representation; each lower precision
then fine-tunes from the one above, which is the point of the ladder. Total 200 epochs, as the
direct baseline.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_pq.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("pq", 2, variant)
