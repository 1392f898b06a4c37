"""Turning an image folder ROOT/<split>/<class>/<image> into a TFDS dataset (docs/data.md).

A ``tfds.core.GeneratorBasedBuilder`` writes it in ArrayRecord format, without TensorFlow as long
as images are handed over encoded (encoding a NumPy array would call ``tf.image.encode_png``):
8-bit RGB JPEG/PNG files byte for byte, every other image converted to 8-bit RGB by
``lbq.data.transforms.to_rgb`` and stored as lossless PNG, so every record decodes to HxWx3 uint8.
Files are opened by ``lbq.data.transforms.open_image``, as every lbq reader opens them. The train
split's exact per-channel mean/std (``lbq.data.stats.PixelStats``), measured on the images resized
to ``image_size`` as training resizes them, go to the dataset's metadata.json for ``get_info``.

Layout rules as torchvision's ``ImageFolder`` (docs/data.md), hidden files and folders skipped;
every file that is not used is reported with the reason.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lbq.data.config import (
    AUGMENTATIONS,
    DEFAULT_IMAGE_SIZE,
    MIN_CLASSES,
    default_num_workers,
    read_settings,
)
from lbq.data.errors import DataError, FolderLayoutError, ImageReadError
from lbq.data.stats import PixelStats, std_floor_warnings
from lbq.data.transforms import RESIZE_RATIO, eval_transform, one_line, open_image, to_rgb

VERSION = "1.0.0"
# torchvision's ImageFolder extensions plus GIF and PNM variants, all decoded by Pillow. WebP
# needs Pillow built with libwebp; without it .webp files are skipped and listed.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)  # fmt: skip
PROGRESS_SECONDS = 2.0  # at most one progress line this often per split and phase
SHOW_PATHS = 3  # paths listed per group of skipped files in the report
SHOW_SIZES = 5  # most common image sizes listed in the report
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^\w+$")
_CHUNK = 256  # files per scan task
# Class folders all named like these mean ROOT is one level too high (ROOT/data/train/<class>).
_SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation", "eval", "dev"})
_PNG_BIT_DEPTH_OFFSET = 24  # signature (8) + IHDR length, type, width, height (16)


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A path under the image folder that is not in the dataset.

    Attributes:
      path: relative to the image folder; folders end with the path separator.
      reason: why, e.g. "hidden file" or the decoder's error for an unreadable image.
    """

    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PreparedFolder:
    """What ``prepare_folder`` wrote and what it found in the image folder.

    Attributes:
      name: TFDS dataset name (``data.name``).
      data_dir: TFDS data dir (``data.data_dir``).
      path: the dataset's version folder inside data_dir.
      class_names: label i is class_names[i] (sorted class folder names).
      class_counts: split -> images per label, in label order.
      stats_split: the split mean/std were measured on.
      eval_split: the split to evaluate on (test, validation or val when present).
      mean: per-channel mean, 0..255 units, as stored (float64, exact), of the images
        resized as training resizes them (``stats_image_size``, ``stats_resize``).
      std: per-channel std, 0..255 units, as stored (measured; ``get_info`` floors it).
      image_sizes: (width, height) -> number of images, over every split, as stored.
      skipped: files and folders not used (hidden, other extensions, outside class folders).
      unreadable: images that could not be decoded, skipped because of ``skip_corrupt``.
      seconds: wall time of the preparation.
      stats_image_size: the side, in pixels, every image was resized to for mean/std.
      stats_resize: 'whole' (data.augment cifar or none) or 'imagenet' (shorter side, centre crop).
    """

    name: str
    data_dir: str
    path: str
    class_names: tuple[str, ...]
    class_counts: dict[str, tuple[int, ...]]
    stats_split: str
    eval_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_sizes: dict[tuple[int, int], int]
    skipped: tuple[SkippedFile, ...]
    unreadable: tuple[SkippedFile, ...]
    seconds: float
    stats_image_size: int = DEFAULT_IMAGE_SIZE
    stats_resize: str = "whole"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def warnings(self) -> list[str]:
        """Lines that need the user's attention (a floored std, skipped unreadable images)."""
        lines = std_floor_warnings(self.std, f"split {self.stats_split!r}")
        if self.unreadable:
            files = [f"{s.path} ({s.reason})" for s in self.unreadable]
            lines.append(
                f"skipped {len(files)} unreadable image{'s' * (len(files) > 1)} (skip_corrupt): "
                f"{_first(files, SHOW_PATHS, '; ')}"
            )
        return lines

    def report(self) -> list[str]:
        """The human-readable summary ``python -m lbq.data.prepare`` prints."""
        total = sum(map(sum, self.class_counts.values()))
        lines = [
            f"prepared dataset {self.name!r}: {total} images in {self.num_classes} classes, "
            f"in {self.seconds:.1f} s, to {self.path}",
            f"  classes: {', '.join(self.class_names[:10])}"
            + (f", ... ({self.num_classes - 10} more)" if self.num_classes > 10 else ""),
        ]
        for split, counts in self.class_counts.items():
            lo, hi = min(counts), max(counts)
            per_class = f"{lo}" if lo == hi else f"{lo}..{hi}"
            lines.append(f"  {split}: {sum(counts)} images, {per_class} per class")
        lines += _size_lines(self.image_sizes)
        mean, std = (" ".join(f"{v:.3f}" for v in vs) for vs in (self.mean, self.std))
        lines.append(
            f"  mean ({self.stats_split}, 0..255, every image resized to "
            f"{self.stats_image_size}x{self.stats_image_size} as training resizes it"
            f"{', imagenet-style' if self.stats_resize == 'imagenet' else ''}): "
            f"{mean}; std: {std} (stored as float64)"
        )
        lines += _skipped_lines(self.skipped)
        lines += [f"warning: {line}" for line in self.warnings()]
        lines.append(
            f"  use it with: --config.data.name={self.name} --config.data.data_dir="
            f"{self.data_dir} --config.data.train_split={self.stats_split} "
            f"--config.data.eval_split={self.eval_split}"
        )
        return lines


def _first(items: Sequence[str], show: int, sep: str = ", ") -> str:
    """The first ``show`` items, then "..." if there are more."""
    return sep.join([*items[:show], "..."] if len(items) > show else items)


def _size_lines(sizes: dict[tuple[int, int], int]) -> list[str]:
    """The image size distribution, and the size the images are used at when training."""
    used_at = (
        f"  used at: data.image_size x data.image_size, a training config field (default "
        f"{DEFAULT_IMAGE_SIZE}); each image is resized to it whole (aspect ratio not kept), or "
        f"with data.augment=imagenet its shorter side to image_size*{RESIZE_RATIO * 224:.0f}/224 "
        f"and its centre cropped"
    )
    if len(sizes) == 1:
        (w, h), n = next(iter(sizes.items()))
        same = f"; data.image_size={w} uses them as they are" if w == h else ""
        return [f"  image size (W x H): {w}x{h}, all {n} images", used_at + same]
    widths, heights = np.repeat(list(sizes), list(sizes.values()), axis=0).T
    common = [f"{w}x{h} ({n})" for (w, h), n in collections.Counter(sizes).most_common()]
    return [
        f"  image sizes (W x H): width {widths.min()}..{widths.max()} (median "
        f"{np.median(widths):g}), height {heights.min()}..{heights.max()} (median "
        f"{np.median(heights):g}); {len(sizes)} distinct, most common: "
        f"{_first(common, SHOW_SIZES)}",
        used_at,
    ]


def _skipped_lines(skipped: Sequence[SkippedFile]) -> list[str]:
    if not skipped:
        return []
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for s in skipped:
        groups[s.reason].append(s.path)
    return [f"  skipped {len(skipped)} file{'s' * (len(skipped) > 1)}:"] + [
        f"    {reason} ({len(paths)}): {_first(paths, SHOW_PATHS)}"
        for reason, paths in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]


def skip_reason(name: str, path: str, webp: bool) -> str | None:
    """Why a file inside a class folder is not an image of the dataset, or None if it is one.

    Args:
      name: the file name.
      path: its full path (checked to be a regular file, links followed).
      webp: whether Pillow can decode WebP here (``PIL.features.check("webp")``).
    """
    if name.startswith("."):
        return "hidden file"
    ext = os.path.splitext(name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        return f"extension {ext or '(none)'}, not an image type lbq reads"
    if ext == ".webp" and not webp:
        return "WebP, which this Pillow cannot decode (built without libwebp)"
    if not os.path.isfile(path):
        return "not a regular file (a broken link?)"
    return None


def _entries(folder: str, rel: str, outside: str) -> tuple[list[str], list[SkippedFile]]:
    """The sub-folders of ``folder`` (ROOT/rel), sorted; and its hidden entries and its files
    (which are ``outside`` a sub-folder) as skipped."""
    dirs, skipped = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = os.path.join(rel, entry.name)
        if entry.name.startswith("."):
            skipped.append(
                SkippedFile(path + os.sep, "hidden folder")
                if entry.is_dir()
                else SkippedFile(path, "hidden file")
            )
        elif entry.is_dir():
            dirs.append(entry.name)
        else:
            skipped.append(SkippedFile(path, f"not inside a {outside} folder"))
    return dirs, skipped


def _list_class(root: str, class_dir: str, webp: bool) -> tuple[list[str], list[SkippedFile]]:
    """Images under a class folder, sub-folders included (paths relative to root), and skips."""
    images, skipped, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: do not loop
            dirnames[:] = []
            continue
        seen.add(real)
        rel_dir = os.path.relpath(dirpath, root)
        hidden = [d for d in dirnames if d.startswith(".")]
        skipped += [SkippedFile(os.path.join(rel_dir, d) + os.sep, "hidden folder") for d in hidden]
        dirnames[:] = sorted(set(dirnames) - set(hidden))
        for f in filenames:
            reason = skip_reason(f, os.path.join(dirpath, f), webp)
            rel = os.path.join(rel_dir, f)
            if reason:
                skipped.append(SkippedFile(rel, reason))
            else:
                images.append(rel)
    return sorted(images), sorted(skipped, key=lambda s: s.path)


def _list_splits(
    root: str, split_names: Sequence[str], skipped: list[SkippedFile]
) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted image paths relative to root}}; adds the files not used to
    ``skipped``."""
    from PIL import features

    webp = bool(features.check("webp"))
    listing: dict[str, dict[str, list[str]]] = {}
    for split in split_names:
        split_dir = os.path.join(root, split)
        if not _SPLIT_RE.match(split):
            raise FolderLayoutError(
                f"split folder {split_dir} has a name TFDS cannot use (letters, digits, _ only)"
            )
        classes, split_skipped = _entries(split_dir, split, "class")
        skipped += split_skipped
        if not classes:
            loose = [s.path for s in split_skipped if s.reason == "not inside a class folder"]
            too_deep = any(path.lower().endswith(IMAGE_EXTENSIONS) for path in loose)
            hint = "; it holds images directly: is the path one level too deep?" if too_deep else ""
            raise FolderLayoutError(
                f"image folder {split_dir} has no class folders (expected "
                f"{split_dir}/<class>/<image>.jpg){hint}"
            )
        if len(classes) > 1 and set(classes) <= _SPLIT_NAMES:
            raise FolderLayoutError(
                f"the class folders of {split_dir} are named like splits ({', '.join(classes)}): "
                f"use {split_dir} as the image folder (ROOT/<split>/<class>/<image>)"
            )
        listing[split] = {}
        for cls in classes:
            class_dir = os.path.join(split_dir, cls)
            images, class_skipped = _list_class(root, class_dir, webp)
            if not images:
                found = "".join(
                    f" ({len(class_skipped)} other entries, e.g. {s.path}: {s.reason})"
                    for s in class_skipped[:1]
                )
                raise FolderLayoutError(
                    f"class folder {class_dir} holds no images{found}; add images or remove it"
                )
            listing[split][cls] = images
            skipped += class_skipped
    return listing


def _plan(
    root: str, listing: dict[str, dict[str, list[str]]], stats_split: str
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names (sorted union over splits) and each split's (file, label) pairs; refuses
    fewer than two classes, and with a 'train' split a class that has no training images."""
    class_names = sorted({c for per_class in listing.values() for c in per_class})
    if len(class_names) < MIN_CLASSES:
        raise FolderLayoutError(
            f"image folder {root} has {len(class_names)} class ({', '.join(class_names)}); a "
            f"classifier needs at least {MIN_CLASSES} class folders with images, as "
            f"{root}/<split>/<class>/<image>"
        )
    if stats_split == "train":
        for split, per_class in listing.items():
            missing = sorted(set(per_class) - set(listing["train"]))
            if missing:
                raise FolderLayoutError(
                    f"class folder {os.path.join(root, split, missing[0])} has no counterpart "
                    f"{os.path.join(root, 'train', missing[0])}: a class without training "
                    f"images cannot be learned ({len(missing)} such class"
                    f"{'es' if len(missing) > 1 else ''} in {split})"
                )
    label_of = {c: i for i, c in enumerate(class_names)}
    return class_names, {
        split: [(f, label_of[c]) for c, files in per_class.items() for f in files]
        for split, per_class in listing.items()
    }


def _check_written(name: str, data_dir: str, plan: dict[str, list]) -> None:
    """Opens the new dataset as training does and checks each split's example count."""
    from lbq.data.sources import open_dataset

    dataset = open_dataset(read_settings({"name": name, "data_dir": data_dir}))
    for split, items in plan.items():
        if (n := dataset.num_examples(split)) != len(items):
            raise DataError(
                f"dataset {name!r} in {data_dir} holds {n} examples "
                f"in split {split!r} after writing {len(items)}"
            )


def _stored_as_is(img: Any, path: str) -> bool:
    """Whether a file's own bytes decode to what ``to_rgb`` gives: 8-bit opaque RGB JPEG/PNG."""
    if img.mode != "RGB" or "transparency" in img.info:
        return False
    if img.format == "PNG":
        with open(path, "rb") as f:
            return f.read(_PNG_BIT_DEPTH_OFFSET + 1)[_PNG_BIT_DEPTH_OFFSET:] == bytes([8])
    return img.format == "JPEG"


def _scan_chunk(
    root: str, items: Sequence[tuple[str, int]], with_stats: bool, size: int, resize: str
) -> tuple[PixelStats, collections.Counter, list[tuple[str, int, bool]], list[SkippedFile]]:
    """Decodes every (file, label) of a chunk: (the pixel counts of the images as training
    receives them, (width, height) counts, (path, label, re-encode) of the readable files in
    order, unreadable files)."""
    pixels = PixelStats()
    sizes: collections.Counter = collections.Counter()
    good, unreadable = [], []
    for rel, label in items:
        path = os.path.join(root, rel)
        try:
            with open_image(path, f"image file {path}") as img:
                rgb = to_rgb(img, f"image file {path}")
                stored_as_is = _stored_as_is(img, path)
            if with_stats:
                # The record training reads: the file's bytes, or rgb stored losslessly.
                item = pathlib.Path(path).read_bytes() if stored_as_is else rgb
                pixels.add(eval_transform(item, size, resize == "imagenet", f"image file {path}"))
        except Exception as e:  # PIL raises several unrelated types for corrupt files.
            reason = e.reason if isinstance(e, ImageReadError) else one_line(e)
            unreadable.append(SkippedFile(rel, reason))
            continue
        good.append((rel, label, not stored_as_is))
        sizes[(rgb.shape[1], rgb.shape[0])] += 1
    return pixels, sizes, good, unreadable


class _Progress:
    """Progress lines of one phase of one split: at most one per PROGRESS_SECONDS, and the last."""

    # Not a progress-bar library: these are rate-limited lines handed to a callback (a logger,
    # print, a test's list), which tqdm and rich do not produce.

    def __init__(self, label: str, total: int, emit: Callable[[str], None]):
        self._label, self._total, self._emit = label, total, emit
        self._t0 = self._last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done < self._total and now - self._last < PROGRESS_SECONDS:
            return
        self._last = now
        rate = done / max(now - self._t0, 1e-9)
        left = f", {(self._total - done) / rate:.0f} s left" if done < self._total and rate else ""
        self._emit(f"{self._label}: {done}/{self._total} images ({rate:.0f}/s{left})")


def _scan(
    root: str,
    plan: dict[str, list[tuple[str, int]]],
    stats_split: str,
    num_workers: int,
    progress: Callable[[str], None],
    skip_corrupt: bool,
    size: int,
    resize: str,
) -> tuple[dict[str, list[tuple[str, int, bool]]], collections.Counter, list, PixelStats]:
    """Decodes every image on a thread pool. Stops at the first unreadable image unless
    skip_corrupt.

    Returns:
      each split's readable (file, label, re-encode) in order, (width, height) counts,
      unreadable files, and the pixel statistics of ``stats_split``'s images resized to
      ``size`` as training resizes them (``resize``).
    """
    from lbq.data.pipeline import _ordered_map

    sizes: collections.Counter = collections.Counter()
    unreadable: list[SkippedFile] = []
    pixels = PixelStats()
    scanned: dict[str, list[tuple[str, int, bool]]] = {}
    for split, items in plan.items():
        scan = functools.partial(
            _scan_chunk, root, with_stats=split == stats_split, size=size, resize=resize
        )
        chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
        bar = _Progress(f"scan {split}", len(items), progress)
        scanned[split] = []
        done = 0
        for chunk_pixels, chunk_sizes, good, bad in _ordered_map(
            scan, chunks, num_workers, num_workers + 2
        ):
            if bad and not skip_corrupt:
                raise ImageReadError(
                    f"cannot read image file {os.path.join(root, bad[0].path)}: {bad[0].reason} "
                    f"(pass --skip_corrupt to skip and list unreadable images)",
                    bad[0].reason,
                )
            pixels.merge(chunk_pixels)
            sizes.update(chunk_sizes)
            unreadable += bad
            scanned[split] += good
            done += len(good) + len(bad)
            bar.update(done)
    return scanned, sizes, unreadable, pixels


def _builder_class() -> type:
    """Defines the TFDS builder lazily, so importing lbq.data does not import TFDS."""
    import tensorflow_datasets as tfds

    class FolderImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """TFDS builder for one prepared image folder: ``info`` holds ``DatasetInfo``'s
        arguments but the builder, ``examples`` each split's (key, example) iterator."""

        VERSION = tfds.core.Version(VERSION)
        # TFDS looks for a checksums file beside the builder's code; this builder downloads
        # nothing, and the lookup needs `importlib_resources`, which some installs lack.
        code_path = None

        def __init__(self, *, name: str, info: dict, examples: dict, **kwargs: Any):
            self.name = name
            self._info_kwargs = info
            self._examples = examples
            super().__init__(**kwargs)

        # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ...
        # downloaded and prepared" to stdout from these two hooks: nothing is downloaded here,
        # and lbq.data.prepare reports what it wrote itself.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(builder=self, **self._info_kwargs)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            del dl_manager
            return self._examples

        _generate_examples = None  # abstract in TFDS; _split_generators gives the examples

    return FolderImageBuilder


def _examples(
    root: str, split: str, items: Sequence[tuple[str, int, bool]], progress: Callable[[str], None]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A split's (key, example) pairs from its (file, label, re-encode): a file TFDS stores byte
    for byte (its path), or the PIL image of its 8-bit RGB form, which TFDS encodes as PNG."""
    from PIL import Image

    bar = _Progress(f"write {split}", len(items), progress)
    for i, (rel, label, reencode) in enumerate(items):
        path = os.path.join(root, rel)
        image: Any = path
        if reencode:
            with open_image(path, f"image file {path}") as img:
                image = Image.fromarray(to_rgb(img, f"image file {path}"))
        yield rel, {"image": image, "label": label, "file_name": rel}
        bar.update(i + 1)


def write_tfds(
    name: str,
    root: str,
    data_dir: str,
    class_names: Sequence[str],
    splits: dict[str, list[tuple[str, int, bool]]],
    metadata: dict[str, Any],
    progress: Callable[[str], None],
) -> str:
    """Writes the scanned splits, each a list of (file relative to root, label, re-encode), as
    TFDS ArrayRecord files; returns the dataset's folder."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    os.makedirs(data_dir, exist_ok=True)
    features = {
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=list(class_names)),
        "file_name": tfds.features.Text(),
    }
    builder = _builder_class()(
        name=name,
        info=dict(
            description=f"Image folder {root}, prepared by lbq.data.prepare.",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(metadata),
        ),
        examples={s: _examples(root, s, items, progress) for s, items in splits.items()},
        data_dir=data_dir,
    )
    progress(f"write TFDS dataset {name} {VERSION} (array_record) to {builder.data_dir}")
    # TFDS's own tqdm bars ("Generating splits...", "Shuffling .../incomplete...") off, then
    # restored: lbq prints its own progress lines. TFDS has a setter but no getter.
    was_on = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        # Keep TFDS's (unused) download folder out of the data dir.
        with tempfile.TemporaryDirectory() as download_dir:
            builder.download_and_prepare(download_dir=download_dir, file_format="array_record")
    except BaseException:
        # A half-written dataset would block the next attempt ("already exists").
        shutil.rmtree(os.path.join(data_dir, name), ignore_errors=True)
        raise
    finally:
        tqdm_utils.display_progress_bar(was_on)
    return str(builder.data_dir)


def _choose_splits(root: str, splits: Sequence[str] | None) -> tuple[list[str], list[SkippedFile]]:
    """The split folders to prepare, and what else ROOT holds (listed when splits is None)."""
    if not os.path.isdir(root):
        raise FolderLayoutError(f"image folder {root} does not exist")
    found, skipped = _entries(root, "", "split")
    if isinstance(splits, str):  # a single split name, not a sequence of characters
        splits = [splits]
    if splits is None:
        if not found:
            raise FolderLayoutError(
                f"image folder {root} has no split folders (expected {root}/<split>/<class>/"
                f"<image>.jpg)"
            )
        return found, skipped
    for split in splits:
        if not os.path.isdir(os.path.join(root, split)):
            raise FolderLayoutError(
                f"split folder {os.path.join(root, split)} is missing (found: "
                f"{', '.join(found) or 'nothing'})"
            )
    return list(splits), []


def _check_can_write(name: str, data_dir: str, overwrite: bool) -> None:
    """Refuses before any image is read: no TFDS, a bad name, or a dataset already there."""
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
    if os.path.exists(os.path.join(data_dir, name)) and not overwrite:
        raise DataError(
            f"dataset {name!r} already exists in {data_dir}; pass overwrite=True "
            f"(--overwrite) to rebuild it"
        )


def _metadata(root: str, mean, std, stats_split: str, sizes, size: int, resize: str) -> dict:
    """The dataset's metadata.json: its statistics with the size and resize they were measured
    at, and its image shape when there is one."""
    return {
        "mean": list(mean),  # Python floats: JSON keeps every float64 digit
        "std": list(std),
        "stats_split": stats_split,
        "stats_image_size": size,
        "stats_resize": resize,
        # (H, W, 3) when every image has one size: lets training cache small images decoded.
        "image_shape": [*next(iter(sizes))[::-1], 3] if len(sizes) == 1 else None,
        "source_root": root,
        "prepared_by": "lbq.data.prepare",
    }


def _default_eval_split(plan, stats_split: str) -> str:
    """'test', 'validation' or 'val' when present, else another split than the statistics'."""
    return next(
        (s for s in ("test", "validation", "val") if s in plan and s != stats_split),
        next((s for s in plan if s != stats_split), stats_split),
    )


def _stats_resize(image_size: Any, augment: str) -> str:
    """'imagenet' or 'whole': how training resizes for ``augment``; refuses bad values."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size={image_size!r} must be a positive whole number of pixels")
    if augment not in AUGMENTATIONS:
        raise DataError(f"augment={augment!r} is not one of {', '.join(AUGMENTATIONS)}")
    return "imagenet" if augment == "imagenet" else "whole"


def prepare_folder(
    root: str,
    data_dir: str,
    name: str,
    *,
    splits: Sequence[str] | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    skip_corrupt: bool = False,
    progress: Callable[[str], None] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    augment: str = "none",
) -> PreparedFolder:
    """Builds a TFDS dataset (ArrayRecord) named ``name`` in ``data_dir`` from an image folder.

    Afterwards ``data_config.name = name, data_config.data_dir = data_dir`` reads it through
    the normal TFDS path. Labels are the sorted union of class folder names over the splits.

    Args:
      root: folder with ROOT/<split>/<class>/<image>, images possibly in sub-folders of a class
        folder; extensions ``IMAGE_EXTENSIONS``, any case.
      data_dir: TFDS data dir to write into (created if missing).
      name: dataset name: lowercase letters, digits and _, not an existing TFDS name.
      splits: split folders to use; default every sub-folder of root.
      num_workers: decode threads for the validation/statistics pass.
      overwrite: replace a dataset of the same name already prepared in data_dir.
      skip_corrupt: skip images that cannot be decoded or converted to RGB and list them in
        ``PreparedFolder.unreadable``, instead of stopping at the first.
      progress: called with progress lines, at most one per ``PROGRESS_SECONDS`` per split and
        phase (default: logging.info).
      image_size: the side training resizes images to (``data.image_size``): mean/std are
        measured on the images at that size, as training receives them.
      augment: the run's ``data.augment``; 'imagenet' measures the shorter-side resize and
        centre crop that training evaluates with, 'cifar' and 'none' the whole-image resize.

    Returns:
      ``PreparedFolder``, mean/std measured on the 'train' split (else the first split); its
      ``report()`` is the text ``python -m lbq.data.prepare`` prints.

    Raises:
      FolderLayoutError: no split or class folders, a class folder without images, fewer than
        two classes, or a class with images in another split but none in 'train'.
      ImageReadError: an image cannot be decoded or has no 8-bit RGB form (see
        ``lbq.data.transforms.to_rgb``), unless skip_corrupt.
      DataError: a bad dataset name, an existing dataset without overwrite, an image_size
        below 1 or an unknown augment.
    """
    t0 = time.monotonic()
    log = progress or logging.getLogger(__name__).info
    root = os.path.abspath(os.fspath(root))
    data_dir = os.path.abspath(os.fspath(data_dir))
    workers = default_num_workers() if num_workers is None else max(1, num_workers)
    _check_can_write(name, data_dir, overwrite)
    resize = _stats_resize(image_size, augment)
    split_names, skipped = _choose_splits(root, splits)
    listing = _list_splits(root, split_names, skipped)
    stats_split = "train" if "train" in listing else split_names[0]
    class_names, plan = _plan(root, listing, stats_split)
    scanned, sizes, unreadable, pixels = _scan(
        root, plan, stats_split, workers, log, skip_corrupt, image_size, resize
    )
    class_counts = {
        s: tuple(np.bincount([x[1] for x in items], minlength=len(class_names)).tolist())
        for s, items in scanned.items()
    }
    for split, per_class in listing.items():  # with skip_corrupt, a class may have lost all
        for cls, files in per_class.items():
            if not class_counts[split][class_names.index(cls)]:
                raise FolderLayoutError(
                    f"class folder {os.path.join(root, split, cls)} holds no readable image "
                    f"(all {len(files)} are unreadable)"
                )
    mean, std = pixels.mean_std()

    target = os.path.join(data_dir, name)
    if os.path.exists(target):  # overwrite: only now that the folder checked out
        shutil.rmtree(target)
    metadata = _metadata(root, mean, std, stats_split, sizes, image_size, resize)
    path = write_tfds(name, root, data_dir, class_names, scanned, metadata, log)
    _check_written(name, data_dir, scanned)
    return PreparedFolder(
        name=name,
        data_dir=data_dir,
        path=path,
        class_names=tuple(class_names),
        class_counts=class_counts,
        stats_split=stats_split,
        eval_split=_default_eval_split(scanned, stats_split),
        mean=tuple(mean),
        std=tuple(std),
        image_sizes=dict(sizes),
        skipped=tuple(skipped),
        unreadable=tuple(unreadable),
        seconds=time.monotonic() - t0,
        stats_image_size=image_size,
        stats_resize=resize,
    )
