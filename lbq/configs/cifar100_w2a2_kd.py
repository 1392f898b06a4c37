"""CIFAR-100, PreResNet-20 W2A2 student trained jointly with a full-precision teacher.

The authors' CIFAR-100 weights: teacher 1.0 CE + 0.5 KL, student 0.7 CE + 0.7 KL, T = 1; both
networks from scratch, 200 epochs, lr 0.1 each.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_kd.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("kd", 2, variant)
