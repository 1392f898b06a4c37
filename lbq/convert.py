"""Start from the pretrained networks users already have: torchvision and timm weights.

    python -m lbq.convert --from=torchvision --model=resnet18 --weights=resnet18.pth --out=RUN

reads a PyTorch state_dict and writes an lbq run folder: ``RUN/config.json`` (a full-precision
run of the network on ImageNet, `configs/imagenet_fp.py`, recording the input normalisation the
weights expect in ``data.mean``/``data.std``) and a step-0 checkpoint (`lbq.checkpoint`). That
folder is a run like any other: ``init_from``, ``distill.teacher_init``, ``lbq.evaluate``,
``lbq.export`` and ``lbq.experiments.probe`` take it.

Networks: ``--from=torchvision`` ResNet-18/34/50 (``torchvision.models.resnet*``) and AlexNet
(``torchvision.models.alexnet``); ``--from=timm`` resnet18/34/50 (``timm.create_model``; the
same keys as torchvision's). lbq's ResNets are torchvision's (7x7 stem, max-pool 3x3 stride 2
padding 1, stride on the 3x3 conv of ResNet-50's bottleneck, 1x1 conv + BatchNorm downsample,
BatchNorm epsilon 1e-5 and momentum 0.1 in PyTorch's convention), so the converted network
computes torchvision's logits. lbq's ``alexnet`` is AlexNet-BN, the paper's network, and
torchvision's AlexNet has no BatchNorm but biases: each bias is held by the BatchNorm after
its layer, set to scale 1, running mean 0 and running variance ``1 - epsilon``, which is exact
with running statistics (evaluation, export, the probe's first column) but not in training,
where BatchNorm normalises by the batch's statistics (docs/convert.md, "AlexNet").

Files: ``.pth``/``.pt``/``.bin`` (``torch.save``) are read with
``torch.load(weights_only=True)``, which never runs pickled code; ``.safetensors`` with the
``safetensors`` package's NumPy API, without torch. A ``module.`` prefix (DataParallel, DDP) or
``_orig_mod.`` prefix (``torch.compile``) is removed, and a checkpoint dict holding the weights
under ``state_dict`` or ``model`` is accepted. Install with ``pip install -e '.[convert]'``.

Bad input raises `ConvertError` with one line naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lbq.io import sha256

SOURCES = ("torchvision", "timm")
MODELS = {
    "torchvision": ("resnet18", "resnet34", "resnet50", "alexnet"),
    "timm": ("resnet18", "resnet34", "resnet50"),
}
# torchvision's and timm's ImageNet normalisation (0.485, 0.456, 0.406) and (0.229, 0.224,
# 0.225), in lbq's 0..255 units.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
BATCH_NORM_EPSILON = 1e-5  # PyTorch's default, and lbq's (`lbq.models.common`)
_CHECKPOINT_KEYS = ("state_dict", "model")  # where training scripts keep the weights
_PREFIXES = ("module.", "_orig_mod.")
_RESNET_STAGES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class ConvertError(ValueError):
    """Weights that cannot be converted; the message is one line naming the file and key."""


# ----------------------------------------------------------------------------- reading


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state_dict file as float32 NumPy arrays, by key.

    Args:
      path: a ``.safetensors`` file (read without torch), or a ``torch.save`` file read with
        ``torch.load(weights_only=True)``: a state_dict, or a dict holding one under
        ``state_dict`` or ``model``. ``module.``/``_orig_mod.`` prefixes are removed and
        ``num_batches_tracked`` counters dropped.

    Returns:
      {key: float32 array in PyTorch's layout (conv weights OIHW, linear weights [out, in])}.

    Raises:
      ConvertError: for a missing or unreadable file, a pickled model or other Python object,
        or a file that is not a state_dict.
    """
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        raw = _read_safetensors(path)
    else:
        raw = _read_torch(path)
    for key in _CHECKPOINT_KEYS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not raw:
        what = "an empty dict" if isinstance(raw, Mapping) else f"a {type(raw).__name__}"
        raise ConvertError(f"{path}: holds {what}, not a state_dict (tensors by parameter name)")
    out = {}
    for key, value in raw.items():
        array = _as_array(value)
        if not isinstance(key, str) or array is None:
            raise ConvertError(
                f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor: not a "
                f"state_dict (keys found: {_some(raw)})"
            )
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name.endswith("num_batches_tracked"):
            continue
        out[name] = array
    return out


def _some(keys: Any, count: int = 4) -> str:
    keys = [str(k) for k in keys]
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConvertError(
            f"{path}: reading .safetensors needs the safetensors package "
            "(pip install -e '.[convert]')"
        ) from None
    try:
        return load_file(path)
    except Exception as error:  # noqa: BLE001 - safetensors' own error types vary
        raise ConvertError(_unreadable(path, "safetensors", error)) from None


def _read_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise ConvertError(
            f"{path}: reading a torch.save file needs torch (pip install -e '.[convert]'), or "
            "convert it to .safetensors first"
        ) from None
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ConvertError(
                f"{path}: holds a pickled {found.group(1)} object, not a state_dict; in PyTorch "
                "save model.state_dict() instead (lbq never unpickles code)"
            ) from None
        reason = text.split("WeightsUnpickler error:")[-1] if "WeightsUnpickler" in text else text
        raise ConvertError(_unreadable(path, "torch.save", reason)) from None
    except Exception as error:  # noqa: BLE001 - zip, EOF, runtime errors: all "unreadable"
        raise ConvertError(_unreadable(path, "torch.save", error)) from None


def _unreadable(path: str, kind: str, error: Any) -> str:
    return f"{path}: not a readable {kind} file ({_first_line(error)})"


def _first_line(error: Any) -> str:
    text = str(error).strip()
    line = text.splitlines()[0].strip() if text else type(error).__name__
    return line[:200]


def _as_array(value: Any) -> np.ndarray | None:
    """A float32 copy of a tensor or array; None for anything else."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        # float() first: NumPy has no bfloat16.
        return value.detach().cpu().float().numpy()
    return None


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one PyTorch tensor goes in lbq's variables.

    Attributes:
      key: the PyTorch key ('layer1.0.conv1.weight').
      collection: 'params' or 'batch_stats'.
      path: the module path and leaf in lbq ('stage1_block0_conv1', 'kernel').
      to_lbq: PyTorch layout -> lbq layout.
      torch_shape: lbq's shape -> the shape PyTorch stores.
    """

    key: str
    collection: str
    path: tuple[str, ...]
    to_lbq: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]

    @property
    def layer(self) -> str:
        return "/".join(self.path[:-1])


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _same_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)


def _conv(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _conv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1])


def _linear(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)  # [out, in] -> [in, out]


def _linear_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[1], shape[0])


def _conv_entries(key: str, layer: str) -> list[Entry]:
    return [Entry(f"{key}.weight", "params", (layer, "kernel"), _conv, _conv_shape)]


def _bn_entries(key: str, layer: str) -> list[Entry]:
    return [
        Entry(f"{key}.weight", "params", (layer, "scale"), _same, _same_shape),
        Entry(f"{key}.bias", "params", (layer, "bias"), _same, _same_shape),
        Entry(f"{key}.running_mean", "batch_stats", (layer, "mean"), _same, _same_shape),
        Entry(f"{key}.running_var", "batch_stats", (layer, "var"), _same, _same_shape),
    ]


def _classifier_entries(key: str) -> list[Entry]:
    return [
        Entry(f"{key}.weight", "params", ("classifier", "kernel"), _linear, _linear_shape),
        Entry(f"{key}.bias", "params", ("classifier", "bias"), _same, _same_shape),
    ]


def resnet_layout(depth: int) -> list[Entry]:
    """torchvision's (and timm's) ResNet keys, mapped onto `lbq.models.ImageNetResNet`."""
    entries = _conv_entries("conv1", "stem") + _bn_entries("bn1", "stem_bn")
    convs = 3 if depth >= 50 else 2
    for stage, count in enumerate(_RESNET_STAGES[depth]):
        for index in range(count):
            key, name = f"layer{stage + 1}.{index}", f"stage{stage + 1}_block{index}"
            for j in range(1, convs + 1):
                entries += _conv_entries(f"{key}.conv{j}", f"{name}_conv{j}")
                entries += _bn_entries(f"{key}.bn{j}", f"{name}_bn{j}")
            # The first block of every stage downsamples (stage 1 of ResNet-50 widens).
            if index == 0 and (stage > 0 or depth >= 50):
                entries += _conv_entries(f"{key}.downsample.0", f"{name}_shortcut")
                entries += _bn_entries(f"{key}.downsample.1", f"{name}_shortcut_bn")
    return entries + _classifier_entries("fc")


# torchvision's AlexNet: features.{0,3,6,8,10} convs, classifier.{1,4} hidden, classifier.6 out.
_ALEXNET_CONVS = (0, 3, 6, 8, 10)
_ALEXNET_FINAL_MAPS = (256, 6, 6)  # channels, height, width before the flatten


def _alexnet_fc6(x: np.ndarray) -> np.ndarray:
    # PyTorch flattens [C, H, W], lbq (NHWC) [H, W, C].
    channels, height, width = _ALEXNET_FINAL_MAPS
    x = x.reshape(x.shape[0], channels, height, width).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(x.reshape(channels * height * width, -1))


def _bias_as_bn(layer: str, key: str) -> list[Entry]:
    """A layer bias held by the BatchNorm after it (scale 1, mean 0, variance 1 - eps)."""
    return [
        Entry(f"{key}.bias", "params", (layer, "bias"), _same, _same_shape),
    ]


def alexnet_layout() -> list[Entry]:
    """torchvision's AlexNet keys, mapped onto `lbq.models.AlexNet` (AlexNet-BN)."""
    entries = []
    for i, index in enumerate(_ALEXNET_CONVS):
        entries += _conv_entries(f"features.{index}", f"conv{i + 1}")
        entries += _bias_as_bn(f"bn{i + 1}", f"features.{index}")
    for name, index in (("fc6", 1), ("fc7", 4)):
        fc = _alexnet_fc6 if name == "fc6" else _linear
        entries.append(
            Entry(f"classifier.{index}.weight", "params", (name, "kernel"), fc, _linear_shape)
        )
        entries += _bias_as_bn(f"{name}_bn", f"classifier.{index}")
    return entries + _classifier_entries("classifier.6")


def layout(model: str) -> list[Entry]:
    """The keys of ``model`` ('resnet18', 'resnet34', 'resnet50', 'alexnet')."""
    return alexnet_layout() if model == "alexnet" else resnet_layout(int(model[len("resnet") :]))


def identify(state: Mapping[str, np.ndarray]) -> tuple[str | None, str | None]:
    """(the network these weights are, the key that tells), or (None, None).

    Distinguishes torchvision's AlexNet and ResNets 18/34/50/101/152 by their keys.
    """
    if "features.0.weight" in state and "classifier.6.weight" in state:
        return "alexnet", "classifier.6.weight"
    bottleneck = "layer1.0.conv3.weight" in state
    if not bottleneck and "layer1.0.conv1.weight" not in state:
        return None, None
    counts = tuple(
        len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.")}) for s in (1, 2, 3, 4)
    )
    for depth, stages in _RESNET_STAGES.items():
        if stages == counts and (depth >= 50) == bottleneck:
            key = "layer1.0.conv3.weight" if bottleneck else f"layer3.{counts[2] - 1}.conv1.weight"
            return f"resnet{depth}", key
    return None, None


# ----------------------------------------------------------------------------- converting


def convert_state_dict(
    state: Mapping[str, np.ndarray], model: str, path: str = "<state_dict>", source: str = ""
) -> tuple[dict[str, Any], int]:
    """Maps a PyTorch state_dict onto lbq's variables of ``model`` (full precision).

    Args:
      state: {key: array} from `read_state_dict`.
      model: 'resnet18', 'resnet34', 'resnet50' or 'alexnet'.
      path: the file, for messages.
      source: 'torchvision' or 'timm', for messages.

    Returns:
      ({'params': ..., 'batch_stats': ...} as nested dicts of float32 arrays, in the structure
      of ``lbq.models.get_model(model, quantized=False)``; number of classes).

    Raises:
      ConvertError: for another network's weights, a missing or unexpected key, or a shape
        that differs from the network's (naming the layer and both shapes).
    """
    from lbq.models import get_model

    what = f"{source} {model}".strip()
    entries = layout(model)
    keys = {e.key for e in entries}
    found, telling = identify(state)
    if found is not None and found != model:
        raise ConvertError(f"{path}: holds {found} weights (key {telling!r}), not {what}")
    missing = [e.key for e in entries if e.key not in state]
    if missing:
        raise ConvertError(
            f"{path}: missing key {missing[0]!r} of {what}"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
        )
    unexpected = [k for k in state if k not in keys and not k.endswith("num_batches_tracked")]
    if unexpected:
        raise ConvertError(
            f"{path}: unexpected key {unexpected[0]!r}, not part of {what}"
            + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    classifier = entries[-2]
    if state[classifier.key].ndim != 2:
        raise ConvertError(
            f"{path}: key {classifier.key!r} (layer classifier) has shape "
            f"{tuple(state[classifier.key].shape)}, {what} expects (classes, features)"
        )
    num_classes = int(state[classifier.key].shape[0])
    if num_classes < 2:
        raise ConvertError(f"{path}: key {classifier.key!r} has {num_classes} class, lbq needs 2+")
    expected = _expected_shapes(get_model(model, num_classes=num_classes, quantized=False), model)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for entry in entries:
        ours = expected[(entry.collection, *entry.path)]
        value = state[entry.key]
        want = entry.torch_shape(ours)
        if tuple(value.shape) != want:
            raise ConvertError(
                f"{path}: key {entry.key!r} (layer {entry.layer}) has shape "
                f"{tuple(value.shape)}, {what} expects {want}"
            )
        node = variables[entry.collection].setdefault(entry.path[0], {})
        node[entry.path[1]] = entry.to_lbq(value).astype(np.float32)
    if model == "alexnet":
        _unit_batch_norms(variables)
    return variables, num_classes


def _expected_shapes(network: Any, model: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    import jax
    import jax.numpy as jnp

    size = 224 if model == "alexnet" else 32
    shapes = jax.eval_shape(
        lambda: network.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    return {
        tuple(getattr(p, "key", str(p)) for p in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }


def _unit_batch_norms(variables: dict[str, Any]) -> None:
    """AlexNet-BN holding a BatchNorm-free AlexNet: each BatchNorm, with its running
    statistics, adds its layer's bias and nothing else."""
    for layer, leaves in variables["params"].items():
        if "bias" in leaves and layer != "classifier":
            width = leaves["bias"].shape
            leaves["scale"] = np.ones(width, np.float32)
            variables["batch_stats"][layer] = {
                "mean": np.zeros(width, np.float32),
                "var": np.full(width, 1.0 - BATCH_NORM_EPSILON, np.float32),
            }


# ----------------------------------------------------------------------------- the run folder


def converted_run_config(
    model: str,
    *,
    data: str = "imagenet2012",
    data_dir: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """The config recorded for a converted network: `configs/imagenet_fp.py` (full precision,
    plain ReLU) with ``model.name``, the dataset and the normalisation the weights expect."""
    from lbq.configs import imagenet_fp

    c = imagenet_fp.get_config()
    c.model.name = model
    c.data.name = data
    c.data.data_dir = data_dir
    c.data.train_split, c.data.eval_split = train_split, eval_split
    c.data.image_size = image_size
    c.data.mean = tuple(float(v) for v in mean)
    c.data.std = tuple(float(v) for v in std)
    return c


def convert(
    source: str,
    model: str,
    weights: str,
    out: str,
    **config_fields: Any,
) -> dict[str, Any]:
    """Converts a torchvision/timm weights file into an lbq run folder ``out``.

    Args:
      source: 'torchvision' or 'timm'.
      model: 'resnet18', 'resnet34', 'resnet50', or (torchvision) 'alexnet'.
      weights: the file (`read_state_dict`).
      out: the run folder to create; it must not hold a run already.
      **config_fields: `converted_run_config`'s data, data_dir, train_split, eval_split, image_size,
        mean, std.

    Returns:
      What was converted: source, model, weights, sha256, num_classes, out.

    Raises:
      ConvertError: for bad weights (`read_state_dict`, `convert_state_dict`), an unknown
        source or model, a folder that holds a run, or a config lbq refuses.
    """
    if source not in SOURCES:
        raise ConvertError(f"--from={source!r} is not one of {SOURCES}")
    if model not in MODELS[source]:
        known = MODELS[source]
        raise ConvertError(f"--model={model!r}: {source} networks lbq converts are {known}")
    state = read_state_dict(weights)
    variables, num_classes = convert_state_dict(state, model, weights, source)
    for name in ("config.json", "checkpoints"):
        if os.path.exists(os.path.join(out, name)):
            raise ConvertError(f"{out} already holds a run ({name}); choose a new folder")
    record = {
        "source": source,
        "model": model,
        "weights": os.path.abspath(weights),
        "sha256": sha256(weights),
        "num_classes": num_classes,
    }
    _write_run(out, converted_run_config(model, **config_fields), variables, record)
    return {**record, "out": os.path.abspath(out)}


def _write_run(out: str, config: Any, variables: dict[str, Any], record: dict[str, Any]) -> None:
    """Writes config.json and the step-0 checkpoint with the trainer's own writers, in the
    structure its state has at step 0 (the optimizer state included), so the folder also
    resumes as a full-precision run."""
    import jax
    import jax.numpy as jnp

    from lbq.checkpoint import Checkpoints
    from lbq.plan import parse_config
    from lbq.train_state import TrainState
    from lbq.trainer import build_networks, build_optimizer
    from lbq.validate import ConfigError
    from lbq.workdir import write_record

    try:
        plan = parse_config(config)
    except ConfigError as error:
        raise ConvertError(str(error)) from None
    networks = build_networks(plan, record["num_classes"])
    (student,) = networks
    params = {student.name: jax.tree.map(jnp.asarray, variables["params"])}
    stats = {student.name: jax.tree.map(jnp.asarray, variables["batch_stats"])}
    state = TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=stats,
        opt_state=build_optimizer(plan, networks).init(params),
        first_nonfinite=jnp.int32(-1),
    )
    write_record(out, plan.record)
    checkpoints = Checkpoints(out, plan.checkpoint.keep)
    try:
        stage = plan.stages[0].name
        meta = {
            "stage": 0,
            "stage_name": stage,
            "epoch": 0.0,
            "stage_results": {},
            "skipped_steps": {},
            "converted_from": record,
        }
        checkpoints.save(state, meta)
    finally:
        checkpoints.close()


# ----------------------------------------------------------------------------- command line


def _three(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not three numbers R,G,B (0..255 units)")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lbq.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", required=True, choices=SOURCES)
    p.add_argument("--model", required=True, choices=MODELS["torchvision"])
    p.add_argument("--weights", required=True, help=".pth/.pt (torch.save) or .safetensors")
    p.add_argument("--out", required=True, help="the lbq run folder to write")
    p.add_argument("--data", default="imagenet2012", help="the run's dataset (a TFDS name)")
    p.add_argument("--data_dir", default=None, help="its TFDS data dir")
    p.add_argument("--train_split", default="train", help="its training split")
    p.add_argument("--eval_split", default="validation", help="its evaluation split")
    p.add_argument("--image_size", type=int, default=224, help="input size (default 224)")
    p.add_argument(
        "--mean",
        type=_three,
        default=IMAGENET_MEAN,
        help="input mean R,G,B in 0..255 units (default ImageNet's)",
    )
    p.add_argument(
        "--std",
        type=_three,
        default=IMAGENET_STD,
        help="input std R,G,B in 0..255 units (default ImageNet's)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        done = convert(
            args.source,
            args.model,
            args.weights,
            args.out,
            data=args.data,
            data_dir=args.data_dir,
            train_split=args.train_split,
            eval_split=args.eval_split,
            image_size=args.image_size,
            mean=args.mean,
            std=args.std,
        )
    except ConvertError as error:
        print(f"lbq.convert: error: {error}", file=sys.stderr)
        return 2
    print(
        f"converted {done['source']} {done['model']} ({done['num_classes']} classes) from "
        f"{done['weights']} into {done['out']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
