"""lbq.convert: torchvision and timm weights into lbq run folders, exactly, and every bad input.

The PyTorch networks are built here with random weights and randomised BatchNorm statistics
(pretrained weights cannot be downloaded in tests) and compared with lbq's full-precision
forward on real photographs (scikit-learn's two sample images) at 224 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import REPO

from lbq import convert
from lbq.convert import ConvertError
from lbq.models import get_model

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from safetensors.numpy import save_file  # noqa: E402 - after the skips

RELATIVE_TOLERANCE = 1e-4  # the bound: max |lbq - torch| / max |torch| in float32


def _randomised(model):
    """``model`` in eval mode with random BatchNorm affine parameters and running statistics
    (fresh PyTorch BatchNorms are the identity, which would hide a wrong mapping)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
    return model.eval()


def _build(source: str, name: str, num_classes: int = 1000):
    torch.manual_seed(0)
    if source == "timm":
        return _randomised(timm.create_model(name, pretrained=False, num_classes=num_classes))
    return _randomised(getattr(torchvision.models, name)(num_classes=num_classes))


def _arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """The two real photographs scikit-learn ships, resized to 224x224, float32 0..255 NHWC."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = [
        np.asarray(Image.fromarray(i).resize((224, 224), Image.BILINEAR), np.float32)
        for i in load_sample_images().images
    ]
    return np.stack(images)


def _normalised(images: np.ndarray) -> np.ndarray:
    mean = np.asarray(convert.IMAGENET_MEAN, np.float32)
    std = np.asarray(convert.IMAGENET_STD, np.float32)
    return (images - mean) / std


def _save(model, path: str, wrap=None) -> str:
    if path.endswith(".safetensors"):
        save_file(_arrays(model), path)
    else:
        state = model.state_dict()
        torch.save(wrap(state) if wrap else state, path)
    return path


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "source,name,suffix",
    [
        ("torchvision", "resnet18", ".pth"),
        ("torchvision", "resnet34", ".safetensors"),
        ("torchvision", "resnet50", ".pt"),
        ("torchvision", "alexnet", ".safetensors"),
        ("timm", "resnet18", ".safetensors"),
        ("timm", "resnet34", ".pth"),
        ("timm", "resnet50", ".safetensors"),
    ],
)
def test_logits_equal_pytorch_on_real_images(source, name, suffix, photos, tmp_path):
    model = _build(source, name)
    path = _save(model, str(tmp_path / f"{name}{suffix}"))
    variables, num_classes = convert.convert_state_dict(
        convert.read_state_dict(path), name, path, source
    )
    assert num_classes == 1000
    x = _normalised(photos)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    net = get_model(name, num_classes=num_classes, quantized=False)
    logits, _ = jax.jit(lambda v, x: net.apply(v, x, None, train=False))(variables, jnp.asarray(x))
    difference = np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected))
    print(f"{source} {name}: max relative logit difference {difference:.2e}")
    assert difference < RELATIVE_TOLERANCE
    # The two photographs are told apart: the logits are not a constant.
    assert np.max(np.abs(expected[0] - expected[1])) > 1e-3 * np.max(np.abs(expected))


def test_every_container_gives_the_same_arrays(tmp_path):
    """.pth, .safetensors, DataParallel's ``module.`` prefix and checkpoint dicts holding the
    weights under ``state_dict`` or ``model`` read back identically."""
    model = _build("torchvision", "resnet18", num_classes=10)
    reference = {k: v for k, v in _arrays(model).items() if not k.endswith("num_batches_tracked")}
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    files = [
        _save(model, str(tmp_path / "plain.pth")),
        _save(model, str(tmp_path / "plain.safetensors")),
        _save(model, str(tmp_path / "ddp.pth"), wrap=lambda _: prefixed),
        _save(model, str(tmp_path / "ckpt.pth"), wrap=lambda s: {"epoch": 3, "state_dict": s}),
        _save(model, str(tmp_path / "ckpt2.pt"), wrap=lambda s: {"model": s, "optimizer": {}}),
    ]
    for path in files:
        read = convert.read_state_dict(path)
        assert sorted(read) == sorted(reference), path
        for key, value in reference.items():
            np.testing.assert_array_equal(read[key], value, err_msg=f"{path} {key}")


def test_safetensors_need_no_torch(tmp_path):
    model = _build("torchvision", "resnet18", num_classes=10)
    path = _save(model, str(tmp_path / "w.safetensors"))
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now fails
        "from lbq.convert import read_state_dict\n"
        f"print(len(read_state_dict({path!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len([k for k in model.state_dict() if "num_batches" not in k])


def test_torch_is_not_a_training_dependency():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        names = [line.split(">")[0].split("=")[0].strip().lower() for line in f]
    assert not {"torch", "torchvision", "timm", "safetensors"} & set(names)


# ----------------------------------------------------------------------------- the run folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted torchvision ResNet-18 (10 classes) recorded for the embedded digits data at
    32 px, the smallest input the network takes: (run folder, the PyTorch model)."""
    root = tmp_path_factory.mktemp("converted")
    model = _build("torchvision", "resnet18", num_classes=10)
    weights = _save(model, str(root / "resnet18.pth"))
    out = str(root / "run")
    code = convert.main(
        [
            "--from=torchvision",
            "--model=resnet18",
            f"--weights={weights}",
            f"--out={out}",
            "--data=digits",
            "--eval_split=test",
            "--image_size=32",
        ]
    )
    assert code == 0
    return out, model


def test_run_folder_records_the_weights_normalisation(converted):
    from lbq.deploy.run import load_run

    out, model = converted
    with open(os.path.join(out, "config.json")) as f:
        record = json.load(f)
    assert record["model"]["name"] == "resnet18" and record["model"]["quantized"] is False
    assert tuple(record["data"]["mean"]) == convert.IMAGENET_MEAN
    assert tuple(record["data"]["std"]) == convert.IMAGENET_STD
    run = load_run(out)
    assert run.step == 0
    # The digits data has its own statistics; the run uses the ones the weights expect.
    assert run.info.mean == convert.IMAGENET_MEAN and run.info.std == convert.IMAGENET_STD
    # The checkpoint holds the converted weights: lbq's forward on the run's own preprocessed
    # eval images gives torchvision's logits.
    images, _ = run.eval_images(4)
    x = _normalised(images.astype(np.float32))
    net = run.students[0].model
    logits, _ = net.apply(run.variables["student"], jnp.asarray(x), None, train=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    difference = np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected))
    assert difference < RELATIVE_TOLERANCE


@pytest.fixture(scope="module")
def fine_tuned(converted, tmp_path_factory):
    """A W2A2 run with init_from and distill.teacher_init at the converted folder, at learning
    rate 0, stopped after its first step as a preemption would (no evaluation: these CPUs are
    slow)."""
    from lbq.configs import default
    from lbq.train import train_and_evaluate

    out, _ = converted
    c = default.get_config("tiny")
    c.model.name = "resnet18"
    c.init_from = out
    c.distill.enabled = True
    c.distill.teacher = "frozen"
    c.distill.teacher_init = out
    c.schedule.lr = c.schedule.teacher_lr = 0.0
    c.batch_size, c.eval_batch_size = 4, 500
    c.stages = [default.stage("w2a2", w_bits=2, a_bits=2, steps=2)]
    c.checkpoint_every_steps = 1
    workdir = str(tmp_path_factory.mktemp("fine_tune") / "run")
    result = train_and_evaluate(c, workdir, stop_at_step=1)
    assert result.status == "preempted" and result.step == 1
    return workdir


def test_fine_tune_starts_from_it_with_teacher_from_the_same_weights(converted, fine_tuned):
    """At learning rate 0 the step leaves the student's and the teacher's weights at the
    converted ones: both were loaded from the converted folder."""
    from lbq.checkpoint import load_saved_variables, load_variables

    start = load_variables(converted[0])["student"]["params"]
    step, after = load_saved_variables(fine_tuned)
    assert step == 1
    for network in ("student", "teacher"):
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(after[network]["params"])[0],
            jax.tree.leaves(start),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{network}{path}")


def test_evaluate_export_and_probe_take_it(converted, tmp_path, capsys):
    from lbq import evaluate, export
    from lbq.experiments import probe

    out, _ = converted
    result = str(tmp_path / "eval.json")
    assert evaluate.main([f"--workdir={out}", f"--output={result}"]) == 0
    with open(result) as f:
        assert 0.0 <= json.load(f)["results"]["student"]["top1"] <= 1.0
    # Export writes low-bit networks: it reads the converted run and refuses it in one line, as
    # it refuses every full-precision run (a W2A2 run fine-tuned from it is exported).
    capsys.readouterr()
    assert export.main([f"--workdir={out}", f"--out={tmp_path / 'fp'}"]) != 0
    assert "model.quantized=False" in capsys.readouterr().err
    probed = str(tmp_path / "probe.json")
    args = [
        f"--start_from={out}",
        f"--out={probed}",
        "--quantizers=dorefa/dorefa",
        "--bits=4",
        "--recalibrate_bn_batches=0",
    ]
    assert probe.main(args) == 0
    with open(probed) as f:
        assert set(json.load(f)) == {"plain-ReLU network w32a32", "dorefa/dorefa w4a4"}


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def resnet18_state():
    return _build("torchvision", "resnet18", num_classes=10).state_dict()


def _refused(tmp_path, payload, *, model="resnet18", source="torchvision", name="w.pth"):
    path = str(tmp_path / name)
    if isinstance(payload, bytes):
        with open(path, "wb") as f:
            f.write(payload)
    elif payload is not None:
        torch.save(payload, path)
    with pytest.raises(ConvertError) as caught:
        convert.convert(source, model, path, str(tmp_path / "out"))
    message = str(caught.value)
    assert "\n" not in message and path in message, message
    assert not os.path.exists(tmp_path / "out")
    return message


def test_another_architecture_is_named(tmp_path):
    state = _build("torchvision", "resnet50", num_classes=10).state_dict()
    message = _refused(tmp_path, state, model="resnet18")
    assert "resnet50 weights" in message and "'layer1.0.conv3.weight'" in message


def test_missing_unexpected_and_misshapen_keys(tmp_path, resnet18_state):
    missing = {k: v for k, v in resnet18_state.items() if k != "layer4.1.bn2.running_var"}
    assert "missing key 'layer4.1.bn2.running_var'" in _refused(tmp_path, missing)
    extra = {**resnet18_state, "head.weight": torch.zeros(3)}
    assert "unexpected key 'head.weight'" in _refused(tmp_path, extra)
    misshapen = {**resnet18_state, "layer1.0.conv1.weight": torch.zeros(64, 32, 3, 3)}
    message = _refused(tmp_path, misshapen)
    assert "'layer1.0.conv1.weight'" in message and "stage1_block0_conv1" in message
    assert "(64, 32, 3, 3)" in message and "(64, 64, 3, 3)" in message


def test_files_that_are_not_state_dicts(tmp_path, resnet18_state):
    assert "holds a list, not a state_dict" in _refused(tmp_path, [1, 2])
    message = _refused(tmp_path, {"epoch": 3, "lr": 0.1})
    assert "key 'epoch'" in message and "not a state_dict" in message
    full = _refused(tmp_path, torchvision.models.resnet18(num_classes=10))
    assert "pickled torchvision.models.resnet.ResNet object" in full
    assert "not a readable torch.save file" in _refused(tmp_path, b"not a checkpoint" * 8)
    garbage = _refused(tmp_path, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad", name="w.safetensors")
    assert "not a readable safetensors file" in garbage
    assert "no such file" in _refused(tmp_path, None, name="absent.pth")


def test_timm_has_no_alexnet(tmp_path):
    with pytest.raises(ConvertError, match="--model='alexnet': timm networks"):
        convert.convert("timm", "alexnet", str(tmp_path / "w.pth"), str(tmp_path / "out"))


def test_command_line_error_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "w.pth")
    torch.save([1], path)
    args = ["--from=timm", "--model=resnet50", f"--weights={path}", f"--out={tmp_path / 'o'}"]
    assert convert.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lbq.convert: error: ") and "\n" not in err and path in err
