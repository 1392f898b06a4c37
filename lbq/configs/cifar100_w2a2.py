"""CIFAR-100 flagship: PreResNet-20 W2A2 with the paper's methods combined.

Combination: the decreasing ladder 32 -> 4 -> 2 with a jointly trained full-precision teacher in
every stage. The paper reports its best low-bit results from progressive quantization guided by
a full-precision network; stochastic precision gives the benefit of progression within a stage,
so it is left out where explicit stages already provide it (turn it on with
--config.stochastic.enabled=True to combine all three). Epochs: 80 at 32 bits (lr 0.1), then 60
at W4A4 and 60 at W2A2 (lr 0.01): 200 in all, as the baseline.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_w2a2.py:tiny --workdir=WORKDIR
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.cifar100(default.get_config())
    c.distill.enabled = True
    c.distill.teacher = "joint"
    c.stages = [
        default.stage("w32a32", w_bits=32, a_bits=32, epochs=80),
        default.stage("w4a4", w_bits=4, a_bits=4, epochs=60, lr=0.01, teacher_lr=0.01),
        default.stage("w2a2", w_bits=2, a_bits=2, epochs=60, lr=0.01, teacher_lr=0.01),
    ]
    return recipes.finish(c, variant)
