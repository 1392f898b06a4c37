"""CIFAR-100 flagship with PACT activations: PreResNet-20 W2A2, learned activation clips.

The stages and teacher of `cifar100_w2a2.py` (ladder 32 -> 4 -> 2 with a jointly trained
full-precision teacher), with every quantized activation a PACT activation (Choi et al., arXiv
1805.06085; SPEC section 7): ``clip(x, 0, alpha)`` with a learned clip ``alpha``, which starts at
``quant.pact_init_clip`` = 10 from scratch and is learned from the first stage on (at 32 bits
only the clip remains). Weights stay DoReFa's, as in the PACT paper.

Clips and placement: what measured best (docs/learned_ranges.md): clips calibrated by LSQ's
rule (the default); each quantized conv quantizing its own input
(``model.activation_placement='conv_input'``); the clips kept at the 4 -> 2 drop (the default:
calibrating them again measured the same, unlike LSQ's activation ranges).

Run:

    python -m lbq.main --config=configs/cifar100_w2a2_pact.py --workdir=WORKDIR
"""

from lbq.configs import cifar100_w2a2, recipes


def get_config(variant: str = ""):
    c = cifar100_w2a2.get_config()
    c.quant.activation_quantizer = "pact"
    c.model.activation_placement = "conv_input"
    return recipes.finish(c, variant)
