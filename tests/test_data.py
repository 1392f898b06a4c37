"""Tests of lbq.data: digits, host pipelines, on-device batches, folder preparation, errors."""

from __future__ import annotations

import collections
import pathlib
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from runs import cifar_jpeg_source

import lbq.data as data
from lbq.data import transforms

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

REPO = pathlib.Path(__file__).resolve().parents[1]
PER_CLASS = 20  # real CIFAR JPEGs per class and split copied for the folder tests
CIFAR_CLASSES = 10


def digits_config(**overrides):
    cfg = dict(
        name="digits",
        data_dir=None,
        train_split="train",
        eval_split="test",
        image_size=32,
        augment="cifar",
        workers=2,
    )
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- digits


def test_import_is_cheap():
    code = (
        "import sys, lbq.data; "
        "heavy = [m for m in ('tensorflow_datasets', 'grain', 'sklearn', 'PIL', 'jax', "
        "'tensorflow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_digits_info():
    info = data.get_info(digits_config())
    assert info == data.DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(32, 32, 3),
        num_train=1437,
        num_eval=360,
        mean=info.mean,
        std=info.std,
    )
    assert len(info.mean) == len(info.std) == 3
    assert 0 < info.mean[0] < 255 and info.std[0] > 10
    assert data.get_info(digits_config(image_size=24)).image_shape == (24, 24, 3)


def test_digits_split_arrays():
    x, y = data.load_split_arrays(digits_config(), "train")
    assert x.shape == (1437, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (1437,) and y.dtype == np.int32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated to RGB
    xt, yt = data.load_split_arrays(digits_config(), "test")
    assert xt.shape == (360, 32, 32, 3)
    # Stratified: every class has 36 +- 1 test images.
    assert set(np.bincount(yt, minlength=10)) <= {35, 36, 37}
    x2, y2 = data.load_split_arrays(digits_config(), "train")
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    small, _ = data.load_split_arrays(digits_config(image_size=16), "test")
    assert small.shape == (360, 16, 16, 3)


def test_train_iterator_shapes_and_determinism():
    cfg = digits_config()
    a = take(data.train_iterator(cfg, seed=3, global_batch=64), 3)
    b = take(data.train_iterator(cfg, seed=3, global_batch=64), 3)
    assert_batches_equal(a, b)
    assert a[0]["image"].shape == (64, 32, 32, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].shape == (64,) and a[0]["label"].dtype == np.int32
    c = next(data.train_iterator(cfg, seed=4, global_batch=64))
    assert not np.array_equal(a[0]["image"], c["image"])
    # The worker count changes speed only, never the batches.
    d = take(data.train_iterator(digits_config(workers=0), seed=3, global_batch=64), 3)
    assert_batches_equal(a, d)


def test_train_iterator_resume_matches_uninterrupted_run():
    cfg = digits_config()
    steps_per_epoch = 1437 // 128  # 11: the run below crosses two epoch boundaries
    full = take(data.train_iterator(cfg, seed=0, global_batch=128), 2 * steps_per_epoch + 3)
    for start in (1, steps_per_epoch - 1, steps_per_epoch, 2 * steps_per_epoch + 1):
        resumed = data.train_iterator(cfg, seed=0, global_batch=128, start_step=start)
        assert_batches_equal(take(resumed, 2), full[start : start + 2])
    # Different epochs use different orders.
    assert not np.array_equal(full[0]["label"], full[steps_per_epoch]["label"])


def test_train_epoch_visits_distinct_examples():
    cfg = digits_config(augment="none")
    x, y = data.load_split_arrays(cfg, "train")
    available = collections.Counter(img.tobytes() for img in x)
    seen = collections.Counter()
    for batch in take(data.train_iterator(cfg, seed=1, global_batch=100), 1437 // 100):
        seen.update(img.tobytes() for img in batch["image"])
    assert sum(seen.values()) == 1400
    assert all(seen[k] <= available[k] for k in seen)  # no example twice in one epoch


def test_host_sharding_splits_the_global_batch():
    cfg = digits_config()
    whole = take(data.train_iterator(cfg, seed=5, global_batch=96, start_step=7), 2)
    hosts = [
        take(
            data.train_iterator(
                cfg, seed=5, global_batch=96, start_step=7, process_index=p, process_count=2
            ),
            2,
        )
        for p in range(2)
    ]
    for step in range(2):
        for key in ("image", "label"):
            assert hosts[0][step][key].shape[0] == 48
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    # Disjoint rows: with no augmentation each host's images are distinct examples.
    plain = digits_config(augment="none")
    h0, h1 = (
        next(data.train_iterator(plain, seed=5, global_batch=96, process_index=p, process_count=2))
        for p in range(2)
    )
    assert not {i.tobytes() for i in h0["image"]} & {i.tobytes() for i in h1["image"]}


def test_imagenet_style_augmentation_on_digits():
    cfg = digits_config(augment="imagenet", image_size=24)
    a = take(data.train_iterator(cfg, seed=0, global_batch=32), 2)
    b = take(data.train_iterator(cfg, seed=0, global_batch=32, start_step=1), 1)
    assert a[0]["image"].shape == (32, 24, 24, 3)
    assert_batches_equal(a[1:], b)
    ev = next(data.eval_iterator(cfg, global_batch=32))
    assert ev["image"].shape == (32, 24, 24, 3)


def test_eval_iterator_pads_and_masks():
    cfg = digits_config()
    x, y = data.load_split_arrays(cfg, "test")
    batches = list(data.eval_iterator(cfg, global_batch=128))
    assert [int(b["mask"].sum()) for b in batches] == [128, 128, 104]
    last = batches[-1]
    assert last["mask"].dtype == np.bool_ and not last["mask"][104:].any()
    assert not last["image"][104:].any() and not last["label"][104:].any()
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(images, x)
    # Two hosts: same number of batches, together every example exactly once.
    per_host = [
        list(data.eval_iterator(cfg, global_batch=128, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) == 3
    labels = np.concatenate(
        [np.concatenate([h[b]["label"][h[b]["mask"]] for h in per_host]) for b in range(3)]
    )
    np.testing.assert_array_equal(labels, y)


def test_transforms_pad_crop_flip_matches_slices():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    offsets, flips = transforms.cifar_params(rng, 5, 2)
    out = transforms.pad_crop_flip(images, offsets, flips, 2)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    for i in range(5):
        y0, x0 = offsets[i]
        ref = padded[i, y0 : y0 + 6, x0 : x0 + 7]
        np.testing.assert_array_equal(out[i], ref[:, ::-1] if flips[i] else ref)


# ----------------------------------------------------------------------------- device


def numpy_crop_flip(images, offsets, flips, pad):
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.stack([padded[i, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


@pytest.mark.parametrize("new_style_key", [False, True])
def test_device_augment_matches_numpy_reference(new_style_key):
    import jax

    key = jax.random.key(7) if new_style_key else jax.random.PRNGKey(7)
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 10, 3), dtype=np.uint8)
    out = jax.jit(lambda x, k: data.device_augment(x, k, pad=3))(images, key)
    assert out.shape == images.shape and out.dtype == images.dtype
    # Reproduce the documented draws: (offset key, flip key) = split(key).
    k_offset, k_flip = jax.random.split(key)
    offsets = np.asarray(jax.random.randint(k_offset, (16, 2), 0, 7))
    flips = np.asarray(jax.random.bernoulli(k_flip, 0.5, (16,)))
    assert 0 < flips.sum() < 16 and len({tuple(o) for o in offsets}) > 1
    np.testing.assert_array_equal(np.asarray(out), numpy_crop_flip(images, offsets, flips, 3))
    np.testing.assert_array_equal(
        np.asarray(data.device_augment(images, key, pad=0, flip=False)), images
    )


def test_device_train_batch_is_a_deterministic_permutation():
    import jax
    import jax.numpy as jnp

    n, batch = 50, 8
    steps_per_epoch = n // batch
    images = np.arange(n, dtype=np.int32)[:, None, None, None] * np.ones((1, 4, 4, 1), np.int32)
    labels = np.arange(n, dtype=np.int32)
    key = jax.random.key(0)
    fn = jax.jit(
        lambda step, pad, flip: data.device_train_batch(
            images, labels, key, step, global_batch=batch, num_train=n, pad=pad, flip=flip
        ),
        static_argnums=(1, 2),
    )
    epoch = [np.asarray(fn(jnp.int32(s), 0, False)[1]) for s in range(steps_per_epoch)]
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == steps_per_epoch * batch  # no repeats within an epoch
    for s, lab in enumerate(epoch):
        img = np.asarray(fn(jnp.int32(s), 0, False)[0])
        np.testing.assert_array_equal(img[:, 0, 0, 0], lab)  # images follow their labels
    next_epoch = np.asarray(fn(jnp.int32(steps_per_epoch), 0, False)[1])
    assert not np.array_equal(next_epoch, epoch[0])
    a = fn(jnp.int32(3), 4, True)
    b = fn(jnp.int32(3), 4, True)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), epoch[3])
    assert a[0].shape == (batch, 4, 4, 1) and a[0].dtype == images.dtype


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """PER_CLASS real CIFAR JPEGs per class and split, laid out as ROOT/<split>/<class>/."""
    source = cifar_jpeg_source()
    if source is None:
        pytest.skip(
            "real CIFAR-10 JPEGs not found: set LBQ_CIFAR10_JPEG to the unpacked folder or "
            "the .tar.gz, or unpack ../shared/data/cifar10-jpeg.tar.gz into DATA/"
        )
    root = tmp_path_factory.mktemp("cifar_small")
    if source.is_dir():
        for split in ("train", "test"):
            for cls in sorted(p.name for p in (source / split).iterdir() if p.is_dir()):
                (root / split / cls).mkdir(parents=True)
                for f in sorted((source / split / cls).iterdir())[:PER_CLASS]:
                    shutil.copy(f, root / split / cls / f.name)
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                parts = pathlib.PurePosixPath(member.name).parts
                # Keep <split>/<class>/NNNN.jpg with NNNN < PER_CLASS, wherever the tree starts.
                if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                    if int(pathlib.PurePosixPath(parts[-1]).stem) < PER_CLASS:
                        target = root.joinpath(*parts[-3:])
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture(scope="module")
def prepared(cifar_folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    lines = []
    info = data.prepare_folder(
        str(cifar_folder), str(data_dir), "cifar_small", progress=lines.append
    )
    return info, str(data_dir), lines


def folder_config(data_dir, **overrides):
    return digits_config(name="cifar_small", data_dir=data_dir, **overrides)


def test_prepare_folder_info(prepared):
    report, data_dir, lines = prepared
    n = PER_CLASS * CIFAR_CLASSES
    assert report.name == "cifar_small" and report.num_classes == CIFAR_CLASSES
    assert report.class_counts == {
        split: (PER_CLASS,) * CIFAR_CLASSES for split in ("test", "train")
    }
    assert report.image_sizes == {(32, 32): 2 * n}
    assert (report.stats_split, report.eval_split) == ("train", "test")
    assert report.skipped == report.unreadable == ()
    # Mean of a CIFAR sample is near the published mean (125.3, 122.9, 113.9).
    ref = (125.3, 122.9, 113.9)
    assert all(abs(m - r) < 20 for m, r in zip(report.mean, ref, strict=True))
    assert all(40 < s < 90 for s in report.std)
    assert any(f"scan train: {n}/{n} images" in line for line in lines)
    info = data.get_info(folder_config(data_dir))
    assert info == data.DatasetInfo(
        "cifar_small", CIFAR_CLASSES, (32, 32, 3), n, n, report.mean, report.std
    )
    assert "tensorflow" not in sys.modules


def test_prepared_dataset_reads_back_through_tfds(prepared, cifar_folder):
    import tensorflow_datasets as tfds
    from PIL import Image

    _, data_dir, _ = prepared
    source = tfds.data_source("cifar_small", split="test", data_dir=data_dir)
    assert len(source) == PER_CLASS * CIFAR_CLASSES
    record = source[0]
    assert record["image"].shape == (32, 32, 3)
    builder = tfds.builder("cifar_small", data_dir=data_dir)
    names = builder.info.features["label"].names
    name = record["file_name"]
    name = name.decode() if isinstance(name, bytes) else name
    assert names[record["label"]] == pathlib.PurePath(name).parent.name
    # The pixels are exactly those of the original files (stored byte for byte).
    x, y = data.load_split_arrays(folder_config(data_dir), "test")
    assert x.shape == (200, 32, 32, 3) and sorted(np.bincount(y)) == [PER_CLASS] * 10
    originals = collections.Counter(
        np.asarray(Image.open(p).convert("RGB")).tobytes()
        for p in sorted(cifar_folder.glob("test/*/*.jpg"))
    )
    assert collections.Counter(img.tobytes() for img in x) == originals


def test_prepared_dataset_iterators(prepared):
    _, data_dir, _ = prepared
    cfg = folder_config(data_dir)
    a = take(data.train_iterator(cfg, seed=0, global_batch=64), 4)
    assert a[0]["image"].shape == (64, 32, 32, 3) and a[0]["label"].dtype == np.int32
    b = take(data.train_iterator(cfg, seed=0, global_batch=64, start_step=2), 2)
    assert_batches_equal(a[2:], b)
    # Decoding the split into memory first (auto for 32x32 images) changes nothing.
    uncached = folder_config(data_dir, cache=False)
    assert_batches_equal(a, take(data.train_iterator(uncached, seed=0, global_batch=64), 4))
    batches = list(data.eval_iterator(cfg, global_batch=64))
    assert [int(e["mask"].sum()) for e in batches] == [64, 64, 64, 8]
    big = next(
        data.train_iterator(
            folder_config(data_dir, augment="imagenet", image_size=48), seed=0, global_batch=8
        )
    )
    assert big["image"].shape == (8, 48, 48, 3)


def test_prepare_cli(cifar_folder, tmp_path, capsys):
    from lbq.data import prepare

    status = prepare.main(
        [f"--root={cifar_folder}", f"--data_dir={tmp_path}", "--name=cli_small", "--splits=test"]
    )
    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith("prepared dataset 'cli_small': 200 images in 10 classes")
    assert "  test: 200 images, 20 per class" in out
    # Running it again refuses to overwrite, with a one-line error.
    assert prepare.main([f"--root={cifar_folder}", f"--data_dir={tmp_path}", "--name=cli_small"])
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors


def _write_images(folder, count=2, size=(8, 8)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (i * 40, 10, 200)).save(folder / f"{i}.png")


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_error_unknown_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.UnknownDatasetError) as e:
        data.get_info(digits_config(name="cifar11", data_dir=str(tmp_path)))
    message = _one_line(e)
    assert "cifar11" in message and "cifar10" in message
    assert isinstance(e.value, ValueError)


def test_error_missing_data_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_info(digits_config(name="cifar10", data_dir=str(missing)))
    assert str(missing) in _one_line(e)
    assert isinstance(e.value, FileNotFoundError)


def test_error_dataset_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.train_iterator(
            digits_config(name="cifar10", data_dir=str(tmp_path)), seed=0, global_batch=8
        )
    message = _one_line(e)
    assert "not prepared" in message and str(tmp_path) in message
    assert "lbq.data.prepare" in message


def test_error_unreadable_image(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _write_images(tmp_path / "root" / "train" / "a")
    bad = tmp_path / "root" / "train" / "b" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(data.ImageReadError) as e:
        data.prepare_folder(str(tmp_path / "root"), str(tmp_path / "out"), "bad_images")
    assert str(bad) in _one_line(e)


def test_error_folder_without_class_folders(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    split = tmp_path / "root" / "train"
    split.mkdir(parents=True)
    (split / "loose.jpg").write_bytes(b"")
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(str(tmp_path / "root"), str(tmp_path / "out"), "no_classes")
    assert str(split) in _one_line(e) and "no class folders" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.FolderLayoutError, match="no split folders"):
        data.prepare_folder(str(empty), str(tmp_path / "out"), "no_splits")


def test_error_missing_split_folder(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    _write_images(tmp_path / "root" / "train" / "a")
    with pytest.raises(data.FolderLayoutError) as e:
        data.prepare_folder(
            str(tmp_path / "root"), str(tmp_path / "out"), "x", splits=["train", "validation"]
        )
    assert str(tmp_path / "root" / "validation") in _one_line(e)
    with pytest.raises(data.FolderLayoutError, match="does not exist"):
        data.prepare_folder(str(tmp_path / "nope"), str(tmp_path / "out"), "x")


def test_prepare_converts_odd_images_and_checks_names(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from PIL import Image

    root = tmp_path / "root"
    _write_images(root / "train" / "a", size=(12, 10))
    (root / "train" / "b").mkdir()
    Image.new("L", (9, 11), 77).save(root / "train" / "b" / "grey.png")
    Image.new("CMYK", (10, 10), (0, 0, 0, 0)).save(root / "train" / "b" / "cmyk.jpg")
    prepared = data.prepare_folder(str(root), str(tmp_path / "out"), "odd_images")
    assert prepared.class_counts == {"train": (2, 2)}
    assert prepared.image_sizes == {(12, 10): 2, (9, 11): 1, (10, 10): 1}  # (W, H): counts
    cfg = digits_config(name="odd_images", data_dir=str(tmp_path / "out"), eval_split="train")
    x, y = data.load_split_arrays(cfg, "train")
    assert x.shape == (4, 32, 32, 3) and sorted(y.tolist()) == [0, 0, 1, 1]
    # Grey 77 and CMYK (0, 0, 0, 0) = white, both stored as RGB.
    assert {tuple(img[0, 0]) for img in x[y == 1]} == {(77, 77, 77), (255, 255, 255)}
    with pytest.raises(data.DataError, match="registered TFDS dataset"):
        data.prepare_folder(str(root), str(tmp_path / "out2"), "cifar10")
    with pytest.raises(data.DataError, match="not usable"):
        data.prepare_folder(str(root), str(tmp_path / "out2"), "Bad-Name")


def test_error_bad_config_values():
    with pytest.raises(data.DataError, match="augment"):
        data.get_info(digits_config(augment="mixup"))
    with pytest.raises(data.DataError, match="no split 'validation'"):
        data.load_split_arrays(digits_config(), "validation")
    with pytest.raises(data.DataError, match="not divisible"):
        data.train_iterator(digits_config(), seed=0, global_batch=10, process_count=3)
    with pytest.raises(data.DataError, match="is larger than the 1437 training images"):
        data.train_iterator(digits_config(), seed=0, global_batch=5000)
