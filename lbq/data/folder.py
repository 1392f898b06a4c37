"""Turning an image folder ROOT/<split>/<class>/<image> into a real TFDS dataset.

The dataset is written by a ``tfds.core.GeneratorBasedBuilder`` in ArrayRecord format, which
TFDS does without TensorFlow as long as images are handed over encoded (file bytes or PIL
images; encoding a NumPy array would call ``tf.image.encode_png``). RGB JPEG/PNG files are stored
byte for byte; other modes (grayscale, CMYK, palette, alpha) are converted to RGB and stored as
lossless PNG, so every record decodes to HxWx3. Per-channel mean/std of the train split are
stored in the dataset's metadata.json, where ``get_info`` reads them.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lbq.data.config import DatasetInfo, default_num_workers
from lbq.data.errors import DataError, FolderLayoutError, ImageReadError

VERSION = "1.0.0"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DEFAULT_IMAGE_SIZE = 224  # model input recorded for folders whose images differ in size
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^\w+$")
_CHUNK = 256  # files per scan task


@dataclasses.dataclass
class _Split:
    name: str
    files: list[str]  # paths relative to root
    labels: list[int]
    reencode: list[bool] = dataclasses.field(default_factory=list)


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _list_split(root: str, split: str) -> tuple[dict[str, list[str]], str]:
    """Maps class name -> sorted image paths (relative to root) of one split folder."""
    split_dir = os.path.join(root, split)
    if not _SPLIT_RE.match(split):
        raise FolderLayoutError(
            f"split folder {split_dir} has a name TFDS cannot use (letters, digits, _ only)"
        )
    classes = _subdirs(split_dir)
    if not classes:
        raise FolderLayoutError(
            f"image folder {split_dir} has no class folders (expected "
            f"{split_dir}/<class>/<image>.jpg)"
        )
    per_class = {}
    for cls in classes:
        names = sorted(
            f
            for f in os.listdir(os.path.join(split_dir, cls))
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
        per_class[cls] = [os.path.join(split, cls, f) for f in names]
    if not any(per_class.values()):
        raise FolderLayoutError(
            f"image folder {split_dir} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} images"
        )
    return per_class, split_dir


def _scan_chunk(root: str, files: Sequence[str], with_stats: bool) -> dict[str, Any]:
    """Decodes every file of a chunk: validates it, accumulates pixel sums, notes its size."""
    from PIL import Image

    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    sizes = set()
    reencode = []
    for rel in files:
        path = os.path.join(root, rel)
        try:
            with Image.open(path) as img:
                fmt, mode = img.format, img.mode
                rgb = np.asarray(img.convert("RGB"))
        except Exception as e:  # PIL raises several unrelated types for corrupt files.
            raise ImageReadError(f"cannot read image file {path}: {e}") from e
        reencode.append(not (fmt in ("JPEG", "PNG") and mode == "RGB"))
        sizes.add(rgb.shape)
        if with_stats:
            x = rgb.reshape(-1, 3).astype(np.float64)
            total += x.sum(0)
            total_sq += (x * x).sum(0)
            count += len(x)
    return {
        "total": total,
        "total_sq": total_sq,
        "count": count,
        "sizes": sizes,
        "reencode": reencode,
    }


def _scan(
    root: str, split: _Split, with_stats: bool, num_workers: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Decodes all images of a split on a thread pool, reporting progress."""
    from lbq.data.pipeline import _ordered_map

    chunks = [split.files[i : i + _CHUNK] for i in range(0, len(split.files), _CHUNK)]
    acc = {"total": np.zeros(3), "total_sq": np.zeros(3), "count": 0, "sizes": set()}
    done, t0, last = 0, time.time(), 0.0
    results = _ordered_map(
        lambda c: _scan_chunk(root, c, with_stats), chunks, num_workers, num_workers + 2
    )
    for result in results:
        for k in ("total", "total_sq", "count"):
            acc[k] = acc[k] + result[k]
        acc["sizes"] |= result["sizes"]
        split.reencode.extend(result["reencode"])
        done += len(result["reencode"])
        now = time.time()
        if now - last > 2 or done == len(split.files):
            last = now
            rate = done / max(now - t0, 1e-9)
            progress(f"  scan {split.name}: {done}/{len(split.files)} images ({rate:.0f}/s)")
    return acc


def _builder_class() -> type:
    """Defines the TFDS builder lazily, so importing lbq.data does not import TFDS."""
    import tensorflow_datasets as tfds

    class FolderImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """TFDS builder for one prepared image folder (named at construction)."""

        VERSION = tfds.core.Version(VERSION)
        # TFDS looks for a checksums file beside the builder's code; this builder downloads
        # nothing, and the lookup needs `importlib_resources`, which some installs lack.
        code_path = None

        def __init__(
            self,
            *,
            name: str,
            root: str,
            class_names: list[str],
            splits: dict[str, _Split],
            metadata: dict[str, Any],
            **kwargs: Any,
        ):
            self.name = name
            self._root = root
            self._class_names = class_names
            self._splits = splits
            self._metadata = metadata
            super().__init__(**kwargs)

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Image folder {self._root}, prepared by lbq.data.prepare.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=self._class_names),
                        "file_name": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
                metadata=tfds.core.MetadataDict(self._metadata),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager
            return {name: self._generate_examples(split) for name, split in self._splits.items()}

        def _generate_examples(self, split: _Split) -> Any:
            from PIL import Image

            for rel, label, reencode in zip(split.files, split.labels, split.reencode, strict=True):
                path = os.path.join(self._root, rel)
                if reencode:
                    with Image.open(path) as img:
                        buf = io.BytesIO()
                        img.convert("RGB").save(buf, format="PNG")
                    image: Any = buf.getvalue()
                else:
                    with open(path, "rb") as f:
                        image = f.read()
                yield rel, {"image": image, "label": label, "file_name": rel}

    return FolderImageBuilder


def prepare_folder(
    root: str,
    data_dir: str,
    name: str,
    *,
    splits: Sequence[str] | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DatasetInfo:
    """Builds a TFDS dataset (ArrayRecord) named ``name`` in ``data_dir`` from an image folder.

    Afterwards ``data_config.name = name, data_config.data_dir = data_dir`` reads it through
    the normal TFDS path. Labels are the sorted union of class folder names over the splits.

    Args:
      root: folder with ROOT/<split>/<class>/*.jpg|jpeg|png.
      data_dir: TFDS data dir to write into (created if missing).
      name: dataset name: lowercase letters, digits and _, not an existing TFDS name.
      splits: split folders to use; default every sub-folder of root.
      num_workers: decode threads for the validation/statistics pass.
      overwrite: replace a dataset of the same name already prepared in data_dir.
      progress: called with progress lines (default: logging.info).

    Returns:
      ``DatasetInfo`` of the prepared dataset (image_shape is the images' common size, or
      224x224x3 when sizes differ; mean/std measured on the 'train' split, else the first).
    """
    log = progress or logging.getLogger(__name__).info
    root = os.path.abspath(os.fspath(root))
    data_dir = os.path.abspath(os.fspath(data_dir))
    workers = default_num_workers() if num_workers is None else max(1, num_workers)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError("prepare_folder needs tensorflow-datasets, which is not installed") from e
    if not _NAME_RE.match(name) or name == "digits":
        raise DataError(
            f"dataset name {name!r} is not usable: use lowercase letters, digits and _ "
            f"(starting with a letter), and not 'digits'"
        )
    if name in tfds.list_builders(with_community_datasets=False):
        raise DataError(
            f"dataset name {name!r} is a registered TFDS dataset, whose own builder would "
            f"shadow the prepared files; choose another name, e.g. {name}_folder"
        )
    if not os.path.isdir(root):
        raise FolderLayoutError(f"image folder {root} does not exist")
    found = _subdirs(root)
    if isinstance(splits, str):  # a single split name, not a sequence of characters
        splits = [splits]
    if splits is None:
        if not found:
            raise FolderLayoutError(
                f"image folder {root} has no split folders (expected {root}/<split>/<class>/"
                f"<image>.jpg)"
            )
        splits = found
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise FolderLayoutError(
                f"split folder {os.path.join(root, split)} is missing (found: "
                f"{', '.join(found) or 'nothing'})"
            )
    target = os.path.join(data_dir, name)
    if os.path.exists(target):
        if not overwrite:
            raise DataError(
                f"dataset {name!r} already exists in {data_dir}; pass overwrite=True "
                f"(--overwrite) to rebuild it"
            )
        shutil.rmtree(target)

    listing = {split: _list_split(root, split)[0] for split in splits}
    class_names = sorted({c for per_class in listing.values() for c in per_class})
    label_of = {c: i for i, c in enumerate(class_names)}
    plan = {}
    for split, per_class in listing.items():
        files = [f for c in sorted(per_class) for f in per_class[c]]
        labels = [label_of[c] for c in sorted(per_class) for _ in per_class[c]]
        plan[split] = _Split(split, files, labels)
        log(f"{split}: {len(files)} images in {len(per_class)} classes")
    stats_split = "train" if "train" in plan else splits[0]

    sizes: set = set()
    mean = std = None
    for split in plan.values():
        acc = _scan(root, split, split.name == stats_split, workers, log)
        sizes |= acc["sizes"]
        if split.name == stats_split:
            mean = acc["total"] / acc["count"]
            std = np.sqrt(np.maximum(acc["total_sq"] / acc["count"] - mean * mean, 0.0))
    image_shape = list(next(iter(sizes))) if len(sizes) == 1 else None
    metadata = {
        "mean": [round(float(v), 3) for v in mean],
        "std": [round(float(v), 3) for v in std],
        "stats_split": stats_split,
        "image_shape": image_shape,
        "source_root": root,
        "prepared_by": "lbq.data.prepare",
    }
    log(f"writing TFDS dataset {name} {VERSION} (array_record) to {target}")
    os.makedirs(data_dir, exist_ok=True)
    builder = _builder_class()(
        name=name,
        root=root,
        class_names=class_names,
        splits=plan,
        metadata=metadata,
        data_dir=data_dir,
    )
    # Keep TFDS's (unused) download folder out of the data dir.
    try:
        with tempfile.TemporaryDirectory() as download_dir:
            builder.download_and_prepare(download_dir=download_dir, file_format="array_record")
    except BaseException:
        # A half-written dataset would block the next attempt ("already exists").
        shutil.rmtree(target, ignore_errors=True)
        raise

    from lbq.data.pipeline import get_info

    eval_split = next(
        (s for s in ("test", "validation", "val") if s in plan and s != stats_split),
        next((s for s in plan if s != stats_split), stats_split),
    )
    return get_info(
        {
            "name": name,
            "data_dir": data_dir,
            "train_split": stats_split,
            "eval_split": eval_split,
            "image_size": image_shape[0] if image_shape else DEFAULT_IMAGE_SIZE,
        }
    )
