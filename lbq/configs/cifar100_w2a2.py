"""CIFAR-100 flagship: PreResNet-20 W2A2 with the paper's methods combined.

Combination: the decreasing ladder 32 -> 4 -> 2 with a jointly trained full-precision teacher in
every stage. The paper reports its best low-bit results from progressive quantization guided by
a full-precision network; stochastic precision gives the benefit of progression within a stage,
so it is left out where explicit stages already provide it (turn it on with
--config.stochastic.enabled=True to combine all three). Epochs: 80 at 32 bits (lr 0.1), then 60
at W4A4 and 60 at W2A2 (lr 0.01): 200 in all, as the baseline.

Quantizers: the paper's DoReFa ones, so that this config reproduces the paper. They learn no
range, so the calibration and range rules measured best for PACT and LSQ (docs/learned_ranges.md)
do not apply; `cifar100_w2a2_lsq.py` is this recipe with LSQ, the quantizers that measured best.
Placement: block outputs, the authors' design, for the same reason, though each conv
quantizing its own input (``model.activation_placement='conv_input'``) measured better for
DoReFa, PACT and LSQ alike at W2A2 (docs/results/w2a2); the LSQ and PACT recipes use it.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2.py --workdir=WORKDIR
"""

from lbq.configs import recipes


def get_config(variant: str = ""):
    return recipes.cifar100_method("best", 2, variant)
