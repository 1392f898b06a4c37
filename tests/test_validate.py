"""Config validation: every bad config is refused with a message that names the field, before
anything is compiled or written, from Python and from the command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import pytest
from runs import run_main, tiny_config, xla_env

from lbq.configs import default
from lbq.data import DataError
from lbq.plan import parse_config
from lbq.train import train_and_evaluate
from lbq.validate import ConfigError

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


@pytest.fixture
def compile_events():
    """The JAX tracing and compilation events recorded while the test runs."""
    events: list[str] = []

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if event in _COMPILE_EVENTS:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def set_raw(config, field: str, value: Any) -> None:
    """Sets a field past ConfigDict's type check, as a hand-edited config could."""
    *parents, name = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    if name in node:
        del node[name]
    node[name] = value


def changes(**fields: Any) -> Callable:
    """A config edit setting dotted fields (``model__name`` stands for ``model.name``)."""

    def edit(config, tmp_path) -> None:
        for key, value in fields.items():
            if isinstance(value, str) and "{tmp}" in value:
                value = value.replace("{tmp}", str(tmp_path))
            set_raw(config, key.replace("__", "."), value)

    return edit


def stages(*entries) -> Callable:
    def edit(config, tmp_path) -> None:
        del tmp_path
        config.stages = list(entries)

    return edit


def frozen_teacher(config, tmp_path) -> None:
    del tmp_path
    config.distill.enabled = True
    config.distill.teacher = "frozen"


S = default.stage
V, T = True, False  # caught by parse_config itself / only once the data is known
# fmt: off
CASES = [  # (id, edit, error type, text the message must contain, V or T)
    ("unknown-model", changes(model__name="resnet21"), ConfigError,
     "model.name='resnet21' is not one of", V),
    ("unknown-dataset", changes(data__name="no_such_dataset"), DataError,
     "unknown dataset 'no_such_dataset'", T),
    ("data-not-prepared", changes(data__name="cifar10", data__data_dir="{tmp}"), DataError,
     "dataset 'cifar10' is not prepared in data dir", T),
    ("missing-data-dir", changes(data__name="cifar10", data__data_dir="{tmp}/nowhere"),
     ConfigError, "data.data_dir='", V),
    ("w-bits-0", changes(quant__w_bits=0), ConfigError,
     "quant.w_bits=0 is not a valid bit-width", V),
    ("a-bits-33", changes(quant__a_bits=33), ConfigError,
     "quant.a_bits=33 is not a valid bit-width", V),
    ("w-bits-2.5", changes(quant__w_bits=2.5), ConfigError,
     "quant.w_bits=2.5 is not a valid bit-width", V),
    ("no-stages", stages(), ConfigError, "stages=[] must be a non-empty list", V),
    ("zero-length-stage", stages(S("warm", steps=2), S("main", steps=0)), ConfigError,
     "stages[1] (main).steps=0 must be a positive whole number", V),
    ("stage-without-length", stages(S("main")), ConfigError,
     "stages[0] (main): set exactly one of 'steps' and 'epochs'", V),
    ("stage-bits-out-of-range", stages(S("fp", steps=1, w_bits=32), S("low", steps=1, a_bits=64)),
     ConfigError, "stages[1] (low).a_bits=64 is not a valid bit-width", V),
    ("stage-negative-lr", stages(S("main", steps=1, lr=-0.5)), ConfigError,
     "stages[0] (main).lr=-0.5 must be a finite number >= 0", V),
    ("stage-not-a-stage", stages("main"), ConfigError, "stages[0]='main' must be a stage", V),
    ("stage-unknown-block", stages(S("main", steps=1, block_bits={"stage9_block0": (4, 4)})),
     ConfigError, "stages[0] (main).block_bits: block_bits names unknown blocks ['stage9_block0']",
     V),
    ("stage-shorter-than-a-step", stages(S("main", epochs=0.001)), ConfigError,
     "stages[0] (main).epochs=0.001 is less than one step", T),
    ("unknown-optimizer", changes(optimizer__name="adamw"), ConfigError,
     "optimizer.name='adamw' is not one of ('sgd', 'adam')", V),
    ("negative-lr", changes(schedule__lr=-0.1), ConfigError, "schedule.lr=-0.1 must be >= 0", V),
    ("nan-lr", changes(schedule__lr=float("nan")), ConfigError,
     "schedule.lr=nan must be a finite number", V),
    ("unknown-lr-schedule", changes(schedule__lr_schedule="linear"), ConfigError,
     "schedule.lr_schedule='linear' is not one of", V),
    ("bad-lr-boundaries", changes(schedule__lr_boundaries=(0.5, 1.5)), ConfigError,
     "schedule.lr_boundaries=(0.5, 1.5) must be a list of fractions in (0, 1)", V),
    ("batch-size-string", changes(batch_size="32"), ConfigError,
     "batch_size='32' has type str; expected int", V),
    ("seed-float", changes(seed=1.5), ConfigError, "seed=1.5 has type float; expected int", V),
    ("quantized-string", changes(model__quantized="yes"), ConfigError,
     "model.quantized='yes' has type str; expected bool", V),
    ("eval-batch-zero", changes(eval_batch_size=0), ConfigError,
     "eval_batch_size=0 must be >= 1", V),
    ("batch-larger-than-data", changes(batch_size=4096), ConfigError,
     "batch_size=4096 is larger than the", T),
    ("frozen-teacher-without-init", frozen_teacher, ConfigError,
     "distill.teacher='frozen' needs distill.teacher_init", V),
    ("missing-init-from", changes(init_from="{tmp}/no_run"), ConfigError, "init_from='", V),
    ("missing-teacher-init", changes(distill__teacher_init="{tmp}/no_teacher"), ConfigError,
     "distill.teacher_init='", V),
    ("bad-on-nonfinite", changes(on_nonfinite="ignore"), ConfigError,
     "on_nonfinite='ignore' is not one of ('stop', 'skip')", V),
    ("bad-on-config-change", changes(on_config_change="ask"), ConfigError,
     "on_config_change='ask' is not one of", V),
    ("bad-stochastic-schedule", changes(stochastic__schedule="cosine"), ConfigError,
     "stochastic.schedule='cosine' is not one of", V),
    ("stochastic-p-above-1", changes(stochastic__p_start=1.5), ConfigError,
     "stochastic.p_start=1.5 must be <= 1.0", V),
    ("stochastic-steps-zero", changes(stochastic__num_steps=0), ConfigError,
     "stochastic.num_steps=0 must be >= 1", V),
    ("stochastic-full-precision-model", changes(stochastic__enabled=True, model__quantized=False),
     ConfigError, "stochastic.enabled needs model.quantized=True", V),
    ("extra-students-without-distill", changes(distill__extra_students=((4, 4),)), ConfigError,
     "distill.extra_students needs distill.enabled=True", V),
    ("bad-temperature", changes(distill__temperature=0.0), ConfigError,
     "distill.temperature=0.0 must be > 0", V),
    ("unknown-augment", changes(data__augment="random"), ConfigError,
     "data.augment='random' is not one of", V),
    ("keep-no-checkpoints", changes(keep_checkpoints=0), ConfigError,
     "keep_checkpoints=0 must be >= 1", V),
    ("unknown-field", changes(chekpoint_every_steps=5), ConfigError,
     "chekpoint_every_steps is not a config field; did you mean checkpoint_every_steps?", V),
    ("unknown-nested-field", changes(schedule__lr_schedul="cosine"), ConfigError,
     "schedule.lr_schedul is not a config field; did you mean schedule.lr_schedule?", V),
    ("unknown-stage-field", stages(S("main", steps=1, w_bit=4)), ConfigError,
     "stages[0].w_bit is not a config field; did you mean stages[0].w_bits?", V),
    ("stage-negative-lr-decay", stages(S("main", steps=1, lr_decay=-1.0)), ConfigError,
     "stages[0] (main).lr_decay=-1.0 must be a finite number >= 0", V),
    ("stage-negative-warmup", stages(S("main", steps=1, warmup_epochs=-2.0)), ConfigError,
     "stages[0] (main).warmup_epochs=-2.0 must be a finite number >= 0", V),
    ("repeated-extra-students",
     changes(distill__enabled=True, distill__extra_students=((4, 4), (4, 4))), ConfigError,
     "distill.extra_students[1]=(4, 4) repeats an extra student", V),
    ("full-precision-model-low-bit-stage",
     lambda c, t: (changes(model__quantized=False)(c, t), stages(S("w2", w_bits=2, steps=1))(c, t)),
     ConfigError, "stages[0] (w2) asks for w2a2, but model.quantized=False", V),
    ("bits-string", changes(quant__w_bits="2"), ConfigError,
     "quant.w_bits='2' is not a valid bit-width", V),
    ("lr-boundaries-string", changes(schedule__lr_boundaries="0.4,0.6"), ConfigError,
     "schedule.lr_boundaries='0.4,0.6' must be a list of fractions in (0, 1)", V),
    ("stages-not-a-list", changes(stages=S("main", steps=1)), ConfigError,
     "must be a non-empty list of stages", V),
]
# fmt: on


def _bad_config(edit, tmp_path):
    config = tiny_config()
    edit(config, tmp_path)
    return config


@pytest.mark.parametrize(
    ("edit", "error", "text"), [c[1:4] for c in CASES if c[4]], ids=[c[0] for c in CASES if c[4]]
)
def test_validate_config_names_the_field(edit, error, text, tmp_path):
    with pytest.raises(error) as raised:
        parse_config(_bad_config(edit, tmp_path))
    assert text in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("edit", "error", "text"), [c[1:4] for c in CASES], ids=[c[0] for c in CASES]
)
def test_training_refuses_before_compiling_anything(edit, error, text, tmp_path, compile_events):
    workdir = tmp_path / "run"
    with pytest.raises(error) as raised:
        train_and_evaluate(_bad_config(edit, tmp_path), str(workdir))
    assert text in str(raised.value)
    assert "\n" not in str(raised.value)
    assert compile_events == []  # nothing traced or compiled
    assert not workdir.exists()  # nothing written


def test_compile_events_are_seen(compile_events):
    """The check above can fail: a jitted call is seen by the listener."""
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.arange(3.0))
    assert "/jax/core/compile/backend_compile_duration" in compile_events


def test_the_default_and_tiny_configs_are_valid():
    for variant in ("", "tiny"):
        parse_config(default.get_config(variant))


def _one_error_line(proc) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lbq: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config.quant.w_bits=33"], "lbq: error: quant.w_bits=33 is not a valid bit-width"),
        (["--config.data.name=no_such_dataset"], "lbq: error: unknown dataset 'no_such_dataset'"),
        (["--config.schedule.lr=-1.0"], "lbq: error: schedule.lr=-1.0 must be >= 0"),
    ],
    ids=["bits", "dataset", "lr"],
)
def test_cli_prints_one_error_line(args, expected, tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(["--config=configs/default.py:tiny", f"--workdir={workdir}", *args])
    assert _one_error_line(proc).startswith(expected)
    assert not workdir.exists()


def test_cli_batch_must_divide_over_the_devices(tmp_path):
    """8 simulated CPU devices: a global batch of 12 cannot be split evenly."""
    workdir = tmp_path / "run"
    proc = run_main(
        ["--config=configs/default.py:tiny", f"--workdir={workdir}", "--config.batch_size=12"],
        env=xla_env("--xla_force_host_platform_device_count=8"),
    )
    assert _one_error_line(proc) == (
        "lbq: error: batch_size=12 does not divide over 8 devices; use a multiple of 8"
    )
    assert not workdir.exists()


def test_a_stage_field_of_the_wrong_type_is_refused_where_the_stage_is_built():
    with pytest.raises(ValueError, match="stage 'main': lr='fast' has type str; expected float"):
        default.stage("main", steps=1, lr="fast")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--config.quant.wbits=4"],
            "lbq: error: --config.quant.wbits is not a config field; did you mean "
            "--config.quant.w_bits?",
        ),
        (
            ["--config.learning_rate=0.1"],
            "lbq: error: --config.learning_rate is not a config field",
        ),
        (
            ["--config.distributed=True"],
            "lbq: error: distributed=True: no cluster was detected",
        ),
    ],
    ids=["misspelled", "unknown", "distributed-without-cluster"],
)
def test_cli_unknown_fields_and_failed_start_up_are_one_line(args, expected, tmp_path):
    workdir = tmp_path / "run"
    proc = run_main(
        ["--config=configs/default.py:tiny", f"--workdir={workdir}", *args],
        env={"LBQ_COORDINATOR_ADDRESS": "", "LBQ_NUM_PROCESSES": "", "LBQ_PROCESS_ID": ""},
    )
    assert _one_error_line(proc).startswith(expected)
    assert not workdir.exists()


def test_cli_override_that_every_stage_hides_is_refused(tmp_path):
    """The two-stage config sets its own bits in both stages: quant.w_bits cannot act."""
    workdir = tmp_path / "run"
    proc = run_main(
        [
            "--config=configs/cifar100_w2a2_ts.py:tiny",
            f"--workdir={workdir}",
            "--config.quant.w_bits=4",
        ]
    )
    line = _one_error_line(proc)
    assert line.startswith("lbq: error: --config.quant.w_bits has no effect: every stage sets ")
    assert "stages[0] (w2a32).w_bits" in line and "--config.stages[0].w_bits=" in line
    assert not workdir.exists()


def test_cli_wrong_type_is_refused_by_the_flag_parser(tmp_path):
    proc = run_main(
        [
            "--config=configs/default.py:tiny",
            f"--workdir={tmp_path / 'run'}",
            "--config.batch_size=abc",
        ]
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "--config.batch_size=abc" in proc.stderr.splitlines()[0]
