"""Faults of the deploy commands after training (issue 24, items 2-6 and 11), each checked on
real parts: lbq's own quantizers, qonnx's executor, the real trainer in a subprocess, real
Orbax reads and real export processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import tiny_config

from lbq import export as export_cli
from lbq.deploy import measure as measure_cli
from lbq.deploy.integer import Codes, IntegerForward
from lbq.deploy.program import Program
from lbq.deploy.qonnx_export import _emit_quantize, _Graph, _weight
from lbq.deploy.quantizers import dorefa_weight_grid, lsq_weight_grid
from lbq.deploy.verify import CHECK_MAX_REL_DIFF, CHECK_MIN_AGREEMENT, check_verdict
from lbq.quant.quantizers import lsq_quantize, pact_activation, quantize_activation
from lbq.workdir import WorkdirLock

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

REPO = pathlib.Path(__file__).resolve().parents[1]
F32 = np.float32
BITS = (2, 3, 4, 8)


# ------------------------------------------------------------------ item 5: rounding at ties


def _neighbours(values, steps: int = 2) -> np.ndarray:
    """Each float32 value and its ``steps`` float32 neighbours on each side."""
    values = np.asarray(values, F32)
    out = [values]
    up, down = values.copy(), values.copy()
    for _ in range(steps):
        up, down = np.nextafter(up, F32(np.inf)), np.nextafter(down, F32(-np.inf))
        out += [up, down]
    return np.concatenate(out)


def _lbq_output(quantizer: str, x: jax.Array, bits: int, high: float) -> jax.Array:
    """lbq's own quantizer (jitted, as in the eval step) on ``x``, in ``x``'s dtype."""
    n = (1 << bits) - 1
    if quantizer == "dorefa":
        return jax.jit(quantize_activation)(x, F32(bits))
    if quantizer == "pact":
        return jax.jit(pact_activation)(x, F32(high), F32(bits))
    s = F32(np.float64(high) / n)
    return jax.jit(lambda v, s, b: lsq_quantize(v, s, b, signed=False, grad_scale=1.0))(
        x, s, F32(bits)
    )


def _lbq_codes(quantizer: str, x: jax.Array, bits: int, high: float) -> np.ndarray:
    """Codes of lbq's own quantizer on float32 ``x``, read from its output (within an ulp of
    the level; the step is at least 2^-8 of the range)."""
    step = np.float64(high) / ((1 << bits) - 1)
    out = _lbq_output(quantizer, x, bits, high)
    return np.rint(np.asarray(out, np.float64) / step).astype(np.int64)


def _integer_codes(quantizer: str, x: np.ndarray, bits: int, high: float) -> np.ndarray:
    """Codes of the integer forward's own quantize operation."""
    op = {
        "name": "q",
        "op": "quantize",
        "inputs": ["image"],
        "bits": bits,
        "quantizer": quantizer,
        "clip_high": high,
    }
    forward = IntegerForward(Program([op], {}, []), [0, 0, 0], [1, 1, 1])
    (_, codes), *_ = forward.trace(x)
    assert isinstance(codes, Codes)
    return codes.codes.astype(np.int64)


def _qonnx_codes(quantizer: str, x: np.ndarray, bits: int, high: float) -> np.ndarray:
    """Codes of the QONNX graph's quantizer nodes, run by qonnx's executor."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    g = _Graph()
    op = {"bits": bits, "quantizer": quantizer, "clip_high": high}
    out = _emit_quantize(g, "q", "x", op)
    shape = [len(x)]
    graph = helper.make_graph(
        g.nodes,
        "ties",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
        initializer=g.initializers,
    )
    model = ModelWrapper(qonnx_make_model(graph)).transform(InferShapes())
    y = execute_onnx(model, {"x": x.astype(F32)})[out]
    step = np.float64(high) / ((1 << bits) - 1)
    return np.rint(y.astype(np.float64) / step).astype(np.int64)


def _tie_inputs(quantizer: str, bits: int, high: float) -> np.ndarray:
    """Every decision boundary of the grid (its float32 nearest value), 0.5, and neighbours."""
    n = (1 << bits) - 1
    halves = (np.arange(n) + 0.5) / n * high
    if quantizer == "dorefa":
        halves = np.concatenate([halves, [0.5, 1 / 6]])
    return _neighbours(np.concatenate([halves, [0.0, high, -0.25, 1.5 * high]]))


# (quantizer, clip_high): DoReFa's [0, 1]; a dyadic PACT clip and LSQ step (ties exactly
# representable) and non-dyadic ones.
ACTIVATIONS = [
    ("dorefa", 1.0),
    ("pact", 2.0),
    ("pact", float(F32(1.37))),
    ("lsq", 0.0625),
    ("lsq", float(F32(0.0371))),
]


def test_the_issues_ties_give_lbqs_codes():
    """float32(1/6) at 2 bits is code 1 (exactly 0.5000000149 * ...), 0.5 at 3 bits code 4."""
    x = np.asarray([1 / 6], F32)
    for run in (_integer_codes, _qonnx_codes):
        assert run("dorefa", x, 2, 1.0).tolist() == [1]
        assert run("dorefa", np.asarray([0.5], F32), 3, 1.0).tolist() == [4]
    assert _lbq_codes("dorefa", jnp.asarray(x), 2, 1.0).tolist() == [1]
    assert _lbq_codes("dorefa", jnp.asarray([0.5], F32), 3, 1.0).tolist() == [4]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantizer,high", ACTIVATIONS)
def test_activation_codes_at_and_around_ties(quantizer, high, dtype):
    for bits in BITS:
        x = jnp.asarray(_tie_inputs(quantizer, bits, high)).astype(dtype)
        values = np.asarray(x, F32)  # bfloat16 values are exact in float32
        lbq = _lbq_codes(quantizer, jnp.asarray(values), bits, high)
        if dtype == "bfloat16":
            # lbq picks the level in float32 from the exact value and rounds the result to
            # bfloat16 (too coarse to read an 8-bit code back): the same level as float32.
            narrow = np.asarray(_lbq_output(quantizer, x, bits, high))
            wide = np.asarray(_lbq_output(quantizer, jnp.asarray(values), bits, high))
            assert np.array_equal(narrow, wide.astype(narrow.dtype)), bits
        assert np.array_equal(_integer_codes(quantizer, values, bits, high), lbq), bits
        assert np.array_equal(_qonnx_codes(quantizer, values, bits, high), lbq), bits
        n = (1 << bits) - 1
        if quantizer == "dorefa":  # exact arithmetic, ties to even (NumPy float64 reference)
            exact = np.rint(np.clip(values.astype(np.float64), 0, 1) * n)
            assert np.array_equal(lbq, exact), bits
        if dtype == "float32" and high in (1.0, 2.0, 0.0625):  # the inputs hold exact ties
            assert 0.5 in np.mod(values.astype(np.float64) * n / high, 1.0), bits


def test_activation_codes_on_many_values():
    """Beyond the ties: random float32 pre-activations give lbq's codes exactly."""
    rng = np.random.default_rng(0)
    for quantizer, high in ACTIVATIONS:
        for bits in BITS:
            x = rng.uniform(-0.2 * high, 1.2 * high, 20_000).astype(F32)
            lbq = _lbq_codes(quantizer, jnp.asarray(x), bits, high)
            assert np.array_equal(_integer_codes(quantizer, x, bits, high), lbq)


def _weight_kernel(bits: int) -> np.ndarray:
    """A kernel whose DoReFa levels cover every code, with values at and around the ties."""
    n = (1 << bits) - 1
    z = np.concatenate([(np.arange(n) + 0.5) / n, np.linspace(0, 1, 4 * n + 1)])
    t = (2 * z - 1) * 0.9  # tanh(w) / (2 * 0.9) + 1/2 = z
    w = _neighbours(np.arctanh(t), 1)
    return w.reshape(-1, 1).astype(F32)


@pytest.mark.parametrize("bits", BITS)
def test_weight_codes_and_qonnx_weight_nodes(bits):
    """Export's weight codes are lbq's quantizer's; QONNX's weight Quant reproduces each code."""
    from qonnx.custom_op.general.quant import quant

    kernel = _weight_kernel(bits)
    n = (1 << bits) - 1
    cases = [
        ("dorefa", dorefa_weight_grid({"kernel": kernel}, bits, False, "w")),
        (
            "lsq",
            lsq_weight_grid({"kernel": kernel, "weight_range": F32(1.6)}, bits, False, "w"),
        ),
    ]
    for name, grid in cases:
        values = grid.values.astype(np.float64)
        codes = grid.codes.astype(np.int64)
        assert np.array_equal(
            np.rint((values / np.asarray(grid.scale) - grid.int_offset) / grid.int_step), codes
        ), name
        assert codes.min() == 0 and codes.max() == n, name  # every code's end is present
        program = Program(
            [],
            {"w/codes": grid.codes, "w/scale": grid.scale},
            [],
        )
        op = {
            "name": "w",
            "op": "qdense",
            "int_step": grid.int_step,
            "int_offset": grid.int_offset,
            "bits": bits,
        }
        g = _Graph()
        _weight(g, program, op, conv=False)
        inits = {i.name: i for i in g.initializers}
        from onnx import numpy_helper

        arr = {k: numpy_helper.to_array(v) for k, v in inits.items()}
        y = quant(
            arr["w/weight"],
            arr["w/weight_quant/quant_scale"],
            arr["w/weight_quant/quant_zeropt"],
            arr["w/weight_quant/quant_bits"],
            0,
            0,
            "ROUND",
        )
        scale = arr["w/weight_quant/quant_scale"].astype(np.float64)
        qonnx_codes = np.rint(y.astype(np.float64) / scale + arr["w/weight_quant/quant_zeropt"])
        assert np.array_equal(qonnx_codes, codes), name
        assert np.allclose(y, grid.values, rtol=0, atol=2e-7), name  # the values, to an ulp


# --------------------------------------------------------- item 3: the export check's verdict


def test_check_verdict_fails_the_issues_figures_and_passes_the_measured_ones():
    bad = {
        "images": 64,
        "top1_agreement": 55 / 64,
        "top1_mismatches": 9,
        "max_abs_diff": 6.4,
        "max_rel_diff": 0.9,
    }
    verdict = check_verdict(bad)
    assert verdict and "85.94 %" in verdict and "6.4" in verdict
    for path in sorted((REPO / "docs/results/deploy").glob("*.json")):
        record = json.loads(path.read_text())
        for result in record["networks"].values():
            for label in ("integer_vs_lbq_float32", "qonnx_vs_lbq_float32"):
                assert check_verdict(result[label]) is None, (path.name, label)
    assert 0 < CHECK_MIN_AGREEMENT < 1 and CHECK_MAX_REL_DIFF > 0


# -------------------------------------------------- the commands, on runs of the real trainer


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """ResNet-20 W2A2 on the embedded digits, checkpoints at steps 2 and 4."""
    from lbq.train import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config(steps=4)
    config.checkpoint_every_steps = 2
    train_and_evaluate(config, workdir)
    return workdir


def _error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lbq: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def test_check_that_exceeds_its_tolerance_fails_the_command(two_step_run, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["--workdir", two_step_run, "--out", str(out), "--check_images", "16"]
    # float32 rounding alone makes the logits differ by more than 0: a zero tolerance fails.
    assert export_cli.main([*args, "--check_max_rel_diff", "0"]) == 1
    line = _error_line(capsys, "export check failed", "max |logit diff|", "forward", str(out))
    assert "top-1 agreement" in line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checks"]["student"]["failures"]
    assert export_cli.main([*args, "--overwrite"]) == 0  # the default tolerance passes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checks"]["student"]["failures"] == []
    assert manifest["checks"]["student"]["tolerance"]["min_top1_agreement"] == 0.98
    for bad in (["--check_min_agreement", "1.5"], ["--check_max_rel_diff", "-1"]):
        assert export_cli.main([*args, "--overwrite", *bad]) == 1
        _error_line(capsys, bad[0])


def test_a_folder_another_process_writes_is_refused(two_step_run, tmp_path, capsys):
    out = tmp_path / "model"
    lock = WorkdirLock(str(out))
    lock.acquire()  # as an export in progress holds it
    try:
        args = ["--workdir", two_step_run, "--out", str(out), "--check_images", "0"]
        for extra in ([], ["--overwrite"]):
            assert export_cli.main([*args, *extra]) == 1
            _error_line(capsys, str(out), "another process is writing", str(os.getpid()))
    finally:
        lock.release()
    assert not out.exists()


def _export_process(workdir: str, out: str, step: int, overwrite: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "lbq.export", "--workdir", workdir, "--out", out]
    args += ["--step", str(step), "--check_images", "8"] + (["--overwrite"] if overwrite else [])
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_exports_at_once_leave_what_the_winner_printed(two_step_run, tmp_path, overwrite):
    from lbq.deploy import package

    out = str(tmp_path / "model")
    procs = [_export_process(two_step_run, out, step, overwrite) for step in (2, 4)]
    results = [(p.wait(timeout=600), *(s.decode() for s in p.communicate())) for p in procs]
    winners = [(code, stdout) for code, stdout, _ in results if code == 0]
    assert winners, results
    for code, _, stderr in results:
        if code != 0:  # refused while the other wrote, or (no overwrite) after it finished
            assert stderr.strip().splitlines()[-1].startswith("lbq: error: --out="), stderr
    manifest = json.loads(pathlib.Path(out, "manifest.json").read_text())
    printed = [int(stdout.split("(step ")[1].split(")")[0]) for _, stdout in winners]
    assert manifest["source"]["step"] == printed[-1] if overwrite else printed[0]
    for entry in manifest["networks"].values():
        for rel, digest in entry["sha256"].items():
            assert package.sha256(os.path.join(out, rel)) == digest
    assert not os.path.exists(os.path.join(out, "lbq.lock"))


# ------------------------------------------------------------ item 4: the run's own forward


def test_a_bfloat16_run_reports_its_own_forward(tmp_path, capsys):
    from lbq.train import train_and_evaluate

    workdir = str(tmp_path / "bf16")
    config = tiny_config(steps=3)
    config.compute_dtype = "bfloat16"
    train_and_evaluate(config, workdir)
    from lbq.deploy.run import load_run

    count = load_run(workdir).info.num_eval  # the whole eval split, as lbq.evaluate
    out = tmp_path / "model"
    args = ["--workdir", workdir, "--out", str(out), "--check_images", str(count)]
    assert export_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "reference: lbq's fake-quantized forward in float32" in printed
    assert "the run evaluates in bfloat16" in printed
    check = json.loads((out / "manifest.json").read_text())["checks"]["student"]
    assert check["run_forward"]["dtype"] == "bfloat16"
    assert set(check["top1_accuracy"]) == {"lbq_float32", "lbq_bfloat16"}
    # The bfloat16 forward is the one lbq.evaluate runs: the same top-1 on the same images.
    from lbq import evaluate as evaluate_cli

    assert evaluate_cli.main(["--workdir", workdir]) == 0
    evaluated = json.loads(capsys.readouterr().out)["results"]["student"]["top1"]
    assert abs(evaluated - check["top1_accuracy"]["lbq_bfloat16"]) < 1e-6


# ------------------------------------------------------------- item 11: measure's arguments


def test_measure_arguments_out_of_range_are_one_line(two_step_run, capsys):
    base = ["--workdir", two_step_run, "--images", "4"]
    for bad in (["--exact_images", "-1"], ["--images", "0"], ["--qonnx_images", "-2"]):
        assert measure_cli.main([*base, *bad]) == 1
        _error_line(capsys, bad[0])
    assert measure_cli.main([*base, "--exact_images", "0"]) == 0
    printed = capsys.readouterr().out
    assert "integer vs lbq (float32)" in printed and "(float64)" not in printed


# ------------------------------------------------- item 6: reading a run while it trains


def test_reading_a_run_while_it_saves_every_step(tmp_path):
    """A real trainer saves every step and keeps one checkpoint; evaluate-style reads (real
    Orbax) during its training all succeed and never call a checkpoint unreadable."""
    from lbq.deploy.run import load_checkpoint

    workdir = tmp_path / "live"
    args = [
        sys.executable,
        "-m",
        "lbq.main",
        "--config=lbq/configs/default.py:tiny",
        f"--workdir={workdir}",
        "--config.stages[0].steps=400",
        "--config.checkpoint_every_steps=1",
        "--config.keep_checkpoints=1",
    ]
    trainer = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list((workdir / "checkpoints").glob("[0-9]*")) if workdir.exists() else True:
            assert trainer.poll() is None, trainer.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        steps = []
        while len(steps) < 4 and trainer.poll() is None:
            assert time.monotonic() < deadline
            step, variables = load_checkpoint(str(workdir))
            assert "student" in variables
            steps.append(step)
        assert len(steps) >= 2, "the trainer ended before the reads"
        assert steps == sorted(steps)
    finally:
        trainer.terminate()
        trainer.wait(timeout=60)
