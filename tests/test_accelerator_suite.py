"""The accelerator suite (benchmarks/accelerator_suite.py) in --tiny mode on this CPU.

One run of the whole suite (about two minutes on two cores) on a few hundred real CIFAR-10
JPEGs, then checks of the files it writes: the plan comes first, and every part's results are
there and sane. Skipped when the CIFAR-10 archive is not available. PyTorch is optional: without
it the torch runs must be reported as skipped. The budget-fitting and comparison helpers are
checked on their own, cheaply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from runs import load_benchmark

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVES = (
    os.path.join(ROOT, "DATA", "cifar10-jpeg.tar.gz"),
    os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg.tar.gz"),
)
ARCHIVE = next((a for a in ARCHIVES if os.path.exists(a)), None)


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the suite's modules import each other


suite = load_benchmark("accelerator_suite")
report = load_benchmark("accelerator_report")
worker = load_benchmark("accelerator_worker")
cifar10 = load_benchmark("accelerator_cifar10")


# ----------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if ARCHIVE is None:
        pytest.skip("the CIFAR-10 JPEG archive (../shared/data) is not available")
    out = tmp_path_factory.mktemp("suite_out")
    scratch = tmp_path_factory.mktemp("suite_scratch")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"), "--tiny"]
    cmd += [f"--out={out}", f"--scratch={scratch}", f"--archive={ARCHIVE}", "--no_wheels"]
    # Twice --tiny's own 300 s: each part ends when its work is done (the accuracy runs stop at
    # one epoch), so the extra time is only used when a loaded machine slows the parts; at 300 s
    # a busy CI machine cut the CPU-backend loss run of the correctness part at its limit.
    cmd += ["--budget=600"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return {"out": out, "stdout": proc.stdout, "results": results}


def test_plan_is_printed_before_anything_runs(tiny_run):
    lines = tiny_run["stdout"].splitlines()
    assert "PLAN: budget" in lines[0]
    first_part = next(i for i, line in enumerate(lines) if "=== part setup" in line)
    plan = "\n".join(lines[:first_part])
    for part in suite.PARTS:
        assert f"  {part}" in plan
    assert tiny_run["results"]["plan"], "the plan is recorded in results.json"


def test_files_fit_what_a_device_call_returns(tiny_run):
    names = sorted(os.listdir(tiny_run["out"]))
    assert names == [
        "accuracy_runs.tar.gz",
        "profiles.tar.gz",
        "results.json",
        "suite.log",
        "summary.md",
    ]
    summary = (tiny_run["out"] / "summary.md").read_text()
    for heading in ("## Correctness", "## Speed", "## Profile", "## Accuracy", "## Targets"):
        assert heading in summary
    for part in suite.PARTS:
        assert tiny_run["results"]["parts"][part]["seconds"] >= 0


def test_correctness_part(tiny_run):
    part = tiny_run["results"]["parts"]["correctness"]
    checks = part["quantizers"]["checks"]
    seen = {(c["quantizer"], c["dtype"], c["bits"]) for c in checks}
    assert len(seen) == 4 * 2 * 8  # four quantizers, two dtypes, bits 1..8
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    assert all(g["passed"] for g in part["quantizers"]["ste_gradients"])
    rows = part["loss_comparison"]["rows"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["device"]) and r["passed"] for r in rows)
    assert part["passed"] is True


def test_speed_part(tiny_run):
    part = tiny_run["results"]["parts"]["speed"]
    lbq = {r["mode"]: r for r in part["lbq"]}
    assert set(lbq) == {"fp", "w2a2"}
    for row in lbq.values():
        assert row["images_per_second"] > 0 and row["compile_s"] > 0 and row["peak_bytes"] > 0
    w2a2 = next(r for r in part["comparison"] if r["mode"] == "w2a2")
    assert w2a2["lbq_vs_lbq_fp"] > 0
    torch_tasks = [t for t in part["tasks"] if t["task"].startswith("torch")]
    if tiny_run["results"]["parts"]["setup"]["torch"]["available"]:
        assert {(r["backend"], r["mode"]) for r in part["torch"]} >= {
            ("eager", "w2a2"),
            ("compile", "w2a2"),
        }
        assert w2a2["lbq_vs_torch_compile"] > 0
    else:
        assert part["torch"] == []
        assert all(t["status"].startswith("skipped: PyTorch") for t in torch_tasks)


def test_profile_part(tiny_run):
    summary = tiny_run["results"]["parts"]["profile"]["summary"]
    mode = summary["modes"]["w2a2"]
    assert mode["categories_ms_per_step"]["convolution"] > 0
    assert mode["networks_ms_per_step"]["student"] > 0
    assert mode["op_ms_per_step"] > 0 and mode["top_ops"]
    with tarfile.open(tiny_run["out"] / "profiles.tar.gz") as tar:
        names = tar.getnames()
    assert "profile_summary.json" in names
    assert any(n.endswith(".xplane.pb") for n in names)


def test_accuracy_part(tiny_run):
    part = tiny_run["results"]["parts"]["accuracy"]
    assert set(part["runs"]) == {"fp", "best", "w4a4", "w2a2"}
    for name, run in part["runs"].items():
        assert run["status"] == "ok", (name, run.get("tail"))
        assert 0.0 <= run["final_top1"] <= 1.0 and run["steps"] >= 1
    assert part["num_train"] == 10 * suite.TINY.train_per_class
    assert 0.0 <= part["runs"]["best"]["teacher_top1"] <= 1.0
    assert [e["stage"] for e in part["runs"]["best"]["stage_evals"]] == ["w4a4", "w2a2"]
    with tarfile.open(tiny_run["out"] / "accuracy_runs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("fp", "best", "w4a4", "w2a2"):
        assert f"{run}/metrics.jsonl" in names


# ----------------------------------------------------------------------------- helpers


def test_fit_steps_fills_whole_epochs_within_the_budget():
    # 100 s, 10 s overhead: SAFETY * 90 s of 0.01 s steps, cut to whole 100-step epochs.
    steps = suite.fit_steps(100, 0.01, 10, 100, min_steps=1, max_steps=10**6)
    assert steps == int(suite.SAFETY * 90 / 0.01) // 100 * 100
    assert suite.fit_steps(100, 0.01, 10, 100, min_steps=1, max_steps=500) == 500
    assert suite.fit_steps(5, 0.01, 10, 100, min_steps=3, max_steps=500) == 3
    assert suite.fit_steps(10.5, 0.01, 10, 100, min_steps=1, max_steps=500) == 40  # < 1 epoch


def test_part_budgets_share_what_is_left():
    shares = suite.DEVICE_SHARES
    total = sum(suite.part_budget(p, 100.0, set(), shares) for p in shares)
    assert total == pytest.approx(100.0)
    # With speed already done, its share goes to the parts after it.
    later = suite.part_budget("accuracy", 100.0, {"correctness", "speed"}, shares)
    assert later == pytest.approx(
        100.0 * shares["accuracy"] / (shares["profile"] + shares["accuracy"])
    )


def test_compare_losses_fails_beyond_the_tolerance():
    device = {"losses": {"w2a2": [2.0, 1.9]}, "device": "x"}
    close = {"losses": {"w2a2": [2.0 * (1 + 1e-4), 1.9]}}
    far = {"losses": {"w2a2": [2.0 * (1 + 1e-2), 1.9]}}
    assert report.compare_losses(device, close, {"w2a2": 2e-3})["passed"]
    assert not report.compare_losses(device, far, {"w2a2": 2e-3})["passed"]
    assert report.compare_losses(None, far, {"w2a2": 2e-3}) is None


def test_check_quantizer_rejects_off_grid_values_and_wrong_levels():
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 1, 1000)
    exact = worker.reference_unit_index(z, 2)
    good = exact / 3.0
    assert worker.check_quantizer(good, exact, exact, 2, "float32", False)["passed"]
    off_grid = good.copy()
    off_grid[0] += 1e-3
    assert not worker.check_quantizer(off_grid, exact, exact, 2, "float32", False)["passed"]
    shifted = np.clip(exact + 1, 0, 3) / 3.0  # every level one too high
    assert not worker.check_quantizer(shifted, exact, exact, 2, "float32", False)["passed"]


def test_weight_reference_levels_match_the_spec_formula():
    w = np.random.default_rng(1).normal(0, 0.1, (3, 3, 4, 8))
    index = worker.reference_weight_index(w, 2, per_channel=False)
    t = np.tanh(w)
    expected = np.round((t / (2 * np.abs(t).max()) + 0.5) * 3)
    np.testing.assert_array_equal(index, expected)
    rounded = worker.reference_weight_index(w, 2, False, worker._rounder("bfloat16"))
    assert np.mean(rounded == index) > 0.95  # bfloat16 rounding moves only near-ties


def test_run_config_variants():
    assert cifar10.parse_variant("best,steps=12") == ("best", 12)
    for bad in ("", "w3a3,steps=4", "w2a2", "w2a2,steps=0", "fp,steps=2,lr=1"):
        with pytest.raises(ValueError, match="accelerator_cifar10"):
            cifar10.parse_variant(bad)
    config = cifar10.get_config("best,steps=7")
    assert [(s.w_bits, s.steps) for s in config.stages] == [(4, 3), (2, 4)]
    assert config.distill.enabled and config.data.on_device
    assert not cifar10.get_config("fp,steps=3").model.quantized
