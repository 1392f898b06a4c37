"""The training-step benchmark runs the trainer's step and reports complete, positive figures."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from runs import load_benchmark

from lbq import bench
from lbq.models import get_model
from lbq.quant import layers
from lbq.quant.precision import make_precision

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER_FIELDS = (
    "images_per_second",
    "pipelined_images_per_second",
    "median_step_s",
    "min_step_s",
    "max_step_s",
    "lower_s",
    "compile_s",
    "first_step_s",
    "peak_bytes",
)


def _check(result: dict, model: str, mode: str, batch: int, steps: int) -> None:
    assert result["model"] == model and result["mode"] == mode and result["batch"] == batch
    for field in NUMBER_FIELDS:
        assert result[field] > 0, field
    assert len(result["step_times_s"]) == steps
    assert all(t > 0 for t in result["step_times_s"])
    assert result["min_step_s"] <= result["median_step_s"] <= result["max_step_s"]
    assert result["images_per_second"] == pytest.approx(batch / result["median_step_s"])
    assert result["dtype"] == ("float32" if result["backend"] == "cpu" else "bfloat16")
    assert result["peak_kind"] in ("device peak_bytes_in_use", "process peak RSS (ru_maxrss)")
    assert result["image_size"] == 32


def test_bench_cli_two_modes(tmp_path):
    """The default path: the CLI runs each mode in its own interpreter and merges the JSON."""
    path = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lbq.bench",
            "--model",
            "resnet20",
            "--modes",
            "fp,w2a2",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--json",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "w2a2" in proc.stdout and "images/s" in proc.stdout  # the progress lines and table
    report = json.loads(path.read_text())
    assert report["environment"]["cpu_count"] >= 1
    results = report["results"]
    assert [r["mode"] for r in results] == ["fp", "w2a2"]
    for r in results:
        _check(r, "resnet20", r["mode"], 4, 2)


def test_bench_rejects_unknown_mode():
    with pytest.raises(SystemExit):
        bench.main(["--modes", "w3a3", "--no-isolate"])
    with pytest.raises(ValueError, match="not one of"):
        bench.mode_config("resnet20", "w3a3", 4)


def test_without_tfds_the_bench_builds_the_step():
    """GPU boxes may lack tensorflow-datasets and grain: the bench builds its step without."""
    code = (
        "import sys\n"
        "for name in ('tensorflow_datasets', 'grain'):\n"
        "    sys.modules[name] = None  # makes any import of them fail\n"
        "from lbq import bench\n"
        "from lbq.trainer import build_networks\n"
        "from lbq.plan import parse_config\n"
        "plan = parse_config(bench.mode_config('resnet20', 'w2a2_kd', 4))\n"
        "nets = build_networks(plan, 10)\n"
        "assert [n.name for n in nets] == ['student', 'teacher'], nets\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_modes_build_the_intended_networks():
    from lbq.plan import parse_config

    kd = parse_config(bench.mode_config("resnet18", "w2a2_kd", 8))
    assert kd.distill.enabled and kd.distill.teacher == "joint" and kd.model.quantized
    assert [n.name for n in kd.networks] == ["student", "teacher"]
    fp = parse_config(bench.mode_config("resnet18", "fp", 8))
    assert not fp.model.quantized and not fp.distill.enabled and not fp.stochastic.enabled
    w4 = parse_config(bench.mode_config("resnet50", "w4a4", 8))
    assert (w4.stages[0].w_bits, w4.stages[0].a_bits) == (4, 4)
    sp = parse_config(bench.mode_config("resnet20", "w2a2_sp", 8))
    assert sp.stochastic.enabled and (sp.stages[0].w_bits, sp.stages[0].a_bits) == (2, 2)
    pact = parse_config(bench.mode_config("resnet20", "w2a2_pact", 8)).model
    assert (pact.weight_quantizer, pact.activation_quantizer) == ("dorefa", "pact")
    lsq = parse_config(bench.mode_config("resnet20", "w2a2_lsq", 8)).model
    assert (lsq.weight_quantizer, lsq.activation_quantizer) == ("lsq", "lsq")
    assert (pact.activation_placement, lsq.activation_placement) == ("block_output",) * 2
    lsq_conv = parse_config(bench.mode_config("resnet20", "w2a2_lsq_conv_input", 8)).model
    assert (lsq_conv.weight_quantizer, lsq_conv.activation_quantizer) == ("lsq", "lsq")
    assert lsq_conv.activation_placement == "conv_input"
    sp_conv = parse_config(bench.mode_config("resnet20", "w2a2_sp_conv_input", 8))
    assert sp_conv.stochastic.enabled and sp_conv.model.activation_placement == "conv_input"


CPU_COMPARE = load_benchmark("cpu_compare")


@pytest.mark.parametrize("variant", sorted(CPU_COMPARE.PATCHES))
def test_every_cpu_compare_variant_changes_the_traced_network(variant, monkeypatch):
    """A variant of benchmarks/cpu_compare.py replaces a function that lbq's quantized network
    calls when it is traced: one that patched a name no network reads any more would time
    plain lbq under the variant's name."""
    for name in ("quantize_weight", "quantize_activation", "activation"):
        monkeypatch.setattr(layers, name, getattr(layers, name))  # put back after the test
    model = get_model("resnet20", num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    precision = make_precision(model.layer_names(), 2, 2)
    variables = model.init(jax.random.key(0), x, precision)

    def traced() -> str:
        return str(jax.make_jaxpr(lambda v: model.apply(v, x, precision, train=False))(variables))

    before = traced()
    CPU_COMPARE.PATCHES[variant]()
    assert traced() != before
