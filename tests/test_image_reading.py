"""Images as training receives them: EXIF orientation everywhere, statistics after the resize,
and messages that name the file.

Every reader (lbq.data.prepare, its statistics, training's decode, lbq.predict) opens files with
``lbq.data.transforms.open_image``; these tests write real image files with Pillow and read them
back through each reader.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import lbq.data as data
from lbq.data import prepare, transforms
from lbq.data.digits import split_arrays
from lbq.data.stats import PixelStats
from lbq.predict import read_image

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pytest.importorskip("tensorflow_datasets")

ROTATED_CW = 6  # EXIF Orientation 6: a viewer rotates the stored pixels 90 degrees clockwise


def _digits(count: int, label: int) -> list[np.ndarray]:
    x, y = split_arrays("train")
    return [x[i] for i in np.flatnonzero(y == label)[:count]]


def _save_tagged(upright: np.ndarray, path: pathlib.Path, **kwargs) -> None:
    """Stores ``upright`` as a camera does: pixels turned 90 degrees counter-clockwise, tagged
    Orientation=6 so that a viewer shows them upright."""
    exif = Image.Exif()
    exif[transforms.EXIF_ORIENTATION] = ROTATED_CW
    Image.fromarray(np.rot90(upright)).save(path, exif=exif, **kwargs)


def _stored_pixels(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as img:  # Pillow itself ignores the tag
        return np.asarray(img.convert("RGB"))


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    upright = _digits(1, 3)[0]
    png, jpeg = tmp_path / "tagged.png", tmp_path / "tagged.jpg"
    _save_tagged(upright, png)
    _save_tagged(upright, jpeg, quality=95)
    assert not np.array_equal(_stored_pixels(png), upright)
    # PNG is lossless: the file read as a viewer shows it is the upright digit, exactly.
    with transforms.open_image(str(png), "png") as img:
        np.testing.assert_array_equal(transforms.to_rgb(img), upright)
    # A JPEG: its decoded pixels turned clockwise, as the tag says.
    want = np.rot90(_stored_pixels(jpeg), k=-1)
    with transforms.open_image(jpeg.read_bytes(), "jpeg") as img:
        np.testing.assert_array_equal(transforms.to_rgb(img), want)
    # Training's decode of a record, and lbq.predict, read the same pixels.
    got = transforms.eval_transform(jpeg.read_bytes(), 32, False, "jpeg")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        read_image(str(jpeg), {"image_size": 32, "imagenet_style": False}), want
    )
    np.testing.assert_array_equal(transforms.decode_rgb(png.read_bytes(), "png"), upright)


def test_prepare_stores_tagged_images_upright(tmp_path):
    root = tmp_path / "root"
    upright = {label: _digits(2, label) for label in (0, 1)}
    for label, images in upright.items():
        (root / "train" / str(label)).mkdir(parents=True)
        for i, image in enumerate(images):
            _save_tagged(image, root / "train" / str(label) / f"{i}.png")
    prepared = data.prepare_folder(str(root), str(tmp_path / "out"), "tagged", progress=print)
    cfg = dict(name="tagged", data_dir=str(tmp_path / "out"), eval_split="train")
    x, y = data.load_split_arrays(cfg, "train")
    for label, images in upright.items():
        got = sorted(im.tobytes() for im in x[y == prepared.class_names.index(str(label))])
        assert got == sorted(im.tobytes() for im in images)


def _stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = PixelStats()
    for image in images:
        pixels.add(np.asarray(image))
    return pixels.mean_std()


def test_statistics_are_measured_on_images_as_training_resizes_them(tmp_path, capsys):
    """20 digits and one 2000x2000 black PNG: at native resolution the black image holds 99.5 %
    of the pixels; resized to 32x32 as training resizes it, it is one image of 21."""
    root = tmp_path / "root"
    for label in (0, 1):
        (root / "train" / str(label)).mkdir(parents=True)
        for i, image in enumerate(_digits(10, label)):
            Image.fromarray(image).save(root / "train" / str(label) / f"{i}.png")
    Image.new("RGB", (2000, 2000)).save(root / "train" / "0" / "black.png")
    out = tmp_path / "out"
    status = prepare.main([f"--root={root}", f"--data_dir={out}", "--name=big_black"])
    report = capsys.readouterr().out
    assert status == 0 and "resized to 32x32" in report
    cfg = dict(name="big_black", data_dir=str(out), eval_split="train")
    seen, _ = data.load_split_arrays(cfg, "train")
    assert seen.shape == (21, 32, 32, 3)
    want = _stats(seen)
    native = _stats(
        [
            *(im for label in (0, 1) for im in _digits(10, label)),
            np.zeros((2000, 2000, 3), np.uint8),
        ]
    )
    assert want[0][0] > 20 * native[0][0]  # what the old native-pixel statistics would say
    metadata = json.loads(next(out.glob("big_black/*/metadata.json")).read_text())
    assert (metadata["mean"], metadata["std"]) == (list(want[0]), list(want[1]))
    assert metadata["stats_image_size"] == 32 and metadata["stats_resize"] == "whole"
    info = data.get_info(cfg)
    assert info.mean == want[0]
    # Trained at another size, the statistics are measured again at that size.
    at16 = data.get_info({**cfg, "image_size": 16})
    assert at16.mean == _stats(data.load_split_arrays({**cfg, "image_size": 16}, "train")[0])[0]
    assert at16.mean != info.mean


def test_prepare_measures_at_the_size_it_is_told(tmp_path, capsys):
    root = tmp_path / "root"
    for label in (0, 1):
        (root / "train" / str(label)).mkdir(parents=True)
        for i, image in enumerate(_digits(3, label)):
            Image.fromarray(image).save(root / "train" / str(label) / f"{i}.png")
    out = tmp_path / "out"
    args = [f"--root={root}", f"--data_dir={out}", "--name=at24", "--image_size=24"]
    assert prepare.main([*args, "--augment=imagenet"]) == 0
    cfg = dict(name="at24", data_dir=str(out), eval_split="train", image_size=24)
    imagenet = {**cfg, "augment": "imagenet"}
    want = _stats(data.load_split_arrays(imagenet, "train")[0])
    assert data.get_info(imagenet).mean == want[0]
    assert "imagenet-style" in capsys.readouterr().out
    assert prepare.main([*args, "--overwrite", "--image_size=0"]) == 2
    assert "image_size=0 must be a positive" in capsys.readouterr().err


def test_unreadable_images_are_named_not_a_file_object(tmp_path):
    garbage = tmp_path / "notes.jpg"
    garbage.write_bytes(b"this is text, not a JPEG")
    truncated = tmp_path / "cut.png"
    Image.fromarray(_digits(1, 5)[0]).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path in (garbage, truncated):
        with pytest.raises(data.ImageReadError) as e:
            read_image(str(path), {"image_size": 32, "imagenet_style": False})
        message = str(e.value)
        assert message.startswith(f"cannot decode {path}: ")
        assert "BytesIO" not in message and "object at 0x" not in message
        assert "\n" not in message
    with pytest.raises(data.ImageReadError, match="cannot identify image file"):
        transforms.decode_rgb(garbage.read_bytes(), str(garbage))
