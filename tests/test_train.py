"""The training system end to end: entry point, devices, metrics, checkpoints, data modes."""

import json
import os

import numpy as np
import pytest
from runs import leaves, read_metrics, run_main, tiny_config

from lbq.checkpoint import load_variables
from lbq.train import train_and_evaluate


def test_cli_runs_with_overrides_and_writes_metrics(tmp_path):
    workdir = str(tmp_path / "run")
    proc = run_main(
        [
            "--config=configs/default.py:tiny",
            f"--workdir={workdir}",
            "--config.quant.w_bits=4",
            "--config.log_every_steps=1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["quant"]["w_bits"] == 4
    train = read_metrics(workdir, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "student/accuracy", "student/lr", "images_per_second", "stage_name"):
        assert key in train[0]
    evals = read_metrics(workdir, "eval")
    assert 0.0 <= evals[-1]["student/top1"] <= evals[-1]["student/top5"] <= 1.0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "final student: top-1" in proc.stdout
    assert "w4a2" in proc.stdout  # the summary names the stage's bits


def test_cli_bad_override_is_one_line_error(tmp_path):
    proc = run_main(
        [
            "--config=configs/default.py:tiny",
            f"--workdir={tmp_path}",
            "--config.model.name=resnet21",
        ]
    )
    assert proc.returncode == 1
    assert "lbq: error: model.name='resnet21'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _losses_on(devices: int, workdir: str, *overrides: str) -> list[float]:
    # XLA's default optimisation, not the suite's FAST_XLA: this compares numerics across device
    # counts as users run them, and unoptimised XLA:CPU reduces in another order (at level 0 the
    # full-precision losses part by 0.9 % at the third step).
    proc = run_main(
        [
            "--config=configs/default.py:tiny",
            f"--workdir={workdir}",
            "--config.log_every_steps=1",
            *overrides,
        ],
        env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [r["loss"] for r in read_metrics(workdir, "train")]


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    """The same run on 1 CPU device and on 8 simulated devices (sharded batch, sync BN).

    Full precision agrees to float tolerance at every step. Low-bit runs agree exactly on the
    first step; after it, a reduction-order difference of one ulp can flip a rounding decision
    of the 2-bit quantizer, so later steps are compared loosely.
    """
    fp = [_losses_on(d, str(tmp_path / f"fp{d}"), "--config.model.quantized=False") for d in (1, 8)]
    np.testing.assert_allclose(fp[0], fp[1], rtol=1e-3)
    assert fp[0][0] != fp[0][-1]
    low = [_losses_on(d, str(tmp_path / f"q{d}")) for d in (1, 8)]
    np.testing.assert_allclose(low[0][0], low[1][0], rtol=1e-5)
    np.testing.assert_allclose(low[0], low[1], rtol=0.05)


@pytest.mark.slow
def test_resume_continues_and_init_from_loads_weights(tmp_path):
    config = tiny_config(steps=2)
    first = train_and_evaluate(config, str(tmp_path / "a"))
    assert first.status == "completed" and first.step == 2
    config.stages[0].steps = 4  # a longer run in the same workdir resumes from step 2
    config.on_config_change = "continue"
    resumed = train_and_evaluate(config, str(tmp_path / "a"))
    assert resumed.step == 4
    assert [r["step"] for r in read_metrics(str(tmp_path / "a"), "train")][-1] == 4

    # init_from: a new run whose first checkpoint starts from those weights.
    source = load_variables(str(tmp_path / "a"))
    other = tiny_config(steps=1)
    other.init_from = str(tmp_path / "a")
    other.schedule.lr = 0.0
    other.optimizer.weight_decay = 0.0
    train_and_evaluate(other, str(tmp_path / "b"))
    loaded = load_variables(str(tmp_path / "b"))
    for a, b in zip(
        leaves(source["student"]["params"]), leaves(loaded["student"]["params"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.slow
def test_on_device_data_trains(tmp_path):
    config = tiny_config(steps=3)
    config.data.on_device = True
    result = train_and_evaluate(config, str(tmp_path))
    assert result.status == "completed"
    assert result.train_step_compilations == 1
    assert np.isfinite(result.final["student"]["loss"])


@pytest.mark.parametrize(
    "name",
    [
        "cifar100_fp",
        "cifar100_w4a4",
        "cifar100_w2a2",
        "cifar100_w2a2_ts",
        "cifar100_w2a2_pq",
        "cifar100_w2a2_sp",
        "cifar100_w2a2_kd",
        "imagenet_w2a2",
        "imagenet_fp",
        "cifar100_alexnet_w2a2",
        "imagenet_w2a2_pq",
    ],
)
def test_paper_configs_load_with_their_recipes(name):
    import importlib

    full = importlib.import_module(f"configs.{name}").get_config()
    tiny = importlib.import_module(f"configs.{name}").get_config("tiny")
    assert full.data.name in ("cifar100", "imagenet2012")
    assert tiny.data.name == "digits"
    assert full.optimizer.nesterov and full.optimizer.weight_decay == 1e-4
    assert len(tiny.stages) == len(full.stages)
    assert all(s.steps == 3 and s.epochs is None for s in tiny.stages)
    if full.data.name == "cifar100":
        assert full.batch_size == 128 and full.schedule.lr_boundaries == (0.4, 0.6)
    else:
        assert full.batch_size == 256 and full.data.image_size == 224


@pytest.mark.parametrize("name", ["cifar100_w2a2", "imagenet_w2a2", "cifar100_w2a2_ts_pq"])
@pytest.mark.slow
def test_flagship_tiny_variants_run(tmp_path, name):
    proc = run_main([f"--config=configs/{name}.py:tiny", f"--workdir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final teacher" in proc.stdout or "ts_pq" in name
