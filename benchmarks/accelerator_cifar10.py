"""CIFAR-10 ResNet-20 runs of the accelerator suite's accuracy part, as an lbq config file.

The variant after the colon names the method and its length in steps:

    python -m lbq.main --config=benchmarks/accelerator_cifar10.py:best,steps=1170 \\
        --workdir=DIR --config.data.data_dir=TFDS_DIR --config.init_from=FP_WORKDIR

Methods (``steps`` is the run's total; SPEC sections 2 and 4):

- ``fp``: the full-precision network with plain ReLU (the baseline and the start model).
- ``fp_clip``: the quantized network at 32 bits (clip(0, 1) activations), a start model whose
  nonlinearity the quantized runs keep.
- ``w2a2``, ``w4a4``: quantized directly (weights and activations from the first step).
- ``best``: the combination of the flagship config (lbq/configs/cifar100_w2a2.py) started
  from a trained model: the ladder w4a4 -> w2a2 (half the steps each) with a jointly trained
  full-precision teacher.

Everything else is the CIFAR recipe of docs/accelerator.md ("accuracy"), evaluated at the end
of each stage only; learning rates, batch, data and start models are ``--config.*`` overrides.
"""

from __future__ import annotations

METHODS = ("fp", "fp_clip", "w2a2", "w4a4", "best")


def parse_variant(variant: str) -> tuple[str, int]:
    """'best,steps=1170' -> ('best', 1170).

    Raises:
      ValueError: for an unknown method, a missing or non-positive ``steps``, or another key.
    """
    method, *pairs = [p.strip() for p in variant.split(",") if p.strip()] or [""]
    if method not in METHODS:
        raise ValueError(f"accelerator_cifar10: method {method!r} is not one of {METHODS}")
    fields = dict(p.partition("=")[::2] for p in pairs)
    unknown = sorted(set(fields) - {"steps"})
    if unknown:
        raise ValueError(f"accelerator_cifar10: unknown variant keys {unknown}; only 'steps'")
    try:
        steps = int(fields.get("steps", ""))
    except ValueError:
        raise ValueError(
            f"accelerator_cifar10: variant {variant!r} needs steps=N (a whole number)"
        ) from None
    if steps < 1:
        raise ValueError(f"accelerator_cifar10: steps={steps} must be >= 1")
    return method, steps


def get_config(variant: str = "fp,steps=390"):
    from lbq.configs import default

    method, steps = parse_variant(variant)
    c = default.get_config()
    c.model.name = "resnet20"
    c.model.shortcut = "A"
    c.model.quantized = method != "fp"
    c.data.update(name="cifar10_jpeg", train_split="train", eval_split="test", image_size=32)
    c.data.update(augment="cifar", on_device=True)
    c.update(batch_size=128, eval_batch_size=1000)
    c.schedule.update(lr=0.1, teacher_lr=0.1, lr_schedule="cosine")
    if method != "best":
        bits = 32 if method.startswith("fp") else int(method[1])
        c.stages = [default.stage(method, w_bits=bits, a_bits=bits, steps=steps)]
    else:
        first = max(steps // 2, 1)
        c.distill.enabled = True
        c.distill.teacher = "joint"
        c.stages = [
            default.stage("w4a4", w_bits=4, a_bits=4, steps=first),
            default.stage("w2a2", w_bits=2, a_bits=2, steps=max(steps - first, 1)),
        ]
    c.eval_every_epochs = 0.0  # evaluate at the end of each stage
    c.checkpoint_every_steps = 1_000_000  # the stage ends save; nothing else is needed
    c.update(log_every_steps=50, keep_checkpoints=1, progress=False)
    return c
