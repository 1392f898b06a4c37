"""The authors' released training recipes (SPEC section 5), shared by the paper configs."""

import ml_collections

from lbq.configs import default


def _sgd_nesterov(c: ml_collections.ConfigDict) -> None:
    """The authors' optimizer in both recipes: SGD, Nesterov momentum 0.9, weight decay 1e-4."""
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 1e-4


def cifar100() -> ml_collections.ConfigDict:
    """CIFAR-100: PreResNet-20, SGD Nesterov 0.9, wd 1e-4, batch 128, 200 epochs, lr 0.1,
    x0.1 at epochs 80 and 120, crop 32 with padding 4 + flip, per-channel normalisation.
    Every recipe value is set here, so that a change of `default.get_config()` (the embedded
    CPU job's defaults) never changes a paper config."""
    c = default.get_config()
    c.model.name = "preresnet20"
    c.data.name = "cifar100"
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_size = 32
    c.data.augment = "cifar"
    c.batch_size = 128
    c.eval_batch_size = 500
    _sgd_nesterov(c)
    c.schedule.lr = 0.1
    c.schedule.teacher_lr = 0.1
    c.schedule.lr_schedule = "step"
    c.schedule.lr_boundaries = (0.4, 0.6)  # epochs 80 and 120 of 200
    c.stages = [default.stage("main", epochs=200)]
    c.log_every_steps = 100
    c.eval_every_epochs = 5.0
    c.checkpoint_every_steps = 1000
    return c


def cifar100_method(method: str, bits: int, variant: str) -> ml_collections.ConfigDict:
    """`cifar100` with ``method`` at ``bits`` (`apply_method`: its 200 epochs, fine-tuning
    stages at lr 0.01), then `finish`'s ``variant``: the CIFAR-100 configs of the methods."""
    c = apply_method(cifar100(), method, bits, epochs=200, fine_tune_lr=0.01)
    return finish(c, variant)


# The methods of the paper's comparison, one home for the CIFAR configs and the reproduction
# study (lbq.experiments.reproduce). A ladder is (w_bits, a_bits, share of the run, learning
# rate): None keeps the run's rate; FINE_TUNE marks stages that start from a previous stage's
# weights and train at the fine-tuning rate.
METHODS = ("fp", "direct", "ts", "pq", "sp", "kd", "best")
FINE_TUNE = "fine_tune"


def ladder(method: str, bits: int) -> list[tuple[int, int, float, str | None]]:
    """The stages of ``method`` at ``bits`` (see `METHODS`), trained from scratch."""
    k, ft = bits, FINE_TUNE
    if method in ("fp", "direct", "sp", "kd"):
        return [(32, 32, 1.0, None)] if method == "fp" else [(k, k, 1.0, None)]
    if method == "ts":
        return [(k, 32, 0.5, None), (k, k, 0.5, ft)]
    if method == "pq":
        if k == 2:
            return [(32, 32, 0.4, None), (8, 8, 0.2, ft), (4, 4, 0.2, ft), (2, 2, 0.2, ft)]
        return [(32, 32, 0.4, None), (8, 8, 0.3, ft), (k, k, 0.3, ft)]
    if method == "best":
        if k == 2:
            return [(32, 32, 0.4, None), (4, 4, 0.3, ft), (2, 2, 0.3, ft)]
        return [(32, 32, 0.4, None), (k, k, 0.6, ft)]
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def apply_method(
    c: ml_collections.ConfigDict,
    method: str,
    bits: int,
    *,
    epochs: float,
    fine_tune_lr: float,
) -> ml_collections.ConfigDict:
    """Sets the stages, stochastic precision and distillation of ``method`` at ``bits`` over
    ``epochs`` (split by the ladder's shares); fine-tuning stages train at ``fine_tune_lr``."""
    with_teacher = method in ("kd", "best")
    c.model.quantized = method != "fp"
    if method != "fp":  # a full-precision model ignores them
        c.quant.w_bits = c.quant.a_bits = bits
    stages = []
    for w, a, share, lr in ladder(method, bits):
        rates = {}
        if lr == FINE_TUNE:
            rates = {"lr": fine_tune_lr, **({"teacher_lr": fine_tune_lr} if with_teacher else {})}
        stages.append(
            default.stage(f"w{w}a{a}", w_bits=w, a_bits=a, epochs=round(share * epochs, 6), **rates)
        )
    # A one-stage method keeps its bits in quant.* (the stage inherits them).
    c.stages = stages if len(stages) > 1 else [default.stage("main", epochs=epochs)]
    if method == "sp":
        c.stochastic.enabled = True
        c.stochastic.unit = "block"
        c.stochastic.schedule = "linear"
        c.stochastic.p_start = 0.5
        c.stochastic.full_at = 0.5
    if with_teacher:
        c.distill.enabled = True
        c.distill.teacher = "joint"
    return c


def imagenet() -> ml_collections.ConfigDict:
    """ImageNet fine-tuning of ResNet-18 from a full-precision model: 30 epochs, batch 256, lr
    0.005 (student) / 0.001 (teacher), x0.1 at epochs 15 and 25; random-resized crop 224 + flip,
    test resize 256 and centre crop 224; SGD Nesterov 0.9, wd 1e-4. Set ``init_from`` to an
    `imagenet_fp.py` workdir. Every recipe value is set here, as in `cifar100`."""
    c = default.get_config()
    c.model.name = "resnet18"
    c.data.name = "imagenet2012"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.augment = "imagenet"
    c.data.workers = 16
    c.batch_size = 256
    c.eval_batch_size = 1000
    _sgd_nesterov(c)
    c.schedule.lr = 0.005
    c.schedule.teacher_lr = 0.001
    c.schedule.lr_schedule = "step"
    c.schedule.lr_boundaries = (0.5, 25 / 30)  # epochs 15 and 25 of 30
    c.stages = [default.stage("main", epochs=30)]
    c.log_every_steps = 200
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 2000
    return c


def finish(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Applies a config-file variant: '' (as is), 'resnet50' (ImageNet configs), 'tiny'."""
    variants = ("", "tiny", "resnet50")
    if variant not in variants:
        raise ValueError(f"config variant {variant!r} is not one of {variants}")
    if variant == "resnet50":
        if not c.model.name.startswith("resnet") or c.data.name != "imagenet2012":
            raise ValueError("the 'resnet50' variant is for the ImageNet ResNet configs")
        c.model.name = "resnet50"
    if variant == "tiny":
        c = default.tiny(c)
        if c.model.name.startswith("alexnet"):
            c.model.name = "alexnet_cifar"
        elif c.model.name not in ("resnet20", "preresnet20"):
            c.model.name = "resnet20"
        c.init_from = None
        c.distill.teacher_init = None
        if c.distill.teacher == "frozen":
            c.distill.teacher = "joint"
    return c
