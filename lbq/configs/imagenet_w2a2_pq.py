"""ImageNet, ResNet-18 W2A2, decreasing bit-width from a full-precision model: 8 -> 4 -> 2.

The full-precision rung is the `imagenet_fp.py` run given as init_from. Epochs: 10 at W8A8, 15 at
W4A4, 30 at W2A2 (the full recipe at the target precision): higher rungs lose little and need
only short adaptation. Set --config.init_from=WORKDIR_OF_imagenet_fp, or torchvision's
weights converted (`imagenet_fp.py`).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_pq.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_pq.py:resnet50
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.stages = [
        default.stage("w8a8", w_bits=8, a_bits=8, epochs=10, lr_boundaries=(0.5, 0.8)),
        default.stage("w4a4", w_bits=4, a_bits=4, epochs=15, lr_boundaries=(0.5, 0.8)),
        default.stage("w2a2", w_bits=2, a_bits=2, epochs=30),
    ]
    return recipes.finish(c, variant)
