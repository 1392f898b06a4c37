"""Load a run: its config, networks, bit-widths and trained variables, from the workdir.

This is the one module of lbq.deploy that uses the trainer's building blocks (lbq.plan,
lbq.trainer, lbq.stages, lbq.train); everything else in lbq.deploy works from what it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lbq import data as lbq_data
from lbq.checkpoint import CheckpointError, load_saved_variables
from lbq.deploy.errors import DeployError, read_json
from lbq.plan import parse_config
from lbq.quant.precision import make_precision
from lbq.stages import Stage, lay_out, stage_at
from lbq.steps import Network
from lbq.train_state import TrainState
from lbq.trainer import Trainer, build_trainer, evaluate_split, host_stage_bits
from lbq.validate import ConfigError

log = logging.getLogger("lbq")

CONFIG_FILE = "config.json"  # written by the trainer into every workdir
# Errors of the trainer's modules that a user's run folder can cause.
RUN_ERRORS = (ConfigError, CheckpointError)


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, loaded for evaluation or export.

    Attributes:
      workdir: the run's folder.
      step: the checkpoint's global step.
      config: the run's config (from ``config.json``, with any data overrides).
      plan: the config, parsed (`lbq.plan.RunPlan`).
      info: its dataset's description (classes, image shape, mean/std).
      trainer: its networks and compiled eval step (`lbq.trainer.Trainer`).
      stage: the stage the checkpoint was trained in (its bit-widths are the run's).
      variables: {network: {'params', 'batch_stats'}} as NumPy arrays.
    """

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    plan: Any
    info: lbq_data.DatasetInfo
    trainer: Trainer
    stage: Stage
    variables: dict[str, dict[str, Any]]

    @property
    def networks(self) -> tuple[Network, ...]:
        return self.trainer.networks

    @property
    def students(self) -> tuple[Network, ...]:
        return tuple(n for n in self.networks if not n.teacher)

    def bits(
        self, w_bits: int | None = None, a_bits: int | None = None
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{student: (w_bits [L], a_bits [L])}: the checkpoint stage's, or the given ones."""
        bits = host_stage_bits(self.stage, self.networks)
        if w_bits is None and a_bits is None:
            return bits
        out = {}
        for net in self.students:
            w, a = bits[net.name]
            p = make_precision(
                net.model.layer_names(),
                int(w[0]) if w_bits is None else w_bits,
                int(a[0]) if a_bits is None else a_bits,
            )
            out[net.name] = (p.w_bits, p.a_bits)
        return out

    def model_description(self) -> dict[str, Any]:
        """The student's architecture: `lbq.models.get_model` name and options."""
        return {"name": self.plan.model.name, **self.plan.model.kwargs()}

    def preprocessing(self) -> dict[str, Any]:
        """How eval images are prepared (`lbq.data.transforms.eval_transform`)."""
        return {
            "image_size": int(self.info.image_shape[0]),
            "imagenet_style": self.plan.data.augment == "imagenet",
        }

    def eval_images(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``count`` images (uint8 NHWC, eval-preprocessed) and labels of the eval
        split."""
        batches = lbq_data.eval_iterator(self.plan.data, global_batch=count)
        try:
            batch = next(iter(batches))
        finally:
            batches.close()
        return batch["image"][batch["mask"]], batch["label"][batch["mask"]]

    def quantizers(self) -> tuple[str, str]:
        """(weight quantizer, activation quantizer) names."""
        return self.plan.model.weight_quantizer, self.plan.model.activation_quantizer


def _merged(defaults: dict[str, Any], recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``recorded`` over ``defaults``, section by section (lists and values are replaced)."""
    out = dict(defaults)
    for key, value in recorded.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def read_config(workdir: str, data_overrides: Mapping[str, Any] | None = None):
    """The run's config from ``WORKDIR/config.json``, with ``data.*`` fields replaced.

    Fields that lbq added after the run was recorded take their defaults
    (lbq/configs/default.py): the run was trained with that behaviour.

    Raises:
      DeployError: when the file is missing or not JSON.
    """
    from lbq.configs import default

    path = os.path.join(workdir, CONFIG_FILE)
    recorded = read_json(path, f"{workdir} has no {CONFIG_FILE}: not an lbq run folder")
    if not isinstance(recorded, dict):
        raise DeployError(f"{path} does not hold a config (a JSON object)")
    config = ml_collections.ConfigDict(_merged(default.get_config().to_dict(), recorded))
    for key, value in (data_overrides or {}).items():
        if value is not None:
            config.data[key] = value
    return config


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved in ``WORKDIR/checkpoints``, oldest first."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    )


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, {network: variables}) of the newest readable checkpoint, or of ``step``.

    Newer unreadable checkpoints are skipped with a warning each
    (`lbq.checkpoint.load_saved_variables`); nothing in the workdir is changed.

    Raises:
      DeployError: naming the workdir when it has no readable checkpoint (or not ``step``).
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise DeployError(f"no checkpoint in {workdir} ({directory} does not exist)")
    path = directory  # the newest: lbq.checkpoint lists what a running trainer saves meanwhile
    if step is not None:
        saved = checkpoint_steps(workdir)
        if step not in saved:
            raise DeployError(f"{directory} has no checkpoint of step {step} (saved: {saved})")
        path = os.path.join(directory, str(step))
    try:
        saved_step, variables = load_saved_variables(path)
    except CheckpointError as error:
        raise DeployError(str(error)) from None
    return saved_step, jax.device_get(variables)


def load_run(workdir: str, step: int | None = None, data_dir: str | None = None) -> Run:
    """Loads a run's config, networks, dataset description and checkpoint.

    Args:
      workdir: the run's folder (``config.json`` and ``checkpoints/``).
      step: a saved step; the newest readable one by default.
      data_dir: where the run's dataset lives now, if it moved.

    Raises:
      DeployError: for a missing or unreadable config or checkpoint, or a checkpoint that
        does not hold the run's networks.
      lbq.data.DataError: when the run's dataset cannot be opened.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise DeployError(f"workdir {workdir} does not exist")
    config = read_config(workdir, {"data_dir": data_dir})
    try:
        plan = parse_config(config)
        info = lbq_data.get_info(plan.data)
        stages = lay_out(plan.stages, plan.steps_per_epoch(info.num_train))
    except (ConfigError, ValueError) as error:
        if isinstance(error, lbq_data.DataError):
            raise
        raise DeployError(f"{os.path.join(workdir, CONFIG_FILE)}: {error}") from None
    saved_step, variables = load_checkpoint(workdir, step)
    trainer = build_trainer(plan, info, donate=False)
    for net in trainer.networks:
        if net.name not in variables:
            raise DeployError(
                f"checkpoint step {saved_step} in {workdir} has no variables of network "
                f"{net.name!r} (it has {sorted(variables)})"
            )
    # A checkpoint saved at a stage's last step holds that stage's training.
    stage = stage_at(stages, max(saved_step - 1, 0))
    return Run(workdir, saved_step, config, plan, info, trainer, stage, variables)


def evaluate(
    run: Run,
    bits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    data_overrides: Mapping[str, Any] | None = None,
    recalibrate_bn_batches: int | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Top-1, top-5 and loss of every network of the run, as the trainer evaluates.

    Args:
      run: from `load_run`.
      bits: per-student bit-widths (`Run.bits`).
      data_overrides: ``data.*`` fields to evaluate on instead (eval_split, name, data_dir);
        the images are normalised with the run's own mean/std.
      recalibrate_bn_batches: re-estimate the BatchNorm statistics over this many training
        batches first (`lbq.trainer.Trainer.evaluation_state`); None keeps the run's own
        ``eval.recalibrate_bn_batches``.

    Returns:
      ({network: {'top1', 'top5', 'loss'}}, the data settings evaluated on).

    Raises:
      DeployError: when the other dataset has a different number of classes.
    """
    config = ml_collections.ConfigDict(run.config.to_dict())
    for key, value in (data_overrides or {}).items():
        if value is not None:
            config.data[key] = value
    if recalibrate_bn_batches is not None:
        config.eval.recalibrate_bn_batches = recalibrate_bn_batches
    try:
        plan = parse_config(config)
    except ConfigError as error:
        raise DeployError(str(error)) from None
    info = lbq_data.get_info(plan.data)
    if info.num_classes != run.info.num_classes:
        raise DeployError(
            f"dataset {plan.data.name!r} has {info.num_classes} classes, the run's networks "
            f"{run.info.num_classes}"
        )
    info = dataclasses.replace(info, mean=run.info.mean, std=run.info.std)
    trainer = build_trainer(plan, info, donate=False)
    state = TrainState(
        step=jnp.int32(run.step),
        params={name: v["params"] for name, v in run.variables.items()},
        batch_stats={name: v.get("batch_stats", {}) for name, v in run.variables.items()},
        opt_state=None,
        first_nonfinite=jnp.int32(-1),
    )
    state = jax.device_put(state, trainer.replicated)
    bits = jax.device_put(dict(bits), trainer.replicated)
    state = trainer.evaluation_state(state, bits)  # BatchNorm re-estimation, when asked for
    result = evaluate_split(trainer, state, bits)
    return result, {
        "name": plan.data.name,
        "data_dir": plan.data.data_dir,
        "split": plan.data.eval_split,
        "images": info.num_eval,
        "recalibrate_bn_batches": int(config.eval.recalibrate_bn_batches),
    }


def class_names(run: Run) -> list[str]:
    """The label names of the run's dataset (digits: '0'..'9'; TFDS: its ClassLabel names)."""
    settings = run.plan.data
    if settings.name == "digits":
        return [str(i) for i in range(run.info.num_classes)]
    import tensorflow_datasets as tfds

    builder = tfds.builder(settings.name, data_dir=settings.data_dir)
    labels = [f for f in builder.info.features.values() if isinstance(f, tfds.features.ClassLabel)]
    names = list(labels[0].names) if labels else []
    if len(names) != run.info.num_classes:
        return [str(i) for i in range(run.info.num_classes)]
    return names
