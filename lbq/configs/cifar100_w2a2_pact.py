"""CIFAR-100 flagship with PACT activations: PreResNet-20 W2A2, learned activation clips.

The stages and teacher of `cifar100_w2a2.py` (ladder 32 -> 4 -> 2 with a jointly trained
full-precision teacher), with every quantized activation a PACT activation (Choi et al., arXiv
1805.06085; SPEC section 7): ``clip(x, 0, alpha)`` with a learned clip ``alpha``, which starts at
``quant.pact_init_clip`` = 10 from scratch and is learned from the first stage on (at 32 bits
only the clip remains). Weights stay DoReFa's, as in the PACT paper.

Ranges: the defaults measured best on CIFAR-10 fine-tuning (docs/learned_ranges.md,
docs/results/w2a2/): activation ranges by LSQ's rule (quant.activation_calibration='lsq'), and
at a bit-width change LSQ weight ranges set again by LSQ's rule for the new bit-width
(quant.weight_range_at_bit_change='lsq_rule'; activation ranges may be too, with
quant.activation_range_at_bit_change='calibrate', not yet measured on its own).
Activations stay quantized at block outputs (the authors' design); each conv quantizing its own
input (--config.model.activation_placement=conv_input) measured within a point of it at W2A2
there (one seed), not enough to change the recipe.

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_pact.py --workdir=WORKDIR

Tiny variant for tests (a few CPU steps on the embedded digits data):

    python -m lbq.main --config=configs/cifar100_w2a2_pact.py:tiny --workdir=WORKDIR
"""

from lbq.configs import cifar100_w2a2, recipes


def get_config(variant: str = ""):
    c = cifar100_w2a2.get_config()
    c.quant.activation_quantizer = "pact"
    return recipes.finish(c, variant)
