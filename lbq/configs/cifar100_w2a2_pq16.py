"""CIFAR-100, PreResNet-20 W2A2, progressive: decreasing bit-width 16 -> 8 -> 4 -> 2.

Epochs as `cifar100_w2a2_pq.py` (80, then 40 per lower precision): 16 bits is numerically
indistinguishable from full precision for training, so the split has the same reason.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_pq16.py --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100()
    c.stages = [
        default.stage("w16a16", w_bits=16, a_bits=16, epochs=80),
        default.stage("w8a8", w_bits=8, a_bits=8, epochs=40, lr=0.01),
        default.stage("w4a4", w_bits=4, a_bits=4, epochs=40, lr=0.01),
        default.stage("w2a2", w_bits=2, a_bits=2, epochs=40, lr=0.01),
    ]
    return recipes.finish(c, variant)
