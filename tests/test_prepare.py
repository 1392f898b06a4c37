"""Tests of image-folder preparation: every image mode to 8-bit RGB, exact and floored pixel
statistics, class checks, the prepare report (sizes, skipped and unreadable files), progress
and the CLI's output. Images are real files written with Pillow; a few are real CIFAR-10 JPEGs.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import pathlib
import tarfile
from fractions import Fraction

import numpy as np
import pytest

import lbq.data as data
from lbq.data import folder, prepare, transforms
from lbq.data.stats import STD_FLOOR, PixelStats, floor_std

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

tfds = pytest.importorskip("tensorflow_datasets")
CIFAR_TAR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


# ----------------------------------------------------------------------------- helpers


def saved(img, path, **kwargs):
    """Writes ``img`` to ``path`` (format from the extension) and opens the file again."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return Image.open(path)


def composite(colour, alpha):
    """Hand reference of alpha compositing over white, float64: c*a/255 + 255*(1 - a/255)."""
    c = np.asarray(colour, np.float64)
    a = np.asarray(alpha, np.float64)[..., None]
    return np.round(c * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)


def grey3(levels):
    return np.repeat(np.asarray(levels, np.uint8)[..., None], 3, axis=-1)


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def write_class(folder_path, arrays, ext=".png"):
    folder_path.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder_path / f"{i}{ext}")


def random_rgb(seed, count, size=(8, 8)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def two_classes(root, split="train", count=2, size=(8, 8)):
    write_class(root / split / "a", random_rgb(1, count, size))
    write_class(root / split / "b", random_rgb(2, count, size))


# ----------------------------------------------------------------------------- image modes

RAMP16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # the 16-bit ramp
# 16-bit values around the rounding points of v * 255 / 65535 (v/257 = k + 0.5 near 128.5).
ODD16 = np.array([[0, 128, 129, 385, 386, 32767, 32896, 65407, 65408, 65535]], np.uint16)


def expect16(values):
    return grey3(np.round(values.astype(np.float64) * 255 / 65535))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    # PNG (I;16), big-endian TIFF (I;16B) and 16-bit PGM (Pillow's mode I) hold 0..65535.
    png = saved(Image.fromarray(RAMP16), tmp_path / "ramp.png")
    assert png.mode == "I;16"
    rgb = transforms.to_rgb(png)
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb, grey3(np.arange(256).reshape(16, 16)))  # 256 levels
    odd = saved(Image.fromarray(ODD16), tmp_path / "odd.png")
    np.testing.assert_array_equal(transforms.to_rgb(odd), expect16(ODD16))
    big = Image.frombytes("I;16B", ODD16.shape[::-1], ODD16.astype(">u2").tobytes())
    tiff = saved(big, tmp_path / "odd.tif")
    assert tiff.mode == "I;16B"
    np.testing.assert_array_equal(transforms.to_rgb(tiff), expect16(ODD16))
    pgm = tmp_path / "odd.pgm"
    pgm.write_bytes(b"P5 10 1 65535\n" + ODD16.astype(">u2").tobytes())
    with Image.open(pgm) as img:
        assert img.mode == "I"
        np.testing.assert_array_equal(transforms.to_rgb(img), expect16(ODD16))
    # A transparent 16-bit grey value (PNG tRNS) becomes the white background.
    trns = saved(Image.fromarray(ODD16), tmp_path / "trns.png", transparency=32767)
    expected = expect16(ODD16)
    expected[ODD16 == 32767] = 255
    np.testing.assert_array_equal(transforms.to_rgb(trns), expected)


def test_float_grey_reads_zero_to_one(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1 / 3, 0.999, 1.0]], np.float32)
    img = saved(Image.fromarray(values), tmp_path / "f.tif")
    assert img.mode == "F"
    expected = grey3(np.round(values.astype(np.float64) * 255))
    assert expected[0, :, 0].tolist() == [0, 64, 128, 85, 255, 255]  # by hand
    np.testing.assert_array_equal(transforms.to_rgb(img), expected)


def test_one_bit_grey_palette(tmp_path):
    bits = np.array([[True, False, True]])
    one = saved(Image.fromarray(bits), tmp_path / "one.png")
    assert one.mode == "1"
    np.testing.assert_array_equal(transforms.to_rgb(one), grey3([[255, 0, 255]]))
    levels = np.arange(0, 256, 51, dtype=np.uint8)[None]
    grey = saved(Image.fromarray(levels), tmp_path / "l.png")
    assert grey.mode == "L"
    np.testing.assert_array_equal(transforms.to_rgb(grey), grey3(levels))
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    index = np.array([[0, 1, 2, 3]], np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette)
    opened = saved(pal, tmp_path / "p.png")
    assert opened.mode == "P" and "transparency" not in opened.info
    table = np.array(palette, np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(transforms.to_rgb(opened), table[index])


def test_alpha_is_composited_over_white(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    alpha[0, :3] = (0, 255, 128)
    rgba = saved(Image.fromarray(np.dstack([colour, alpha])), tmp_path / "rgba.png")
    assert rgba.mode == "RGBA"
    out = transforms.to_rgb(rgba)
    np.testing.assert_array_equal(out, composite(colour, alpha))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == colour[0, 1].tolist()
    grey = colour[..., 0]
    la = saved(Image.fromarray(np.dstack([grey, alpha]), mode="LA"), tmp_path / "la.png")
    assert la.mode == "LA"
    np.testing.assert_array_equal(transforms.to_rgb(la), composite(grey3(grey), alpha))
    # A transparent RGB colour (PNG tRNS): exactly those pixels become white.
    rgb = colour.copy()
    rgb[1, 1] = rgb[2, 2] = (1, 2, 3)
    keyed = saved(Image.fromarray(rgb), tmp_path / "keyed.png", transparency=(1, 2, 3))
    assert keyed.mode == "RGB" and keyed.info["transparency"] == (1, 2, 3)
    expected = rgb.copy()
    expected[(rgb == (1, 2, 3)).all(-1)] = 255
    np.testing.assert_array_equal(transforms.to_rgb(keyed), expected)


def test_palette_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 10, 10]
    table = np.array(palette, np.uint8).reshape(-1, 3)
    index = np.array([[0, 1, 2, 3]], np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette)
    # One transparent index (GIF): that index becomes white, the others keep their colour.
    gif = saved(pal, tmp_path / "p.gif", transparency=1)
    expected = table[index].copy()
    expected[0, 1] = 255
    np.testing.assert_array_equal(transforms.to_rgb(gif), expected)
    # An alpha per palette entry (PNG tRNS bytes).
    entry_alpha = np.array([0, 128, 255, 64], np.uint8)
    png = saved(pal, tmp_path / "p.png", transparency=entry_alpha.tobytes())
    np.testing.assert_array_equal(
        transforms.to_rgb(png), composite(table[index], entry_alpha[index])
    )
    # Palette + alpha band (PA, TIFF).
    pa = Image.frombytes("PA", (3, 1), bytes([0, 255, 1, 128, 2, 0]))
    pa.putpalette(palette)
    tiff = saved(pa, tmp_path / "pa.tif")
    assert tiff.mode == "PA"
    expected = composite(table[[[0, 1, 2]]], [[255, 128, 0]])
    np.testing.assert_array_equal(transforms.to_rgb(tiff), expected)


def test_colour_spaces(tmp_path):
    # CMYK (TIFF): (255 - c)(255 - k)/255, Pillow's conversion (no ICC profile).
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128], [100, 50, 0, 60]]], np.uint8)
    img = saved(Image.fromarray(cmyk, mode="CMYK"), tmp_path / "cmyk.tif")
    assert img.mode == "CMYK"
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = (255 - c) * (255 - k) / 255
    assert np.abs(transforms.to_rgb(img) - expected).max() <= 1
    # YCbCr (TIFF): the JFIF equations.
    ycc = np.array([[[100, 128, 128], [81, 90, 240], [200, 30, 160]]], np.uint8)
    img = saved(Image.fromarray(ycc, mode="YCbCr"), tmp_path / "ycc.tif")
    assert img.mode == "YCbCr"
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    jfif = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        -1,
    ).clip(0, 255)
    assert np.abs(transforms.to_rgb(img) - jfif).max() <= 1
    # CIE LAB (TIFF), neutral greys: L* -> Y -> sRGB by the CIE and sRGB formulas.
    levels = [0, 30, 64, 100, 128, 200, 255]
    lab = Image.frombytes("LAB", (len(levels), 1), bytes(v for L in levels for v in (L, 0, 0)))
    img = saved(lab, tmp_path / "lab.tif")
    assert img.mode == "LAB"

    def srgb(lightness):
        y = ((lightness + 16) / 116) ** 3 if lightness > 8 else lightness / 903.3
        return 255 * (12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055)

    expected = grey3([[0] * len(levels)]).astype(np.float64)
    expected[:] = np.array([srgb(L * 100 / 255) for L in levels])[None, :, None]
    assert np.abs(transforms.to_rgb(img) - expected).max() <= 1.5
    # HSV and RGBX exist in memory only (no file format stores them).
    hsv = np.array([[[0, 255, 255], [85, 255, 255], [170, 128, 200], [20, 0, 90]]], np.uint8)
    expected = np.array(
        [[[255 * v for v in colorsys.hsv_to_rgb(*(p / 255))] for p in hsv[0]]], np.float64
    )
    assert np.abs(transforms.to_rgb(Image.fromarray(hsv, mode="HSV")) - expected).max() <= 1
    rgbx = Image.frombytes("RGBX", (1, 1), bytes([9, 8, 7, 0]))
    assert transforms.to_rgb(rgbx).tolist() == [[[9, 8, 7]]]
    # Premultiplied alpha (RGBa): composite = c_premultiplied + 255 - a.
    rgba_pre = Image.frombytes("RGBa", (2, 1), bytes([100, 50, 0, 128, 10, 20, 30, 255]))
    expected = np.array([[[100 + 127, 50 + 127, 0 + 127], [10, 20, 30]]])
    assert np.abs(transforms.to_rgb(rgba_pre) - expected).max() <= 1


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("int32_tiff", "32-bit integer pixels"),
        ("float_above_one", "span [0, 2]"),
        ("float_nan", "NaN"),
        ("la_in_memory", "La"),
        ("truncated_png", "truncated"),
    ],
)
def test_images_without_an_8bit_form_are_refused(tmp_path, kind, fragment):
    path = tmp_path / f"{kind}.tif"
    if kind == "int32_tiff":
        Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
    elif kind == "float_above_one":
        Image.fromarray(np.array([[0.0, 2.0]], np.float32)).save(path)
    elif kind == "float_nan":
        Image.fromarray(np.array([[0.0, np.nan]], np.float32)).save(path)
    elif kind == "truncated_png":
        path = tmp_path / "cut.png"
        Image.fromarray(random_rgb(0, 1, (64, 64))[0]).save(path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.ImageReadError) as e:
        if kind == "la_in_memory":
            transforms.to_rgb(Image.new("La", (2, 2)), f"image file {path}")
        else:
            with Image.open(path) as img:
                transforms.to_rgb(img, f"image file {path}")
    message = one_line(e)
    assert str(path) in message and fragment in message


def test_training_decode_uses_the_same_conversion(tmp_path):
    # Records of a TFDS dataset that were not written by lbq.data.prepare may be 16-bit.
    path = tmp_path / "ramp.png"
    Image.fromarray(RAMP16).save(path)
    encoded = path.read_bytes()
    levels = grey3(np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(transforms.decode_rgb(encoded), levels)
    np.testing.assert_array_equal(transforms.eval_transform(encoded, 16, False), levels)


def test_sixteen_bit_png_through_prepare(tmp_path):
    root = tmp_path / "root"
    (root / "train" / "ramp").mkdir(parents=True)
    Image.fromarray(RAMP16).save(root / "train" / "ramp" / "ramp.png")
    write_class(root / "train" / "noise", random_rgb(3, 1, (16, 16)))
    prepared = data.prepare_folder(str(root), str(tmp_path / "out"), "ramp16", progress=print)
    cfg = dict(name="ramp16", data_dir=str(tmp_path / "out"), eval_split="train", image_size=16)
    x, y = data.load_split_arrays(cfg, "train")
    ramp = x[y == prepared.class_names.index("ramp")][0]
    np.testing.assert_array_equal(ramp, grey3(np.arange(256).reshape(16, 16)))


# ----------------------------------------------------------------------------- statistics


def test_pixel_stats_are_exact():
    stats = PixelStats()
    stats.add(np.array([[[0, 7, 255], [1, 7, 0]]], np.uint8))
    stats.add(np.array([[1, 7, 0]], np.uint8))  # merging chunks: same result as one array
    mean, std = stats.mean_std()
    assert mean == (2 / 3, 7.0, 85.0)
    # Population variance by hand: channel 0 = {0, 1, 1}: 2/9; channel 2 = {255, 0, 0}: 14450.
    assert std == (math.sqrt(Fraction(2, 9)), 0.0, math.sqrt(14450))
    other = PixelStats()
    other.merge(stats)
    assert other.mean_std() == (mean, std)
    with pytest.raises(data.DataError, match="empty"):
        PixelStats().mean_std()


def test_floor_std_warns_naming_the_channel(caplog):
    with caplog.at_level(logging.WARNING, logger="lbq"):
        assert floor_std((60.5, 0.25, 0.0), "dataset 'x'") == (60.5, STD_FLOOR, STD_FLOOR)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "green" in messages[0] and "blue" in messages[1] and "dataset 'x'" in messages[1]
    with pytest.raises(data.DataError, match="red"):
        floor_std((float("nan"), 1.0, 1.0), "dataset 'x'")
    with pytest.raises(data.DataError, match="below"):
        data.DatasetInfo("x", 10, (8, 8, 3), 1, 1, (0.0,) * 3, (50.0, 50.0, 0.0))


def test_zero_blue_channel_is_floored_and_stats_are_stored_exactly(tmp_path, caplog):
    root = tmp_path / "root"
    arrays = {cls: random_rgb(seed, 3, (5, 7)) for seed, cls in enumerate(("a", "b"))}
    for cls, images in arrays.items():
        for image in images:
            image[..., 2] = 0  # blue always 0
        write_class(root / "train" / cls, images)
    prepared = data.prepare_folder(str(root), str(tmp_path / "out"), "no_blue", progress=print)
    # Independent float64 reference over every pixel training receives (resized to 32x32).
    cfg = dict(name="no_blue", data_dir=str(tmp_path / "out"), eval_split="train")
    seen, _ = data.load_split_arrays(cfg, "train")
    assert seen.shape == (6, 32, 32, 3) and prepared.stats_image_size == 32
    pixels = seen.reshape(-1, 3)
    ref_mean = pixels.astype(np.float64).mean(0)
    ref_std = pixels.astype(np.float64).std(0)
    np.testing.assert_allclose(prepared.mean, ref_mean, rtol=1e-13)
    np.testing.assert_allclose(prepared.std, ref_std, rtol=1e-13)
    assert prepared.std[2] == 0.0
    # metadata.json keeps every float64 digit (no rounding to 3 decimals).
    metadata = json.loads((pathlib.Path(prepared.path) / "metadata.json").read_text())
    assert tuple(metadata["mean"]) == prepared.mean and tuple(metadata["std"]) == prepared.std
    assert any(abs(v - round(v, 3)) > 1e-6 for v in metadata["mean"][:2])
    assert any("blue" in w and "floor" in w for w in prepared.warnings())
    assert any(line.startswith("warning:") and "blue" in line for line in prepared.report())
    # Training reads the floored std, and says so.
    with caplog.at_level(logging.WARNING, logger="lbq"):
        info = data.get_info(
            dict(name="no_blue", data_dir=str(tmp_path / "out"), eval_split="train")
        )
    assert info.std[:2] == prepared.std[:2] and info.std[2] == STD_FLOOR
    assert info.mean == prepared.mean
    assert any("blue" in r.getMessage() for r in caplog.records)
    normalised = (pixels - np.array(info.mean)) / np.array(info.std)
    assert np.isfinite(normalised).all()


def _write_dataset(tmp_path, name, class_names, metadata, arrays_per_class):
    """A TFDS dataset written by the same builder prepare uses, bypassing prepare's checks, as
    an older lbq version or another tool could have written it."""
    root = tmp_path / f"{name}_src"
    files, labels = [], []
    for label, (cls, arrays) in enumerate(zip(class_names, arrays_per_class, strict=True)):
        write_class(root / "train" / cls, arrays)
        files += [f"train/{cls}/{i}.png" for i in range(len(arrays))]
        labels += [label] * len(arrays)
    split = [(f, label, False) for f, label in zip(files, labels, strict=True)]
    folder.write_tfds(
        name, str(root), str(tmp_path / "out"), class_names, {"train": split}, metadata, print
    )
    return dict(name=name, data_dir=str(tmp_path / "out"), eval_split="train")


def test_std_from_older_metadata_or_sampling_is_floored(tmp_path, caplog):
    images = random_rgb(5, 2)
    # An older prepare stored a zero std (rounded to 3 decimals).
    old = _write_dataset(
        tmp_path,
        "old_zero_std",
        ["a", "b"],
        {"mean": [1.0, 2.0, 3.0], "std": [0.0, 5, 9]},
        [images[:1], images[1:]],
    )
    with caplog.at_level(logging.WARNING, logger="lbq"):
        assert data.get_info(old).std == (STD_FLOOR, 5.0, 9.0)
    assert "red" in caplog.text
    # No stats in the metadata: they are sampled from the images, then floored.
    flat = [np.dstack([im[..., :2], np.full(im.shape[:2], 7, np.uint8)]) for im in images]
    sampled = _write_dataset(tmp_path, "no_stats", ["a", "b"], {}, [flat[:1], flat[1:]])
    info = data.get_info(sampled)
    assert info.std[2] == STD_FLOOR and info.mean[2] == 7.0
    bad = _write_dataset(
        tmp_path, "bad_stats", ["a", "b"], {"mean": [1, 2], "std": "x"}, [images[:1], images[1:]]
    )
    with pytest.raises(data.DataError, match="not 3 numbers") as e:
        data.get_info(bad)
    one_line(e)


# ----------------------------------------------------------------------------- classes


def test_one_class_is_refused_by_prepare_and_by_get_info(tmp_path):
    root = tmp_path / "root"
    write_class(root / "train" / "only", random_rgb(0, 2))
    write_class(root / "test" / "only", random_rgb(1, 2))
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "one_class")
    message = one_line(e)
    assert str(root) in message and "1 class" in message and "at least 2" in message
    assert not (tmp_path / "out" / "one_class").exists()
    # A one-class TFDS dataset from elsewhere fails when training reads its info.
    cfg = _write_dataset(tmp_path, "single", ["only"], {}, [random_rgb(0, 2)])
    with pytest.raises(data.DataError) as e:
        data.get_info(cfg)
    message = one_line(e)
    assert "'single'" in message and "1 class" in message and "at least 2" in message


def test_empty_and_imageless_class_folders_are_refused(tmp_path):
    root = tmp_path / "root"
    two_classes(root)
    empty = root / "train" / "c"
    empty.mkdir()
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "x")
    assert str(empty) in one_line(e) and "holds no images" in str(e.value)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "x")
    assert str(empty) in one_line(e) and "readme.txt" in str(e.value)
    empty.joinpath("readme.txt").unlink()
    empty.rmdir()
    # A class that has test images but no training images.
    two_classes(root, "test")
    write_class(root / "test" / "z", random_rgb(4, 1))
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "x")
    assert str(root / "test" / "z") in one_line(e) and "training" in str(e.value)


def test_folder_one_level_off_is_refused_with_a_hint(tmp_path):
    root = tmp_path / "root"
    write_class(root / "train", random_rgb(0, 2))  # ROOT/train/*.png, no class folders
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "x")
    assert "no class folders" in one_line(e) and "one level too deep" in str(e.value)
    # ROOT/data/<split>/<class>/: the splits would silently become two classes.
    high = tmp_path / "high"
    two_classes(high / "data", "train")
    two_classes(high / "data", "test")
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(high), str(tmp_path / "out"), "x")
    assert str(high / "data") in one_line(e) and "named like splits (test, train)" in str(e.value)


# ----------------------------------------------------------------------------- report


def _cifar_jpegs(count_per_class=3, classes=("airplane", "automobile")):
    """A few real CIFAR-10 train JPEGs (bytes) per class, read from the shared tarball."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {CIFAR_TAR}")
    found = {c: [] for c in classes}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if member.isfile() and parts[-3:-2] == ("train",) and parts[-2] in found:
                if len(found[parts[-2]]) < count_per_class:
                    found[parts[-2]].append((parts[-1], tar.extractfile(member).read()))
            if all(len(v) == count_per_class for v in found.values()):
                return found
    pytest.skip("the CIFAR-10 tarball lacks the expected classes")


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Real CIFAR JPEGs plus odd files: other sizes and modes, nested, .JPG, .webp, .txt,
    hidden files, a loose file in the split folder and one at the root."""
    root = tmp_path_factory.mktemp("mixed")
    for cls, files in _cifar_jpegs().items():
        for name, payload in files:
            target = root / "train" / cls / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
    train = root / "train"
    Image.new("RGB", (100, 80), (10, 20, 30)).save(train / "airplane" / "wide.png")
    Image.fromarray(RAMP16).save(train / "automobile" / "ramp16.png")
    Image.new("RGB", (40, 30), (200, 0, 0)).save(train / "automobile" / "UPPER.JPG")
    Image.new("RGB", (20, 20), (0, 90, 0)).save(train / "automobile" / "green.webp")
    (train / "airplane" / "nested" / "deeper").mkdir(parents=True)
    Image.new("P", (32, 32), 3).save(train / "airplane" / "nested" / "deeper" / "pal.gif")
    (train / "airplane" / "notes.txt").write_text("not an image")
    (train / "automobile" / ".DS_Store").write_bytes(b"\0")
    (train / "airplane" / ".thumbs").mkdir()
    (train / "loose.png").write_bytes((train / "airplane" / "wide.png").read_bytes())
    (root / "labels.csv").write_text("a,b\n")
    return root


def test_report_lists_sizes_skipped_files_and_use(mixed_folder, tmp_path):
    lines = []
    prepared = data.prepare_folder(
        str(mixed_folder), str(tmp_path), "mixed_small", progress=lines.append
    )
    assert prepared.class_names == ("airplane", "automobile")
    # 3 JPEGs + wide.png + nested pal.gif; 3 JPEGs + ramp16.png + UPPER.JPG + green.webp.
    assert prepared.class_counts == {"train": (5, 6)}
    assert prepared.image_sizes == {
        (32, 32): 7,
        (100, 80): 1,
        (16, 16): 1,
        (40, 30): 1,
        (20, 20): 1,
    }
    report = "\n".join(prepared.report())
    assert "width 16..100 (median 32), height 16..80 (median 32)" in report
    assert "5 distinct, most common: 32x32 (7)" in report
    assert "(224, 224, 3)" not in report
    assert "used at: data.image_size x data.image_size" in report
    skipped = {s.path: s.reason for s in prepared.skipped}
    assert skipped == {
        "labels.csv": "not inside a split folder",
        "train/loose.png": "not inside a class folder",
        "train/airplane/notes.txt": "extension .txt, not an image type lbq reads",
        "train/automobile/.DS_Store": "hidden file",
        "train/airplane/.thumbs/": "hidden folder",
    }
    assert "skipped 5 files" in report and "train/airplane/notes.txt" in report
    assert "--config.data.name=mixed_small" in report
    # The nested GIF and the upper-case .JPG are in the dataset.
    x, y = data.load_split_arrays(
        dict(name="mixed_small", data_dir=str(tmp_path), eval_split="train"), "train"
    )
    assert len(y) == 11
    # Progress: the last line of each phase is always printed.
    assert "scan train: 11/11 images" in "\n".join(lines)
    assert "write train: 11/11 images" in "\n".join(lines)


def test_webp_without_support_is_skipped_with_the_reason(tmp_path):
    path = tmp_path / "a.webp"
    path.write_bytes(b"RIFF")
    assert "WebP" in folder.skip_reason("a.webp", str(path), webp=False)
    assert folder.skip_reason("a.webp", str(path), webp=True) is None
    assert folder.skip_reason("A.WEBP", str(path), webp=True) is None
    assert folder.skip_reason("a.webp", str(tmp_path / "missing.webp"), webp=True).startswith(
        "not a regular file"
    )


def test_corrupt_image_stops_or_is_skipped_and_listed(tmp_path):
    root = tmp_path / "root"
    two_classes(root, count=3)
    bad = root / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(data.ImageReadError) as e:
        data.prepare_folder(str(root), str(tmp_path / "out"), "corrupt")
    message = one_line(e)
    assert str(bad) in message and "--skip_corrupt" in message
    prepared = data.prepare_folder(
        str(root), str(tmp_path / "out"), "corrupt", skip_corrupt=True, progress=print
    )
    assert prepared.class_counts == {"train": (3, 3)}
    assert [s.path for s in prepared.unreadable] == ["train/b/broken.jpg"]
    assert "cannot identify image file" in prepared.unreadable[0].reason
    assert any("unreadable" in w and "train/b/broken.jpg" in w for w in prepared.warnings())
    # A class whose every image is unreadable is refused even with skip_corrupt.
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(
            str(root), str(tmp_path / "out"), "corrupt", skip_corrupt=True, overwrite=True
        )
    assert str(root / "train" / "c") in one_line(e) and "no readable image" in str(e.value)


def test_cli_output_has_no_tfds_noise(tmp_path, capfd):
    root = tmp_path / "root"
    two_classes(root, count=2, size=(6, 9))
    two_classes(root, "test", count=1, size=(6, 9))
    (root / "train" / "a" / "junk.txt").write_text("x")
    status = prepare.main([f"--root={root}", f"--data_dir={tmp_path / 'out'}", "--name=cli_noise"])
    out, err = capfd.readouterr()
    assert status == 0, err
    for noise in (
        "Downloading and preparing",
        "downloaded and prepared",
        "Generating",
        "Shuffling",
    ):
        assert noise not in out + err
    assert out.startswith("prepared dataset 'cli_noise': 6 images in 2 classes")
    assert "image size (W x H): 9x6, all 6 images" in out
    assert "junk.txt" in out
    assert [line for line in err.splitlines() if not line.startswith("lbq: ")] == []
    assert "lbq: scan train: 4/4 images" in err and "lbq: write test: 2/2 images" in err
    # Errors: one line on stderr, exit 2, nothing on stdout.
    status = prepare.main([f"--root={root}", f"--data_dir={tmp_path / 'out'}", "--name=cli_noise"])
    out, err = capfd.readouterr()
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("lbq: error: dataset 'cli_noise' already exists")


def test_progress_lines_are_rate_limited(monkeypatch):
    lines = []
    bar = folder._Progress("scan train", 5, lines.append)
    for done in range(1, 6):
        bar.update(done)
    assert len(lines) == 1 and lines[0].startswith("scan train: 5/5 images")
    monkeypatch.setattr(folder, "PROGRESS_SECONDS", 0.0)
    lines.clear()
    bar = folder._Progress("write train", 3, lines.append)
    for done in range(1, 4):
        bar.update(done)
    assert [line.split(" (")[0] for line in lines] == [
        f"write train: {i}/3 images" for i in (1, 2, 3)
    ]
    assert "s left" in lines[0]


def test_help_names_the_command_and_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lbq.data.prepare ")
    assert "prepare an image folder as a TFDS dataset" in out
