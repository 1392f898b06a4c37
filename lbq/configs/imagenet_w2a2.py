"""ImageNet flagship: ResNet-18 W2A2 with the paper's methods combined.

Combination: weights-then-activations stages, each guided by a full-precision teacher that
starts from the same full-precision checkpoint and is fine-tuned jointly (lr 0.001, the
authors' ImageNet setting; student lr 0.005). As in the paper, progressive quantization guided by
a full-precision network gives the best low-bit results; stochastic precision can be added with
--config.stochastic.enabled=True. Epochs: 15 at W2A32, then 30 at W2A2 (the full recipe).
Set --config.init_from=WORKDIR_OF_imagenet_fp (the student and, with teacher_init, the teacher).

From torchvision's pretrained ResNet-18, converted, set both to the converted run (README,
"Starting from torchvision or timm weights", gives the commands).

Quantizers and placement: the paper's DoReFa ones at block outputs, so that this config
reproduces the paper; `imagenet_w2a2_lsq.py` and `_pact.py` are this recipe with the quantizers
and placement that measured best (docs/learned_ranges.md).

Run:

    python -m lbq.main --config=configs/imagenet_w2a2.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_w2a2.py:resnet50
"""

from lbq.configs import imagenet_w2a2_ts, recipes


def get_config(variant: str = ""):
    c = imagenet_w2a2_ts.get_config()  # its stages
    c.distill.enabled = True
    c.distill.teacher = "joint"
    return recipes.finish(c, variant)
