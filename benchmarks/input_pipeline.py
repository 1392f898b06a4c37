"""Host input pipeline throughput: images decoded and augmented per second per host core.

Two data sets, ``cifar`` (real CIFAR-10 JPEGs; pad-4 crop + flip) and ``imagenet`` (500x375
JPEGs made from the CIFAR photographs; random-resized crop to 224 + flip), are written as image
folders, prepared with `lbq.data.prepare_folder` into a TFDS (ArrayRecord) dataset and read
back through `lbq.data.train_iterator`, the trainer's own host pipeline (benchmarks/RESULTS.md,
"Input pipeline", has how the data is made and the figures).

Two rates per data set: ``transform``, the per-example decode + augmentation alone on one thread
(the ceiling of one core), and ``pipeline``, `train_iterator` with 1 and 2 worker threads after
one warm-up batch (per core: divided by ``min(workers, cores)``). For CIFAR the pipeline decodes
the split into memory once by default (data config ``cache``); ``pipeline_no_cache`` decodes
every batch.

    python benchmarks/input_pipeline.py --json /tmp/input.json
    python -m lbq.bench --input -- --datasets imagenet --workers 1,2

Needs tensorflow-datasets and pillow (the prepared dataset is written through TFDS).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import tarfile
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lbq.io import write_json  # noqa: E402

DEFAULT_ARCHIVE = "/work/shared/data/cifar10-jpeg.tar.gz"
IMAGENET_SIZE = (500, 375)  # width, height: the most common ImageNet image size


def _cifar_members(archive: str, per_class: int) -> dict[str, list[bytes]]:
    """The first ``per_class`` training JPEGs of each class, as file bytes."""
    out: dict[str, list[bytes]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) != 3 or parts[0] != "train" or not member.isfile():
                continue
            files = out.setdefault(parts[1], [])
            if len(files) < per_class:
                files.append(tar.extractfile(member).read())
            if len(out) == 10 and all(len(v) >= per_class for v in out.values()):
                break
    return out


def _imagenet_like(jpeg: bytes, rng: np.random.Generator, noise: float, quality: int) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize(IMAGENET_SIZE, Image.BICUBIC)
    pixels = np.asarray(img, np.float32) + rng.normal(0.0, noise, (*IMAGENET_SIZE[::-1], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_folder(
    kind: str, root: str, archive: str, per_class: int, noise: float, quality: int
) -> dict[str, Any]:
    """Writes ROOT/train/<class>/*.jpg; returns the count and the mean file size."""
    rng = np.random.default_rng(0)
    sizes = []
    for cls, files in _cifar_members(archive, per_class).items():
        folder = os.path.join(root, "train", cls)
        os.makedirs(folder, exist_ok=True)
        for i, data in enumerate(files):
            if kind == "imagenet":
                data = _imagenet_like(data, rng, noise, quality)
            with open(os.path.join(folder, f"{i:05d}.jpg"), "wb") as f:
                f.write(data)
            sizes.append(len(data))
    return {"images": len(sizes), "mean_file_bytes": float(np.mean(sizes))}


def transform_rate(kind: str, root: str, seconds: float) -> float:
    """Images/s of the per-example decode + augmentation on this thread (files in memory)."""
    from lbq.data import transforms

    walked = os.walk(os.path.join(root, "train"))
    files = [pathlib.Path(d, n).read_bytes() for d, _, names in walked for n in sorted(names)]
    rng = np.random.default_rng(0)
    count, start = 0, time.perf_counter()
    chunk = files[:128]
    while time.perf_counter() - start < seconds:
        if kind == "imagenet":
            for data in chunk:
                transforms.random_resized_crop(data, 224, rng)
        else:
            # As the pipeline: decode each image, then crop and flip the batch at once.
            images = np.stack([transforms.eval_transform(data, 32, False) for data in chunk])
            offsets, flips = transforms.cifar_params(rng, len(chunk), 4)
            transforms.pad_crop_flip(images, offsets, flips, 4)
        count += len(chunk)
    return count / (time.perf_counter() - start)


def pipeline_rate(config: dict[str, Any], batch: int, batches: int) -> tuple[float, float]:
    """(images/s of `train_iterator` over ``batches`` batches after one warm-up batch,
    seconds to the warm-up batch: opening the dataset and, when cached, decoding the split).

    The iterator prefetches ``workers + 2`` batches, so ``batches`` should be several times that
    for the rate to be the steady state rather than the prefetch queue.
    """
    from lbq.data import train_iterator

    start = time.perf_counter()
    iterator = train_iterator(config, seed=0, global_batch=batch)
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return batch * batches / seconds, first


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lbq.data import prepare_folder

    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="lbq_input_bench_") as tmp:
        for kind in args.datasets.split(","):
            imagenet = kind == "imagenet"
            root = os.path.join(tmp, f"{kind}_folder")
            per_class = args.imagenet_per_class if imagenet else args.cifar_per_class
            made = make_folder(kind, root, args.archive, per_class, args.noise, args.quality)
            data_dir, name = os.path.join(tmp, "tfds"), f"bench_{kind}"
            prepare_folder(root, data_dir, name, progress=lambda line: None)
            batch = args.batch or (256 if imagenet else 128)
            batches = args.batches or (10 if imagenet else 40)
            row = {
                "dataset": kind,
                "batch": batch,
                **made,
                "transform_images_per_second_one_thread": transform_rate(
                    kind, root, args.transform_seconds
                ),
            }
            config = {
                "name": name,
                "data_dir": data_dir,
                "train_split": "train",
                "eval_split": "train",
                "image_size": 224 if imagenet else 32,
                "augment": "imagenet" if imagenet else "cifar",
            }
            # CIFAR: the default decodes the split into memory once ("auto" cache); also
            # measure decoding every batch (cache=False), as for data too large to cache.
            caches = {"pipeline": "auto", **({} if imagenet else {"pipeline_no_cache": False})}
            for label, cache in caches.items():
                for workers in (int(w) for w in args.workers.split(",")):
                    settings = dict(config, cache=cache, workers=workers)
                    rate, first = pipeline_rate(settings, batch, batches)
                    row[f"{label}_workers_{workers}"] = {
                        "images_per_second": rate,
                        "per_core": rate / min(workers, cores),
                        "batches": batches,
                        "seconds_to_first_batch": first,
                    }
            results.append(row)
            print(json.dumps(row), flush=True)
    from lbq.bench import cpu_model

    return {
        "cpu_model": cpu_model(),
        "cores": cores,
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="cifar,imagenet")
    parser.add_argument("--archive", default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG tar.gz")
    parser.add_argument("--cifar-per-class", type=int, default=300)
    parser.add_argument("--imagenet-per-class", type=int, default=60)
    parser.add_argument("--noise", type=float, default=24.0, help="pixel noise std (imagenet)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (imagenet)")
    parser.add_argument("--workers", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--batch", type=int, default=None, help="default 256 imagenet, 128 cifar")
    batches = "timed batches per setting (default 10 imagenet, 40 cifar)"
    parser.add_argument("--batches", type=int, default=None, help=batches)
    parser.add_argument("--transform-seconds", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
