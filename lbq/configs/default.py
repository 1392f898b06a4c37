"""Defaults of every lbq run: ResNet-20, W2A2, on the embedded digits data.

Run (about 2 to 3 minutes on 2 CPU cores; measured in docs/data.md):

    python -m lbq.main --config=configs/default.py --workdir=/tmp/lbq_default

Every other config starts from `get_config()` here and changes what it needs. The comments
beside the fields are their reference; docs/config.md lists the config files and the
command-line override syntax.
"""

import ml_collections


def stage(name, *, w_bits=None, a_bits=None, epochs=None, steps=None, **kwargs):
    """One stage of a run; unset fields take the run's defaults (quant.*, schedule.*).

    Give its length in ``epochs`` or ``steps``; ``steps`` wins when both are set, so a stage
    can be shortened from the command line: ``--config.stages[0].steps=200``. Every field is
    typed (an unset one is a typed placeholder), so each can be overridden that way.
    """
    placeholder = ml_collections.config_dict.placeholder
    entry = ml_collections.ConfigDict(
        {
            "name": name,
            "w_bits": placeholder(int),
            "a_bits": placeholder(int),
            "epochs": placeholder(float),
            "steps": placeholder(int),
            "block_bits": {},
            "lr": placeholder(float),
            "teacher_lr": placeholder(float),
            "lr_schedule": placeholder(str),
            "lr_boundaries": placeholder(tuple),
            "lr_decay": placeholder(float),
            "warmup_epochs": placeholder(float),
        }
    )
    given = {"w_bits": w_bits, "a_bits": a_bits, "epochs": epochs, "steps": steps, **kwargs}
    for key, value in given.items():
        if value is None:
            continue
        try:
            entry[key] = value
        except TypeError:
            raise ValueError(
                f"stage {name!r}: {key}={value!r} has type {type(value).__name__}; "
                f"expected {entry.get_type(key).__name__}"
            ) from None
    return entry


def _model_fields() -> ml_collections.ConfigDict:
    """The network: its name and how it is quantized."""
    f = ml_collections.ConfigDict()
    f.name = "resnet20"  # resnet20/32/56, preresnet20, resnet18/34/50, alexnet, alexnet_cifar
    f.quantized = True  # False: the full-precision network with plain ReLU
    f.per_channel = False  # per-output-channel weight scale instead of per tensor
    f.logit_scale = False  # learnable output scalar (init 0.01), as the authors' CIFAR code
    f.shortcut = "A"  # CIFAR ResNets: 'A' zero-pad identity, 'B' 1x1 conv (quantized)
    # Where activations are quantized (SPEC section 9, docs/learned_ranges.md): 'block_output'
    # (the authors': every block activation) or 'conv_input' (each quantized conv's own input).
    f.activation_placement = "block_output"
    return f


def _data_fields() -> ml_collections.ConfigDict:
    """The dataset and its input pipeline."""
    f = ml_collections.ConfigDict()
    f.name = "digits"  # embedded; or a TFDS name: cifar10, cifar100, imagenet2012, ...
    f.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data directory of `name`
    f.train_split = "train"  # TFDS split names, slices allowed: "train[:5000]"
    f.eval_split = "test"
    f.image_size = 32  # the network's input size in pixels
    f.augment = "none"  # "cifar" (crop 32 pad 4 + flip), "imagenet", "none" (digits: no flips)
    f.on_device = False  # keep the whole split on the accelerators (CIFAR scale)
    f.workers = 4  # host threads for decoding and augmentation (0: none)
    # Decode the train split into memory once; None: automatically for small images (<= 64 px).
    f.cache = ml_collections.config_dict.placeholder(bool)
    # Input normalisation, per RGB channel in 0..255 units; unset: the dataset's statistics. A
    # network converted from PyTorch (python -m lbq.convert) records the one its weights expect.
    f.mean = ml_collections.config_dict.placeholder(tuple)
    f.std = ml_collections.config_dict.placeholder(tuple)
    return f


def _quant_fields() -> ml_collections.ConfigDict:
    """The student's default bit-widths and its quantizers (SPEC sections 1 and 7); the
    learned-range fields, and which values measured best: docs/learned_ranges.md."""
    f = ml_collections.ConfigDict()
    f.w_bits = 2  # default weight bit-width of every stage: 1 to 32, 32 = full precision
    f.a_bits = 2  # default activation bit-width of every stage: 1 to 32
    f.weight_quantizer = "dorefa"  # 'dorefa' (the paper's) or 'lsq' (learned step, >= 2 bits)
    f.activation_quantizer = "dorefa"  # 'dorefa' clip(0, 1), 'pact' or 'lsq' (learned)
    f.pact_init_clip = 10.0  # > 0: PACT's clip from scratch (PACT paper); LSQ: first batch
    f.calibration_batches = 4  # batches that calibrate the learned ranges of an init_from run
    f.activation_calibration = "lsq"  # an activation's range: 'lsq' (LSQ's rule) or 'percentile'
    f.calibration_percentile = 99.99  # the percentile of the 'percentile' rule, in (0, 100]
    # At a stage that changes a learned range's bit-width (no effect on DoReFa, SPEC section 7):
    f.weight_range_at_bit_change = "lsq_rule"  # LSQ weights: set again by LSQ's rule, or 'keep'
    f.activation_range_at_bit_change = "keep"  # PACT/LSQ activations: 'keep' or 'calibrate'
    return f


def _stochastic_fields() -> ml_collections.ConfigDict:
    """Stochastic precision (SPEC section 3): which units run quantized at each step."""
    f = ml_collections.ConfigDict()
    f.enabled = False
    f.unit = "block"  # 'block' or 'layer'
    f.schedule = "linear"  # 'constant', 'linear', 'step'
    f.p_start = 0.5
    f.full_at = 0.5  # fraction of each stage from which everything is quantized
    f.num_steps = 4  # increments of the 'step' schedule
    return f


def _distill_fields() -> ml_collections.ConfigDict:
    """Joint knowledge distillation (SPEC section 4): the teacher and the loss weights."""
    f = ml_collections.ConfigDict()
    f.enabled = False
    f.teacher = "joint"  # 'joint' (from scratch or init), 'frozen'
    f.teacher_init = ml_collections.config_dict.placeholder(str)  # a workdir or checkpoint
    f.student_ce = 0.7
    f.student_kl = 0.7
    f.student_att = 0.0
    f.teacher_ce = 1.0
    f.teacher_kl = 0.5
    f.teacher_att = 0.0
    f.temperature = 1.0
    f.extra_students = ()  # e.g. ((4, 4),): more students with fixed (w_bits, a_bits)
    return f


def get_config(variant: str = ""):
    """The default run; ``variant='tiny'`` (``--config=configs/default.py:tiny``) for tests."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # initialisation, data order, augmentation and stochastic-precision masks

    c.model = _model_fields()
    c.data = _data_fields()
    c.quant = _quant_fields()
    c.batch_size = 128  # global batch, over all devices and hosts (a multiple of the devices)
    c.compute_dtype = "auto"  # 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32', 'bfloat16'

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # 'sgd' (momentum, Nesterov) or 'adam'
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 1e-4

    c.schedule = ml_collections.ConfigDict()  # defaults of every stage's schedule
    c.schedule.lr = 0.1  # student's base learning rate
    c.schedule.teacher_lr = 0.1
    c.schedule.lr_schedule = "step"  # 'step', 'cosine', 'constant'
    # Fractions of each stage; the CIFAR recipe: x0.1 at 80 and 120 of 200 epochs
    c.schedule.lr_boundaries = (0.4, 0.6)
    c.schedule.lr_decay = 0.1
    c.schedule.warmup_epochs = 0.0

    # The run's stages in order: stage(name, w_bits=, a_bits=, epochs= or steps=, lr=,
    # teacher_lr=, block_bits={block: (w_bits, a_bits)}, lr_schedule=, ...); see `stage`.
    c.stages = [stage("main", epochs=30)]

    c.stochastic = _stochastic_fields()
    c.distill = _distill_fields()
    # Start every network from another run's workdir (e.g. a full-precision model)
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.log_every_steps = 20  # train metrics every this many steps
    c.eval_every_epochs = 4.0  # and always at the end of each stage
    c.eval_batch_size = 500  # global, like batch_size
    c.eval = ml_collections.ConfigDict()
    c.eval.recalibrate_bn_batches = 0  # BatchNorm re-estimated on N train batches per eval, 0: off
    c.checkpoint_every_steps = 200  # and at the end of each stage
    c.keep_checkpoints = 3  # the newest checkpoints kept in WORKDIR/checkpoints
    c.on_nonfinite = "stop"  # 'stop' or 'skip'
    c.on_config_change = "refuse"  # resuming with another config: 'refuse', 'continue', 'overwrite'
    c.distributed = False  # call jax.distributed.initialize() (also: LBQ_DISTRIBUTED=1)
    c.progress = True  # console progress bar on host 0
    return tiny(c) if variant == "tiny" else c


def tiny(c):
    """Shrinks a config to a few CPU steps on the embedded data, for tests."""
    c.data.name = "digits"
    c.data.data_dir = None
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.image_size = 32
    c.data.augment = "cifar"
    c.batch_size = 32
    c.eval_batch_size = 128
    for entry in c.stages:
        entry.epochs, entry.steps = None, 3
    c.log_every_steps = 3
    c.checkpoint_every_steps = 3
    c.eval_every_epochs = 0.0
    c.progress = False
    return c
