"""lbq.deploy: k-bit packing, the integer reference forward, the QONNX graph, and the
evaluate / export / predict commands on a run of the real trainer.

How the forwards are compared (see docs/deploy.md). In float32, the fake-quantized forward and
any other float32 implementation round differently, and where a pre-activation lies within that
rounding of a quantizer's decision boundary one code flips; an untrained network can amplify a
flip to large logit differences at 4 and 8 bits. So:

- the integer forward is checked against lbq's own forward in float64 (the same model code, JAX
  x64), where both are exact: every network at 2, 4 and 8 bits must agree to 1e-6;
- the QONNX graph is checked operation by operation: qonnx's executor runs each operation's
  nodes on the integer forward's own input to it, so float32 rounding cannot compound;
- end to end in float32, on a run of the real trainer, the export's own check must give the same
  top-1 and logits within `LOGIT_RTOL` for the integer forward and the QONNX graph.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from runs import cifar_jpeg_source, read_metrics, tiny_config

from lbq import evaluate as evaluate_cli
from lbq import export as export_cli
from lbq import predict as predict_cli
from lbq.data import digits
from lbq.data.transforms import eval_transform
from lbq.deploy import package
from lbq.deploy.errors import DeployError
from lbq.deploy.integer import Codes, IntegerForward
from lbq.deploy.pack import pack_codes, packed_size, unpack_codes
from lbq.deploy.program import build_program
from lbq.deploy.qonnx_export import INPUT, to_qonnx
from lbq.deploy.verify import LOGIT_RTOL, fake_quant_logits, logit_agreement
from lbq.models import get_model
from lbq.quant.precision import make_precision

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

REPO = pathlib.Path(__file__).resolve().parents[1]
# {case: (network, options)}. Each case also carries an option, so that every path of the
# program is exercised, and every quantizer lbq has (DoReFa, PACT, LSQ) is covered.
NETWORKS = {
    "resnet20": ("resnet20", {}),  # option-A (zero-padded) shortcuts
    "preresnet20": ("preresnet20", {"shortcut": "B", "logit_scale": True}),  # 1x1 projections
    "alexnet_cifar": ("alexnet_cifar", {"per_channel": True}),  # per-output-channel maxima
    "resnet18": ("resnet18", {}),
    "resnet20_pact": ("resnet20", {"activation_quantizer": "pact"}),
    "resnet20_lsq": (
        "resnet20",
        {"weight_quantizer": "lsq", "activation_quantizer": "lsq", "per_channel": True},
    ),
    # Each conv quantizing its own input (SPEC section 9), with every quantizer.
    "resnet20_lsq_conv_input": (
        "resnet20",
        {
            "weight_quantizer": "lsq",
            "activation_quantizer": "lsq",
            "shortcut": "B",
            "activation_placement": "conv_input",
        },
    ),
    "alexnet_cifar_pact_conv_input": (
        "alexnet_cifar",
        {"activation_quantizer": "pact", "activation_placement": "conv_input"},
    ),
    "resnet18_conv_input": ("resnet18", {"activation_placement": "conv_input"}),
}
BITS = (2, 4, 8)
FLOAT64_RTOL = 1e-6  # the fake-quantized logits are cast to float32 at the end (~6e-8)
CIFAR_CLASSES = ("airplane", "cat", "ship", "truck")

# ----------------------------------------------------------------------------- packing


def _reference_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout, built independently: one Python integer, code i at bit i*k."""
    value = 0
    for i, code in enumerate(codes.reshape(-1).tolist()):
        value |= int(code) << (i * bits)
    size = -(-codes.size * bits // 8)
    return np.frombuffer(value.to_bytes(size, "little"), np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_and_layout(bits):
    rng = np.random.default_rng(bits)
    for shape in [(0,), (1,), (3,), (7,), (8,), (9,), (13, 5), (3, 3, 7, 11)]:
        codes = rng.integers(0, 1 << bits, shape)
        packed = pack_codes(codes, bits)
        assert packed.dtype == np.uint8 and packed.shape == (packed_size(codes.size, bits),)
        np.testing.assert_array_equal(packed, _reference_bytes(codes, bits))
        np.testing.assert_array_equal(unpack_codes(packed, bits, codes.size), codes.reshape(-1))
        spare = packed.size * 8 - codes.size * bits  # padding bits of the last byte are zero
        if spare:
            assert packed[-1] >> (8 - spare) == 0


def test_pack_two_bits_is_four_codes_per_byte():
    packed = pack_codes(np.array([1, 2, 3, 0, 3]), 2)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 3]


def test_pack_chunk_boundaries_at_odd_bit_widths():
    codes = np.random.default_rng(0).integers(0, 8, (1 << 20) + 13)
    packed = pack_codes(codes, 3)
    stream = ((codes[:, None] >> np.arange(3)) & 1).reshape(-1).astype(np.uint8)
    np.testing.assert_array_equal(packed, np.packbits(stream, bitorder="little"))
    np.testing.assert_array_equal(unpack_codes(packed, 3, codes.size), codes)


@pytest.mark.parametrize(
    "call",
    [
        lambda: pack_codes(np.array([4]), 2),
        lambda: pack_codes(np.array([-1]), 2),
        lambda: pack_codes(np.array([0.5]), 2),
        lambda: pack_codes(np.array([0]), 9),
        lambda: pack_codes(np.array([0]), 0),
        lambda: unpack_codes(np.zeros(2, np.uint8), 2, 9),
        lambda: unpack_codes(np.zeros(3, np.int32), 2, 9),
    ],
)
def test_pack_rejects_bad_input(call):
    with pytest.raises(DeployError):
        call()


# ----------------------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    """The first test JPEG of four CIFAR-10 classes, copied as files; None when absent."""
    source = cifar_jpeg_source()
    if source is None:
        return None
    root = tmp_path_factory.mktemp("cifar")
    wanted = {f"test/{c}/0000.jpg" for c in CIFAR_CLASSES}
    if source.is_dir():
        for name in wanted:
            shutil.copy(source / name, root / name.replace("/", "_"))
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                name = "/".join(pathlib.PurePosixPath(member.name).parts[-3:])
                if member.isfile() and name in wanted:
                    (root / name.replace("/", "_")).write_bytes(tar.extractfile(member).read())
    return sorted(str(p) for p in root.iterdir())


@pytest.fixture(scope="module")
def images(cifar_files):
    """Real 32x32 images: two digits, and two CIFAR-10 photographs where present. (The
    float64 comparison is exact, so a few images check the arithmetic as well as many.)"""
    batch = [digits.split_arrays("test")[0][:2]]
    if cifar_files:
        photos = [eval_transform(open(f, "rb").read(), 32, False, f) for f in cifar_files[:2]]
        batch.append(np.stack(photos))
    return np.concatenate(batch)


# ----------------------------------------------------------------------------- networks


def _random_variables(model, seed: int) -> dict:
    """Variables of the network's structure (traced, not compiled): He-normal kernels and
    non-trivial BatchNorm parameters and statistics, so that every part of the math counts."""
    precision = make_precision(model.layer_names(), 2, 2)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), precision)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            fan = shape[-1] * int(np.prod(shape[:-2])) if len(shape) == 4 else shape[0]
            return rng.normal(0.0, np.sqrt(2.0 / fan), shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape)
        if name in ("clip", "range"):  # a learned activation range, away from its init
            return rng.uniform(1.0, 3.0, shape)
        if name == "weight_range":  # about LSQ's own init at 2 bits, in He-normal units
            return rng.uniform(0.2, 0.6, shape)
        return rng.normal(0.0, 0.2, shape)  # bias, mean

    return jax.tree_util.tree_map_with_path(
        lambda p, x: fill(p, x).astype(np.float32), jax.device_get(shapes)
    )


def _float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module", params=list(NETWORKS))
def network(request):
    name, options = NETWORKS[request.param]
    model = get_model(name, num_classes=10, **options)
    return model, _random_variables(model, seed=list(NETWORKS).index(request.param))


def _mean_std():
    return digits.stats()


@pytest.fixture(scope="module")
def programs(network):
    """{bits: program} of the network, its weights quantized in float64 (JAX x64) as in the
    float64 reference forward."""
    model, variables = network
    names = model.layer_names()
    with jax.enable_x64(True):
        return {
            bits: build_program(
                model, _float64(variables), [bits] * len(names), [bits] * len(names), image_size=32
            )
            for bits in BITS
        }


def test_integer_forward_equals_lbq_forward(network, programs, images):
    """Every network at 2, 4 and 8 bits, through the packed file format, on real images."""
    model, variables = network
    mean, std = _mean_std()
    for bits, program in programs.items():
        stored, ops = package.packed_arrays(program)
        loaded = package.unpack_program("memory", stored, ops, program.layers)
        integer = IntegerForward(loaded, mean, std, float_dtype=np.float64)(images)
        layers = len(model.layer_names())
        reference = fake_quant_logits(
            model,
            _float64(variables),
            [bits] * layers,
            [bits] * layers,
            images,
            mean,
            std,
            float64=True,
        )
        result = logit_agreement(reference, integer)
        assert result["top1_agreement"] == 1.0, (bits, result)
        assert result["max_rel_diff"] <= FLOAT64_RTOL, (bits, result)
        for op in loaded.ops:  # every quantized layer's codes fit in k bits
            if op["op"] in ("qconv", "qdense"):
                assert loaded.arrays[f"{op['name']}/codes"].max() <= (1 << bits) - 1


def _nodes_of(graph, op_name: str) -> list:
    return [
        n for n in graph.node if n.output[0] == op_name or n.output[0].startswith(op_name + "/")
    ]


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x, np.float32)


def test_qonnx_graph_matches_program_operation_by_operation(programs, images):
    """qonnx's executor runs each operation's nodes on the integer forward's input to it."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_node

    mean, std = _mean_std()
    batch = images[-1:]  # the graph's own batch size of 1
    for bits, program in programs.items():
        graph = ModelWrapper(to_qonnx(program, mean=mean, std=std, image_size=32, num_classes=10))
        assert graph.check_all_tensor_shapes_specified()
        quant_nodes = [n for n in graph.graph.node if n.op_type == "Quant"]
        quantized_ops = [op for op in program.ops if op["op"] in ("qconv", "qdense", "quantize")]
        assert len(quant_nodes) == len(quantized_ops)  # a Quant per weight and per activation
        forward = IntegerForward(program, mean, std)
        tensors = {INPUT: batch}
        opset = graph.get_opset_imports()[""]
        for op, output in forward.trace(batch):
            tensors[op["name"]] = output
            context = {name: _nchw(forward.values(tensors[name])) for name in op["inputs"]}
            if op["inputs"] == ["image"]:
                context = {INPUT: _nchw(batch.astype(np.float32))}
            for node in _nodes_of(graph.graph, op["name"]):
                for name in node.input:
                    init = graph.get_initializer(name)
                    if init is not None:
                        context[name] = init
                context[node.output[0]] = np.zeros(
                    graph.get_tensor_shape(node.output[0]), np.float32
                )
                execute_node(node, context, graph.graph, opset)
            got, want = context[op["name"]], _nchw(forward.values(output))
            assert got.shape == want.shape, op["name"]
            if isinstance(output, Codes):  # a code may flip only at a decision boundary
                assert np.mean(np.abs(got - want) > 1e-6) < 1e-3, (bits, op["name"])
            else:
                scale = max(1.0, float(np.abs(want).max()))
                assert np.abs(got - want).max() <= 1e-5 * scale, (bits, op["name"])


# ----------------------------------------------------------------------------- program errors


def test_build_program_refuses_what_it_cannot_export():
    model = get_model("resnet20", num_classes=10)
    variables = _random_variables(model, 0)
    names = model.layer_names()
    with pytest.raises(DeployError, match="export packs 1..8-bit codes"):
        build_program(model, variables, [16] * len(names), [2] * len(names), image_size=32)
    with pytest.raises(DeployError, match="full-precision input"):
        build_program(model, variables, [2] * len(names), [32] * len(names), image_size=32)
    with pytest.raises(DeployError, match="model.quantized=False"):
        fp = get_model("resnet20", num_classes=10, quantized=False)
        build_program(fp, variables, [2] * len(names), [2] * len(names), image_size=32)
    lsq = get_model("resnet20", num_classes=10, weight_quantizer="lsq")
    with pytest.raises(DeployError, match="LSQ weights need at least 2 bits"):
        build_program(
            lsq, _random_variables(lsq, 0), [1] * len(names), [2] * len(names), image_size=32
        )
    with pytest.raises(DeployError, match="no learned 'weight_range'"):
        build_program(lsq, variables, [2] * len(names), [2] * len(names), image_size=32)
    with pytest.raises(DeployError, match="weight_quantizer='ternary' cannot be exported"):
        build_program(
            model,
            variables,
            [2] * len(names),
            [2] * len(names),
            image_size=32,
            quantizers=("ternary", "dorefa"),
        )


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run of the real trainer: ResNet-20 at W2A2, a few steps on the embedded digits."""
    from lbq.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(tiny_config(steps=4), workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "model")
    code = export_cli.main(["--workdir", trained_run, "--out", out, "--check_images", "24"])
    assert code == 0
    return out


def test_evaluate_reports_what_the_trainer_reported(trained_run, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert evaluate_cli.main(["--workdir", trained_run, "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    assert json.loads(capsys.readouterr().out) == record
    final = read_metrics(trained_run, "eval")[-1]
    assert record["step"] == final["step"] and record["bits"] == {"student": "w2a2"}
    for metric in ("top1", "top5", "loss"):
        assert record["results"]["student"][metric] == pytest.approx(final[f"student/{metric}"])


def test_bit_width_override_and_output_name(trained_run):
    from lbq.deploy.run import load_run

    run = load_run(trained_run)
    assert run.step == read_metrics(trained_run, "eval")[-1]["step"]
    (w, a) = run.bits(4, 8)["student"]
    assert set(w.tolist()) == {4.0} and set(a.tolist()) == {8.0}
    (w, a) = run.bits()["student"]
    assert set(w.tolist()) == {2.0} and set(a.tolist()) == {2.0}
    name = evaluate_cli.default_output(trained_run, 4, "test[:50%]", 4, None)
    assert name == os.path.join(trained_run, "evaluations", "step4-test_50-w4.json")


def test_export_writes_a_verified_packed_and_qonnx_model(exported):
    manifest = package.read_manifest(exported)
    entry = manifest["networks"]["student"]
    assert [layer["name"] for layer in entry["layers"]] == list(
        get_model("resnet20", num_classes=10).layer_names()
    )
    assert {(layer["w_bits"], layer["a_bits"]) for layer in entry["layers"]} == {(2, 2)}
    assert manifest["dataset"]["class_names"] == [str(i) for i in range(10)]
    assert len(manifest["dataset"]["mean"]) == len(manifest["dataset"]["std"]) == 3
    # the issue's bound: ResNet-20's quantized convs at W2A2 take at most 1/14 of float32
    convs = entry["size"]["quantized_convs"]
    assert convs["layers"] == 18 and convs["packed_bytes"] * 14 <= convs["float32_bytes"]
    for label in ("integer_vs_lbq", "qonnx_vs_lbq"):
        check = manifest["checks"]["student"][label]
        assert check["images"] == 24 and check["top1_agreement"] == 1.0, check
        assert check["max_rel_diff"] <= LOGIT_RTOL, check
    model = package.load_model(exported, check_qonnx=True)
    assert model.program.layers == entry["layers"]


def _write_digit_png(path: pathlib.Path, index: int) -> np.ndarray:
    from PIL import Image

    image = digits.split_arrays("test")[0][index]
    Image.fromarray(image).save(path)
    return image


def test_predict_prints_the_integer_forwards_top_classes(exported, tmp_path, capsys):
    paths = [tmp_path / f"digit{i}.png" for i in range(2)]
    batch = np.stack([_write_digit_png(p, i) for i, p in enumerate(paths)])
    assert predict_cli.main(["--model", exported, "--top", "3", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = package.load_model(exported)
    logits = IntegerForward(model.program, model.dataset["mean"], model.dataset["std"])(batch)
    probabilities = predict_cli.softmax(logits)
    for i, path in enumerate(paths):
        block = lines[lines.index(str(path)) + 1 : lines.index(str(path)) + 4]
        order = np.argsort(-probabilities[i], kind="stable")[:3]
        assert [line.split()[0] for line in block] == [str(k) for k in order]
        assert float(block[0].split()[1]) == pytest.approx(
            100 * probabilities[i][order[0]], abs=0.01
        )


def test_predict_with_the_qonnx_engine_agrees(exported, tmp_path, capsys, cifar_files):
    files = cifar_files or [str(tmp_path / "digit.png")]
    if not cifar_files:
        _write_digit_png(tmp_path / "digit.png", 0)
    tops = []
    for engine in ("integer", "qonnx"):
        assert (
            predict_cli.main(["--model", exported, "--engine", engine, "--top", "1", *files]) == 0
        )
        tops.append(capsys.readouterr().out)
    assert tops[0].split()[::3] == tops[1].split()[::3]  # same paths, same top class


# ----------------------------------------------------------------------------- bad input


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lbq: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_workdir_without_a_readable_checkpoint(trained_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_cli.main(["--workdir", str(empty)]) == 1
    _one_error_line(capsys, str(empty), "config.json")
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    assert export_cli.main(["--workdir", str(copy), "--out", str(tmp_path / "out")]) == 1
    _one_error_line(capsys, "no checkpoint", str(copy))
    assert not (tmp_path / "out").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged)
    for path in (damaged / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"\0" * path.stat().st_size)
    assert evaluate_cli.main(["--workdir", str(damaged)]) == 1
    _one_error_line(capsys, "no readable checkpoint", str(damaged / "checkpoints"))


def test_run_whose_model_cannot_be_exported(trained_run, tmp_path, capsys):
    copy = tmp_path / "fp"
    shutil.copytree(trained_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["quantized"] = False
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert export_cli.main(["--workdir", str(copy), "--out", str(out)]) == 1
    _one_error_line(capsys, "full precision")
    assert not out.exists()


def test_export_never_overwrites_a_folder_it_did_not_write(trained_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["--workdir", trained_run, "--out", str(out), "--check_images", "0"]
    assert export_cli.main(args) == 1
    _one_error_line(capsys, str(out), "--overwrite")
    assert os.listdir(out) == ["notes.txt"]
    assert export_cli.main([*args, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert export_cli.main(args) == 1  # an earlier export is not replaced silently either
    _one_error_line(capsys, "earlier lbq export")


def test_missing_or_corrupt_model_folder(exported, tmp_path, capsys):
    image = tmp_path / "digit.png"
    _write_digit_png(image, 0)
    missing = tmp_path / "nowhere"
    assert predict_cli.main(["--model", str(missing), str(image)]) == 1
    _one_error_line(capsys, str(missing), "does not exist")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert predict_cli.main(["--model", str(bare), str(image)]) == 1
    _one_error_line(capsys, str(bare), "manifest.json")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(exported, corrupt)
    packed = corrupt / "student" / package.PACKED
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    assert predict_cli.main(["--model", str(corrupt), str(image)]) == 1
    _one_error_line(capsys, str(packed), "sha256")
    (corrupt / package.MANIFEST).write_text("{not json")
    assert predict_cli.main(["--model", str(corrupt), str(image)]) == 1
    _one_error_line(capsys, str(corrupt / package.MANIFEST))


def test_unreadable_images_are_named_and_the_rest_classified(exported, tmp_path, capsys):
    good, broken, missing = tmp_path / "good.png", tmp_path / "broken.jpg", tmp_path / "gone.jpg"
    _write_digit_png(good, 1)
    broken.write_bytes(b"not an image")
    assert predict_cli.main(["--model", exported, str(broken), str(good), str(missing)]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("lbq: error:") for e in errors), errors
    assert str(broken) in errors[0] and str(missing) in errors[1]
    assert captured.out.splitlines()[0] == str(good)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lbq.predict", f"--model={tmp_path / 'none'}", "x.jpg"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"lbq: error: model folder {tmp_path / 'none'} does not exist"


def test_packed_file_holds_everything_the_integer_forward_reads(exported):
    """The integer forward runs from the manifest and packed.npz alone (no checkpoint, no lbq
    model code), and gives the logits the export check compared."""
    model = package.load_model(exported)
    with np.load(model.file("packed")) as archive:
        stored = set(archive.files)
    assert stored == set(model.entry["arrays"])
    assert package.CODES in stored  # one array holds every layer's packed codes
    assert not [k for k in stored if k.endswith("/codes") and k != package.CODES]
    batch = digits.split_arrays("test")[0][:8]
    logits = IntegerForward(model.program, model.dataset["mean"], model.dataset["std"])(batch)
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
    with io.StringIO() as text:  # the manifest is plain JSON
        json.dump(package.read_manifest(exported), text)
