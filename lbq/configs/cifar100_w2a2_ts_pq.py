"""CIFAR-100, PreResNet-20 W2A2, both progressive schemes: the ladder 32 -> 4 -> 2, and at
each precision the weights first, then the activations.

Epochs: 80 at 32 bits (lr 0.1); then W4A32, W4A4, W2A4, W2A2 for 30 epochs each (lr 0.01).
Every step down changes one operand only, the gentlest path the two schemes allow; the total
stays 200 epochs.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_ts_pq.py --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100()
    c.stages = [
        default.stage("w32a32", w_bits=32, a_bits=32, epochs=80),
        default.stage("w4a32", w_bits=4, a_bits=32, epochs=30, lr=0.01),
        default.stage("w4a4", w_bits=4, a_bits=4, epochs=30, lr=0.01),
        default.stage("w2a4", w_bits=2, a_bits=4, epochs=30, lr=0.01),
        default.stage("w2a2", w_bits=2, a_bits=2, epochs=30, lr=0.01),
    ]
    return recipes.finish(c, variant)
