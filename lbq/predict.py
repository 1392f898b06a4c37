"""Classify images with an exported model: ``python -m lbq.predict --model=DIR image.jpg ...``.

Each image is prepared as the run's evaluation prepared it (resized to the model's input size,
or for ImageNet-style runs resized and centre-cropped: `lbq.data.transforms.eval_transform`),
then run by the integer reference forward on the packed file (or ``--engine=qonnx``: the QONNX
graph, by qonnx's executor). Prints each image's top classes with their softmax probabilities.
An image that cannot be read is reported on one line naming it; the others are still
classified, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lbq.deploy.cli import error, run_command


def read_image(path: str, dataset: dict) -> np.ndarray:
    """The eval-preprocessed uint8 [H, W, 3] image of a file.

    Raises:
      OSError: when the file cannot be opened.
      lbq.data.ImageReadError: when it is not a readable image.
    """
    from lbq.data.transforms import eval_transform

    with open(path, "rb") as f:
        data = f.read()
    return eval_transform(data, int(dataset["image_size"]), bool(dataset["imagenet_style"]), path)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted.astype(np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def format_top(path: str, probabilities: np.ndarray, names: list[str], top: int) -> str:
    order = np.argsort(-probabilities, kind="stable")[:top]
    width = max(len(names[i]) for i in order)
    lines = [path]
    lines += [f"  {names[i]:<{width}}  {100 * probabilities[i]:6.2f} %" for i in order]
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> int:
    from lbq.data import DataError
    from lbq.deploy.package import load_model

    if args.top < 1:
        error(f"--top={args.top} must be at least 1")
        return 1
    model = load_model(args.model, args.network, check_qonnx=args.engine == "qonnx")
    images, paths = [], []
    for path in args.images:
        try:
            images.append(read_image(path, model.dataset))
            paths.append(path)
        except DataError as failure:  # names the file: "cannot decode PATH: ..."
            error(failure)
        except OSError as failure:
            error(f"cannot read image {path}: {failure.strerror or failure}")
    if images:
        batch = np.stack(images)
        if args.engine == "qonnx":
            from lbq.deploy.qonnx_export import run_qonnx

            logits = run_qonnx(model.file("qonnx"), batch)
        else:
            from lbq.deploy.integer import IntegerForward

            forward = IntegerForward(model.program, model.dataset["mean"], model.dataset["std"])
            logits = forward(batch)
        names = list(model.dataset["class_names"])
        for path, p in zip(paths, softmax(logits), strict=True):
            print(format_top(path, p, names, min(args.top, len(names))))
    return 1 if len(paths) < len(args.images) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbq.predict", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a folder written by lbq.export")
    p.add_argument("--network", default=None, help="which network (default: the student)")
    p.add_argument("--engine", choices=("integer", "qonnx"), default="integer", help="what runs it")
    p.add_argument("--top", type=int, default=5, help="classes to print per image")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    args = p.parse_args(argv)
    return run_command(lambda: predict_command(args))


if __name__ == "__main__":
    sys.exit(main())
