"""Progressive quantization: stages, their schedules, reporting and errors."""

import orbax.checkpoint as ocp
import pytest
from runs import read_metrics, tiny_config

from lbq.checkpoint import Checkpoints
from lbq.configs import default
from lbq.stages import lay_out, parse_stages, stage_at
from lbq.train import train_and_evaluate
from lbq.validate import ConfigError

DEFAULTS = {
    "w_bits": 2,
    "a_bits": 2,
    "lr": {"student": 0.1},
    "lr_schedule": "step",
    "lr_boundaries": (0.5,),
    "lr_decay": 0.1,
    "warmup_epochs": 0.0,
}


def _build(*stages, steps_per_epoch=10):
    return lay_out(parse_stages(list(stages), DEFAULTS), steps_per_epoch)


def test_stages_are_laid_on_one_step_counter():
    stages = _build(
        default.stage("w2a32", a_bits=32, epochs=1.5),
        default.stage("w2a2", steps=7, lr=0.01, lr_schedule="cosine"),
    )
    assert [(s.start_step, s.num_steps, s.w_bits, s.a_bits) for s in stages] == [
        (0, 15, 2, 32),
        (15, 7, 2, 2),
    ]
    assert stage_at(stages, 14).name == "w2a32" and stage_at(stages, 15).name == "w2a2"
    first, second = stages
    assert first.learning_rate(0, "student") == pytest.approx(0.1)
    assert first.learning_rate(8, "student") == pytest.approx(0.01)  # past half of the stage
    assert second.learning_rate(15, "student") == pytest.approx(0.01)
    assert second.learning_rate(21, "student") < 0.001  # cosine near its end


def test_per_block_bits_and_warmup():
    stages = _build(
        default.stage("s", steps=10, block_bits={"stage1_block0": (4, 8)}, warmup_epochs=0.5)
    )
    assert stages[0].block_bits == {"stage1_block0": (4, 8)}
    assert stages[0].learning_rate(0, "student") == pytest.approx(0.1 / 5)


@pytest.mark.parametrize(
    "stages,match",
    [
        ([], "must be a non-empty list of stages"),
        ([default.stage("a", steps=0)], r"stages\[0\] \(a\)\.steps=0"),
        ([default.stage("a", epochs=0.0)], r"stages\[0\] \(a\)\.epochs=0.0"),
        (
            [default.stage("a", steps=2), default.stage("b", steps=2, w_bits=33)],
            r"stages\[1\] \(b\)\.w_bits=33",
        ),
        ([default.stage("a", steps=2, a_bits=0)], r"stages\[0\] \(a\)\.a_bits=0"),
        ([default.stage("a")], r"stages\[0\] \(a\): set exactly one of 'steps' and 'epochs'"),
        ([default.stage("a", steps=1, lr_schedule="poly")], r"stages\[0\] \(a\)\.lr_schedule"),
        ([default.stage("a", steps=1), default.stage("a", steps=1)], "repeated names"),
    ],
)
def test_bad_stages_name_the_stage_and_field(stages, match):
    with pytest.raises(ValueError, match=match):
        _build(*stages)


def test_unknown_block_in_stage_is_a_config_error(tmp_path):
    config = tiny_config()
    config.stages = [default.stage("a", steps=2, block_bits={"stage9_block0": (4, 4)})]
    with pytest.raises(ConfigError, match="unknown blocks.*stage9_block0"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_two_stage_run_reuses_the_step_and_reports_each_stage(tmp_path, capsys):
    config = tiny_config()
    config.stochastic.enabled = True  # its per-stage count shows the optimizer state reset
    config.stages = [
        default.stage("w2a32", a_bits=32, steps=3),
        default.stage("w2a2", steps=3, lr=0.05),
    ]
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 10
    config.log_every_steps = 1
    result = train_and_evaluate(config, str(tmp_path))
    assert result.train_step_compilations == 1
    assert [s["name"] for s in result.stages] == ["w2a32", "w2a2"]
    assert all(0 <= s["eval"]["student"]["top1"] <= 1 for s in result.stages)
    summary = capsys.readouterr().out
    assert "w2a32" in summary and "w2a2" in summary

    train = read_metrics(str(tmp_path), "train")
    assert {r["stage_name"] for r in train} == {"w2a32", "w2a2"}
    assert [r["student/lr"] for r in train if r["step"] == 4][0] == pytest.approx(0.05)

    checkpoints = Checkpoints(str(tmp_path), keep=10)
    meta = checkpoints.manager.restore(4, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    assert meta.meta["stage_name"] == "w2a2"
    state = checkpoints.manager.restore(
        4, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    ).state
    sp_state = state["opt_state"]["inner_states"]["student"]["inner_state"][0]
    assert int(sp_state["count"]) == 1 and int(sp_state["horizon"]) == 3  # fresh at step 3
    checkpoints.close()
