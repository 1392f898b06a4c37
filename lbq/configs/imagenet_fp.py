"""ImageNet, full-precision ResNet-18 (ReLU): the model the low-bit runs fine-tune from.

90 epochs from scratch, lr 0.1 (batch 256), x0.1 at epochs 30 and 60.

To skip this run, convert torchvision's pretrained weights instead (`python -m lbq.convert
--from=torchvision --model=resnet18 --weights=resnet18.pth --out=RUN`; README, "Starting from
torchvision or timm weights"): RUN is then a step-0 run of this config.

Run:

    python -m lbq.main --config=configs/imagenet_fp.py --workdir=WORKDIR
    # ResNet-50: --config=configs/imagenet_fp.py:resnet50
"""

from lbq.configs import default, recipes


def get_config(variant: str = ""):
    c = recipes.imagenet()
    c.model.quantized = False
    c.schedule.lr = 0.1
    c.schedule.lr_boundaries = (1 / 3, 2 / 3)
    c.stages = [default.stage("main", epochs=90)]
    return recipes.finish(c, variant)
