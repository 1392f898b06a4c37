"""What a run prints says what was computed: the header, the labels and the summary."""

from __future__ import annotations

import json

import pytest
from runs import read_metrics, run_main, tiny_config

from lbq import report
from lbq.configs import default
from lbq.data import DatasetInfo
from lbq.mesh import data_mesh
from lbq.plan import parse_config
from lbq.stages import lay_out
from lbq.train import RunResult
from lbq.trainer import build_trainer

INFO = DatasetInfo("digits", 10, (32, 32, 3), 1437, 360, (0.0,) * 3, (1.0,) * 3)


def _stages(config):
    return lay_out(parse_config(config).stages, steps_per_epoch=11)


def test_a_full_precision_model_is_labelled_fp_whatever_the_stage_bits():
    config = tiny_config(w_bits=32, a_bits=32)
    config.model.quantized = False
    plan = parse_config(config)
    assert report.network_bits(plan, _stages(config)[0]) == "fp (model.quantized=False)"


def test_per_block_bits_are_part_of_the_label():
    config = tiny_config()
    config.stages = [default.stage("mixed", steps=3, block_bits={"stage1_block0": (4, 4)})]
    plan = parse_config(config)
    assert report.network_bits(plan, _stages(config)[0]) == "w2a2 (stage1_block0 w4a4)"


def test_distillation_progress_labels_each_network_loss():
    values = {
        "loss": 8.95,
        "student/loss": 5.3,
        "student/accuracy": 0.1,
        "teacher/loss": 3.65,
        "teacher/accuracy": 0.2,
    }
    text = report.progress_text(values)
    assert text == "student loss 5.300 acc 0.100 teacher loss 3.650 acc 0.200"
    assert "8.95" not in text  # the sum of the two losses is not shown as "loss"


def test_a_stopped_run_does_not_call_its_last_evaluation_final():
    m = {"top1": 0.5, "top5": 0.9, "loss": 1.0}
    stopped = report.format_summary(RunResult("preempted", 3, [], {"student": m}, 10.0), "W")
    assert "final student" not in stopped
    assert "last evaluation of student: top-1 0.5000" in stopped
    assert "rerun the same command to resume" in stopped
    done = report.format_summary(RunResult("completed", 6, [], {"student": m}, 10.0), "W")
    assert "final student: top-1 0.5000" in done


def test_header_names_data_model_parameters_bits_and_methods():
    config = tiny_config()
    config.distill.enabled = True
    config.stages = [
        default.stage("w4a4", w_bits=4, a_bits=4, steps=2),
        default.stage("w2a2", steps=2),
    ]
    plan = parse_config(config)
    trainer = build_trainer(plan, INFO, data_mesh(1))
    header = report.run_header(trainer, lay_out(plan.stages, 11), "/tmp/w")
    assert "digits, 10 classes, 1437 train / 360 eval images" in header
    assert "input 32x32" in header
    # ResNet-20 with 10 classes: He et al.'s published count (tests/test_models.py).
    assert "resnet20, 269,722 parameters" in header
    assert "18 convs/dense layers" in header
    assert "stage 1 'w4a4': w4a4, 2 steps" in header and "stage 2 'w2a2': w2a2" in header
    assert "progressive (w4a4 -> w2a2)" in header and "joint distillation (joint teacher" in header


@pytest.mark.slow
def test_cli_shortens_a_stage_given_in_epochs(tmp_path):
    """The default config's stage is 30 epochs; ``stages[0].steps`` overrides it."""
    workdir = tmp_path / "run"
    proc = run_main(
        [
            "--config=configs/default.py",
            f"--workdir={workdir}",
            "--config.stages[0].steps=2",
            "--config.log_every_steps=1",
            "--config.progress=False",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in read_metrics(str(workdir), "train")] == [1, 2]
    with open(workdir / "config.json") as f:
        assert json.load(f)["stages"][0]["steps"] == 2
    assert "compiling the train step" in proc.stderr
    assert "eval at step 2: student top-1" in proc.stderr
    assert "training throughput:" in proc.stdout and "(evaluation excluded)" in proc.stdout
