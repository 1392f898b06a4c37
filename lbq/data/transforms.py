"""Host-side decoding and augmentation (NumPy + PIL), one example or one batch at a time.

Items are decoded uint8 HxWx3 arrays (in-memory datasets) or encoded image bytes (TFDS records).
Large JPEGs are DCT-downscaled while decoding (PIL's ``draft``) when the output needs fewer
pixels. Every reader opens images with ``open_image`` and converts them with ``to_rgb``.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from lbq.data.errors import ImageReadError

# Eval resize for ImageNet-style preprocessing: shorter side to size*256/224, centre crop size.
RESIZE_RATIO = 256 / 224
# Inception-style random-resized-crop ranges.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Transparent pixels are composited over white, so that an image's transparent background looks
# the same whatever colour the file keeps under it (often an arbitrary palette entry). Loaders
# that call Image.convert("RGB") (torchvision's ImageFolder, Keras) drop alpha instead.
ALPHA_BACKGROUND = 255
MAX_16BIT = 65535
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_TIFF_BITS_PER_SAMPLE = 258
# EXIF Orientation: 1 is upright; 2..8 are the mirrored and rotated ones a viewer undoes.
EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = frozenset(range(2, 9))


def _refuse(what: str, reason: str, verb: str = "use") -> ImageReadError:
    return ImageReadError(f"cannot {verb} {what}: {reason}", reason)


def open_image(source: bytes | str | np.ndarray, what: str) -> Any:
    """Opens an image as a viewer shows it, for training, evaluation, ``lbq.data.prepare`` and
    ``lbq.predict`` alike. A file whose EXIF Orientation tag (0x0112) is 2..8 (a camera's rotated
    or mirrored JPEG) is turned upright (Pillow's ``ImageOps.exif_transpose``); any other file is
    opened lazily (header only), so that ``_finish`` can still DCT-downscale a large JPEG.

    Args:
      source: encoded image bytes, a file path, or a decoded uint8 [H, W, 3] array.
      what: names the image in error messages, e.g. "image file /data/train/cat/1.jpg".

    Returns:
      A PIL image (call ``to_rgb`` for its 8-bit RGB pixels).

    Raises:
      ImageReadError: one line naming ``what`` when the data is not an image Pillow can open.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if isinstance(source, np.ndarray):
            return Image.fromarray(source)
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source)
        if img.getexif().get(EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS:
            with img:
                img = ImageOps.exif_transpose(img)
        return img
    except UnidentifiedImageError as e:
        reason = "cannot identify image file (not an image, or a format Pillow cannot read)"
        raise _refuse(what, reason, "decode") from e
    except Exception as e:  # PIL raises several unrelated types for corrupt data.
        raise _refuse(what, one_line(e), "decode") from e


# Pillow names in-memory files by their repr ("<_io.BytesIO object at 0x7f...>") in some
# messages; the file's own name is in the message's prefix, so the repr is dropped.
_FILE_OBJECT_REPR = re.compile(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>")


def one_line(error: Exception) -> str:
    """An exception's message on one line (decoder messages may span several), without the
    repr of an in-memory file object."""
    text = _FILE_OBJECT_REPR.sub("", str(error))
    return " ".join(text.split()) or type(error).__name__


def _high_depth_to_uint8(img: Any, values: np.ndarray, what: str) -> np.ndarray:
    """8-bit grey levels of an I;16*, I or F image (see ``to_rgb``)."""
    if img.mode == "F":
        x = values.astype(np.float64)
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            finite = x[np.isfinite(x)]
            span = f"[{finite.min():g}, {finite.max():g}]" if finite.size else "no finite value"
            raise _refuse(
                what,
                f"32-bit float pixels span {span}"
                f"{'' if finite.size == x.size else ' and include NaN or inf'}; lbq reads float "
                f"images as 0..1 (scale them to 0..1 or save them as 8- or 16-bit)",
            )
        return np.round(x * 255).astype(np.uint8)
    if img.mode == "I" and img.format == "TIFF":
        bits = img.tag_v2.get(_TIFF_BITS_PER_SAMPLE, (32,))
        bits = bits[0] if isinstance(bits, tuple) else bits
        if bits != 16:
            raise _refuse(
                what,
                f"{bits}-bit integer pixels have no standard 8-bit scale (save it as 8- or 16-bit)",
            )
    x = values.astype(np.int64)
    if x.size and (x.min() < 0 or x.max() > MAX_16BIT):
        raise _refuse(
            what,
            f"integer pixels span [{x.min()}, {x.max()}], outside the 16-bit range 0..{MAX_16BIT}",
        )
    # round(v * 255 / 65535) in integers; ties cannot occur (65535 is odd).
    return ((x * 255 + MAX_16BIT // 2) // MAX_16BIT).astype(np.uint8)


def to_rgb(img: Any, what: str = "image") -> np.ndarray:
    """The 8-bit RGB pixels of a PIL image of any mode.

    - RGB (no transparency): as decoded. 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's
      ``convert("RGB")`` (CMYK as (255-c)(255-k)/255; embedded ICC profiles are not applied).
    - 16-bit grey (I;16, I;16L, I;16B, I;16N, and I, Pillow's mode for 16-bit PNM and 16-bit
      TIFF data): round(v * 255 / 65535) in every channel. Pillow's own ``convert`` clips at
      255, which turns a 16-bit ramp into black and white.
    - 32-bit float grey (F): read as 0..1 (the usual range of float images): round(v * 255).
    - Alpha (LA, PA, RGBA, RGBa, or a transparent colour or palette index in ``img.info``):
      composited over white: round((c*a + 255*(255-a)) / 255) (Pillow's ``paste``).
    - Refused with ``ImageReadError``: 32-bit integer TIFFs, I values outside 0..65535, F values
      outside [0, 1] or not finite, and modes Pillow cannot convert (La).

    Multi-frame files (GIF, TIFF) give their first frame. Pillow itself reads 16-bit colour PNGs
    as 8-bit by dropping the low byte (v >> 8), at most one level below round(v * 255 / 65535).

    Args:
      img: an opened PIL image (decoded here if it was only opened).
      what: names the image in error messages, e.g. "image file /data/train/cat/1.png".

    Returns:
      uint8 [H, W, 3].

    Raises:
      ImageReadError: the file cannot be decoded, or its mode/values have no defined 8-bit RGB
        form; one line naming ``what``.
    """
    try:
        img.load()
        mode, transparency = img.mode, img.info.get("transparency")
        if mode == "RGB" and transparency is None:
            return np.asarray(img)
        if mode in _HIGH_DEPTH_MODES:
            values = np.asarray(img)
        elif mode in _ALPHA_MODES or transparency is not None:
            from PIL import Image

            rgba = img.convert("RGBA")
            rgb = Image.new("RGB", img.size, (ALPHA_BACKGROUND,) * 3)
            rgb.paste(rgba, mask=rgba)  # round((c*a + bg*(255-a)) / 255), exactly
            return np.asarray(rgb)
        else:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises several unrelated types for corrupt or odd files.
        raise _refuse(what, one_line(e), "decode") from e
    rgb = np.repeat(_high_depth_to_uint8(img, values, what)[..., None], 3, axis=-1)
    if transparency is None:
        return rgb
    # tRNS: one grey value is transparent.
    return np.where((values == transparency)[..., None], np.uint8(ALPHA_BACKGROUND), rgb)


def _finish(img: Any, size: int, box: tuple[float, float, float, float], what: str) -> np.ndarray:
    """Decodes (downscaled by ``draft`` where possible), crops ``box`` and resizes to size."""
    from PIL import Image

    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    if img.format == "JPEG":
        # Largest DCT downscale that keeps at least `size` pixels across the crop box.
        img.draft("RGB", (math.ceil(w * size / bw), math.ceil(h * size / bh)))
        fx, fy = img.size[0] / w, img.size[1] / h
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    if img.mode != "RGB" or "transparency" in img.info:
        img = Image.fromarray(to_rgb(img, what))
    # A plain RGB image goes to PIL's resize as it is (a trip through NumPy costs ~10 % of an
    # ImageNet image's decode); its decoding happens here, hence the error's wording.
    try:
        if box == (0, 0, *img.size) and img.size == (size, size):
            return np.asarray(img)
        return np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    except Exception as e:  # PIL raises several unrelated types for corrupt data
        raise _refuse(what, one_line(e), "decode") from e


def decode_rgb(item: Any, what: str = "image") -> np.ndarray:
    """Full-resolution uint8 HxWx3 array of an item (array passes through; see ``to_rgb``)."""
    return item if isinstance(item, np.ndarray) else to_rgb(open_image(item, what), what)


def eval_transform(item: Any, size: int, imagenet_style: bool, what: str = "image") -> np.ndarray:
    """Deterministic preprocessing to a size x size x 3 uint8 image.

    Args:
      item: uint8 HxWx3 array or encoded image bytes.
      size: output height and width.
      imagenet_style: resize the shorter side to size*256/224 and centre-crop; otherwise the
        whole image is resized to size x size (a no-op for CIFAR-sized inputs).
      what: description of the item for error messages.

    Returns:
      uint8 array [size, size, 3].
    """
    if isinstance(item, np.ndarray) and not imagenet_style and item.shape[:2] == (size, size):
        return item
    img = open_image(item, what)
    w, h = img.size
    if imagenet_style:
        # Centre crop of the shorter-side-resized image, expressed in source pixels.
        side = min(w, h) * size / round(size * RESIZE_RATIO)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    else:
        box = (0, 0, w, h)
    return _finish(img, size, box, what)


def sample_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """Inception-style random crop box (area 8..100%, aspect 3/4..4/3), centre crop fallback."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            x = int(rng.integers(0, width - cw + 1))
            y = int(rng.integers(0, height - ch + 1))
            return (x, y, x + cw, y + ch)
    # Fallback: the largest centred crop whose aspect ratio is within range.
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    cw, ch = min(width, round(height * ratio)), min(height, round(width / ratio))
    x, y = (width - cw) // 2, (height - ch) // 2
    return (x, y, x + cw, y + ch)


def random_resized_crop(
    item: Any, size: int, rng: np.random.Generator, flip: bool = True, what: str = "image"
) -> np.ndarray:
    """ImageNet training augmentation: random-resized crop to size x size + random h-flip.

    Args:
      item: uint8 HxWx3 array or encoded image bytes.
      size: output height and width.
      rng: generator for this example (the caller derives it from seed, step and row).
      flip: whether to flip horizontally with probability 1/2.
      what: description of the item for error messages.

    Returns:
      uint8 array [size, size, 3].
    """
    img = open_image(item, what)
    out = _finish(img, size, sample_crop_box(*img.size, rng), what)
    return out[:, ::-1] if flip and rng.random() < 0.5 else out


def cifar_params(rng: np.random.Generator, num: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws (offsets int [num, 2] in 0..2*pad, flips bool [num]) for ``pad_crop_flip``."""
    return rng.integers(0, 2 * pad + 1, size=(num, 2)), rng.random(num) < 0.5


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
    """CIFAR augmentation for a batch: zero-pad by ``pad``, crop HxW at ``offsets``, flip.

    Args:
      images: uint8 [N, H, W, C].
      offsets: int [N, 2], (y, x) crop origin in the padded image, each in 0..2*pad.
      flips: bool [N], flip horizontally.
      pad: zero padding on every side.

    Returns:
      uint8 [N, H, W, C].
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    # A loop of slice copies beats one fancy-indexing gather about 3x for CIFAR-sized batches.
    for i in range(n):
        y, x = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, y : y + h, x : x + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out
