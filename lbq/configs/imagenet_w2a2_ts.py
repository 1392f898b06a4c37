"""ImageNet, ResNet-18 W2A2, weights first then activations, from a full-precision model.

Epochs: 15 at W2A32, then 30 at W2A2 with the full recipe (x0.1 at 15 and 25). Quantizing the
weights of a converged network needs little adaptation; the activations, the harder step, get
the whole 30-epoch recipe. Set --config.init_from=WORKDIR_OF_imagenet_fp, or torchvision's
weights converted (`imagenet_fp.py`).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2_ts.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2_ts.py:resnet50
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.stages = [
        default.stage("w2a32", w_bits=2, a_bits=32, epochs=15, lr_boundaries=(0.5, 0.8)),
        default.stage("w2a2", w_bits=2, a_bits=2, epochs=30),
    ]
    return recipes.finish(c, variant)
