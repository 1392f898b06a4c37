"""Reliability of long runs on the real trainer: preemption, exact resume, damaged checkpoints,
a workdir that holds another run or is busy, failed saves, and non-finite values.

Every run here is a real `train_and_evaluate` (or `python -m lbq.main`) on a tiny config. Each
call compiles its own steps, about 15 s per program on a 2-core CPU, so the module shares a
persistent JAX compilation cache between its runs and subprocesses: a repeated program is then
read from disk instead of compiled again. Nothing else is shared or mocked.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from runs import REPO, leaves, read_metrics, run_main, tiny_config, xla_env

from lbq import report
from lbq.checkpoint import UNREADABLE_DIR, CheckpointError, load_variables
from lbq.configs import default
from lbq.metrics import MetricsWriter
from lbq.plan import parse_config
from lbq.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher
from lbq.train import NonFiniteError, RunResult, train_and_evaluate
from lbq.validate import ConfigError
from lbq.workdir import (
    LOCK_FILE,
    WorkdirError,
    WorkdirLock,
    config_differences,
    write_record,
)

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    """A persistent compilation cache for this module; returns the env for subprocesses.

    JAX_COMPILATION_CACHE_DIR, when set, names a cache that outlives the session.
    """
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    )
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    compilation_cache.reset_cache()  # the cache is set up once per process; redo it here
    yield {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def assert_same_variables(a: dict, b: dict) -> None:
    """Every parameter and BatchNorm statistic of every network agrees."""
    assert sorted(a) == sorted(b)
    for net in a:
        for kind in ("params", "batch_stats"):
            left, right = leaves(a[net][kind]), leaves(b[net][kind])
            assert len(left) == len(right) > 0 or kind == "batch_stats"
            for x, y in zip(left, right, strict=True):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=f"{net} {kind}")


def step_dirs(workdir: str) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


# ----------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A 3-step run with a checkpoint at every step, and its final variables."""
    workdir = str(tmp_path_factory.mktemp("saved") / "run")
    config = tiny_config(steps=3)
    config.checkpoint_every_steps = 1
    train_and_evaluate(config, workdir)
    assert step_dirs(workdir) == [1, 2, 3]
    return config, workdir, load_variables(workdir)


def _largest_array_file(step_dir: str) -> str:
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _truncate(step_dir: str) -> None:
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _delete(step_dir: str) -> None:
    os.remove(_largest_array_file(step_dir))


def _delete_metadata(step_dir: str) -> None:
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _flip_bytes(path: str) -> None:
    """Same size, damaged content: Orbax can restore this without complaint."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _flip_largest(step_dir: str) -> None:
    _flip_bytes(_largest_array_file(step_dir))


# Orbax leaves the other reads of a failed restore pending; lbq keeps their thousands of
# "Exception ignored" reports off the console. These marks fail a test if one gets through.
QUIET = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@QUIET
@pytest.mark.parametrize(
    "damage",
    [_truncate, _delete, _delete_metadata, _flip_largest],
    ids=["truncated", "deleted", "no-metadata", "bytes-flipped"],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(saved_run, tmp_path, caplog, damage):
    config, source, final = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    damage(os.path.join(workdir, "checkpoints", "3"))

    with caplog.at_level(logging.WARNING, logger="lbq"):
        result = train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint at step 3" in w and "unreadable" in w for w in warnings), warnings
    assert any("resuming from step 2" in w for w in warnings), warnings
    assert result.status == "completed" and result.step == 3
    assert os.path.isdir(os.path.join(workdir, UNREADABLE_DIR, "3"))  # kept for inspection
    assert step_dirs(workdir) == [1, 2, 3]  # step 3 saved again, not skipped
    assert_same_variables(load_variables(workdir), final)  # step 3 redone from step 2


@QUIET
def test_interrupted_save_is_reported_and_ignored(saved_run, tmp_path, caplog):
    """An Orbax temporary folder left by a save that never finished."""
    config, source, final = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    folder = os.path.join(workdir, "checkpoints")
    partial = os.path.join(folder, "3.orbax-checkpoint-tmp-1700000000")
    os.rename(os.path.join(folder, "3"), partial)
    shutil.rmtree(os.path.join(partial, "state"))

    with caplog.at_level(logging.WARNING, logger="lbq"):
        result = train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint at step 3" in w and "only partly written" in w for w in warnings)
    assert any("resuming from step 2" in w for w in warnings), warnings
    assert result.status == "completed" and result.step == 3
    assert not os.path.exists(partial)
    assert step_dirs(workdir) == [1, 2, 3]
    assert_same_variables(load_variables(workdir), final)


@QUIET
def test_no_readable_checkpoint_refuses_to_start_over(saved_run, tmp_path):
    config, source, _ = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    for step in (1, 2, 3):
        _truncate(os.path.join(workdir, "checkpoints", str(step)))
    with pytest.raises(CheckpointError) as error:
        train_and_evaluate(config, workdir)
    message = str(error.value)
    assert all(f"step {s}:" in message for s in (1, 2, 3)), message
    assert "Refusing to start from scratch" in message
    assert step_dirs(workdir) == [1, 2, 3]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(workdir, UNREADABLE_DIR))


def test_a_first_save_cut_by_a_kill_is_discarded_and_the_run_starts(tmp_path, caplog):
    """A SIGKILL during the first save leaves only ``N.orbax-checkpoint-tmp*``: nothing was
    finished, so nothing is lost; the rerun says what it discarded and starts at step 0."""
    config = tiny_config(steps=1)
    workdir = str(tmp_path / "run")
    partial = os.path.join(workdir, "checkpoints", "1.orbax-checkpoint-tmp-5")
    os.makedirs(os.path.join(partial, "state"))
    write_record(workdir, parse_config(config).record)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 9.0}\n')

    with caplog.at_level(logging.WARNING, logger="lbq"):
        result = train_and_evaluate(config, workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "no save had finished" in w
        and "discarding 1.orbax-checkpoint-tmp-5 and starting the run from step 0" in w
        for w in warnings
    ), warnings
    assert result.status == "completed" and result.step == 1
    assert not os.path.exists(partial)
    assert step_dirs(workdir) == [1]
    assert [r["loss"] for r in read_metrics(workdir, "train")] != [9.0]  # the step was redone


def test_load_variables_names_a_damaged_step(saved_run, tmp_path):
    _, source, _ = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    step_dir = os.path.join(workdir, "checkpoints", "2")
    for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        _flip_bytes(path)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*\(step 2: "):
        load_variables(os.path.join(workdir, "checkpoints", "2"))


def test_load_variables_on_another_device_count(saved_run, tmp_path):
    """Weights saved on 1 device load on 8 (init_from and teacher_init across machines)."""
    _, source, final = saved_run
    out = tmp_path / "loaded.npz"
    script = (
        "import sys, jax, numpy as np\n"
        "from lbq.checkpoint import load_variables\n"
        "assert jax.device_count() == 8\n"
        "v = load_variables(sys.argv[1])['student']['params']\n"
        "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(v)])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, source, str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **xla_env("--xla_force_host_platform_device_count=8")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as loaded:
        arrays = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    expected = leaves(final["student"]["params"])
    assert len(arrays) == len(expected)
    for x, y in zip(arrays, expected, strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, cache_env):
    """A real SIGTERM to `python -m lbq.main`: checkpoint, exit 75, then the rerun completes."""
    total = 25
    config_file = tmp_path / "long.py"
    config_file.write_text(
        "from lbq.configs import default\n\n\n"
        "def get_config():\n"
        "    c = default.get_config('tiny')\n"
        f"    c.stages = [default.stage('main', steps={total})]\n"
        "    c.log_every_steps = 1\n"
        "    c.checkpoint_every_steps = 1000  # only the preemption saves mid-run\n"
        "    return c\n"
    )
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "lbq.main", f"--config={config_file}", f"--workdir={workdir}"]
    env = {**os.environ, **cache_env}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no metrics line within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)

    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-2000:]
    assert "received SIGTERM" in stderr
    saved = step_dirs(workdir)
    assert len(saved) == 1 and 1 <= saved[0] < total
    assert (
        f"lbq: preempted at step {saved[0]}; a checkpoint is saved. Rerun the same command "
        "to resume." in stderr
    )
    assert "Traceback" not in stderr
    assert read_metrics(workdir, "train")[-1]["step"] == saved[0]

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from step {saved[0]}" in rerun.stderr
    assert f"lbq run completed at step {total}" in rerun.stdout
    steps = [r["step"] for r in read_metrics(workdir, "train")]
    assert steps == list(range(1, total + 1))  # resumed where it stopped, no step twice
    assert step_dirs(workdir)[-1] == total


def test_resume_drops_metrics_written_after_the_last_checkpoint(tmp_path):
    """A hard kill after logging steps 4 and 5 (checkpoint at 3), mid-way through a line."""
    path = tmp_path / "metrics.jsonl"
    lines = [f'{{"step": {s}, "kind": "train", "loss": {s / 10}}}\n' for s in range(1, 6)]
    path.write_text("".join(lines) + '{"step": 6, "kind": "tr')
    MetricsWriter(str(tmp_path), start_step=3).write(4, "train", {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path), "train")] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, 0.25),
    ]


def test_watcher_turns_signals_into_a_stop_request_and_a_second_ctrl_c_into_an_interrupt():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with PreemptionWatcher() as watcher:
        assert not watcher.should_stop(sync=True)
        with PreemptionWatcher() as inner:  # the trainer's watcher inside lbq.main's
            assert inner is watcher
        assert signal.getsignal(signal.SIGTERM) == watcher._handle  # still installed
        signal.raise_signal(signal.SIGTERM)
        assert watcher.should_stop(sync=True) and watcher.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM still waits for the checkpoint
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C after a request: stop at once
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_every_early_stop_has_its_own_message_and_one_exit_status():
    """lbq.main's one exit for a stop: what the user reads for each of the three kinds."""
    from lbq.main import SECOND_INTERRUPT, stop_message

    before = Preempted("stopped by SIGTERM before the first training step; nothing was written")
    assert stop_message(stop=before) == str(before)
    assert stop_message(stop=KeyboardInterrupt()) == SECOND_INTERRUPT
    saved = RunResult("preempted", 7, [], {}, 0.0)
    assert stop_message(saved).startswith("preempted at step 7; a checkpoint is saved.")
    unsaved = RunResult("preempted", 0, [], {}, 0.0)
    assert stop_message(unsaved).startswith("stopped before the first training step")


# ----------------------------------------------------------------------------- workdir mismatch


def test_workdir_with_another_config_refuse_continue_overwrite(tmp_path):
    workdir = str(tmp_path / "run")
    first = tiny_config(steps=2)
    train_and_evaluate(first, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = f.read()

    changed = tiny_config(steps=3)
    changed.quant.w_bits = 4
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "quant.w_bits: 2 -> 4" in message
    assert "stages[0].steps: 2 -> 3" in message
    assert "on_config_change=continue" in message and "=overwrite" in message
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == recorded  # a refused run changes nothing

    changed.on_config_change = "continue"
    result = train_and_evaluate(changed, workdir)
    assert result.step == 3
    assert [(r["name"], r["steps"]) for r in result.stages] == [("main", 3)]  # extended, once
    assert [r["step"] for r in read_metrics(workdir, "train")] == [2, 3]  # log_every_steps=3
    assert step_dirs(workdir) == [2, 3]

    again = tiny_config(steps=1)
    again.on_config_change = "overwrite"
    result = train_and_evaluate(again, workdir)
    assert result.status == "completed" and result.step == 1  # started over, not "done"
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1]
    assert step_dirs(workdir) == [1]


def test_a_field_added_after_a_run_was_recorded_differs_only_off_its_default():
    record = dict(parse_config(tiny_config(steps=2)).record)
    old = {k: v for k, v in record.items() if k != "init_from"}
    old["stages"] = [{k: v for k, v in record["stages"][0].items() if k != "lr_decay"}]
    assert config_differences(old, record) == []  # both absent fields hold their defaults
    changed = tiny_config(steps=2)
    changed.init_from = "gs://runs/fp"
    changed.stages[0].lr_decay = 0.5
    assert config_differences(old, parse_config(changed).record) == [
        "init_from: '<absent>' -> 'gs://runs/fp'",
        "stages[0].lr_decay: '<absent>' -> 0.5",
    ]


# ----------------------------------------------------------------------------- non-finite values


def test_nonfinite_stops_with_step_and_last_good_checkpoint(tmp_path, cache_env):
    """lr=1e30: step 1 is finite, step 2's gradient overflows. The check runs at step 3."""
    workdir = str(tmp_path / "run")
    proc = run_main(
        [
            "--config=configs/default.py:tiny",
            f"--workdir={workdir}",
            "--config.schedule.lr=1e30",
            "--config.checkpoint_every_steps=1",
            "--config.log_every_steps=3",
        ],
        env=cache_env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"lbq: error: non-finite loss or gradient at step 2; the last good checkpoint is step 1 "
        f"in {os.path.join(workdir, 'checkpoints')} (set on_nonfinite='skip' to skip such steps "
        "instead)"
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert step_dirs(workdir) == [1]  # nothing saved after the bad step


def test_nonfinite_skip_leaves_parameters_unchanged_and_fails_a_mostly_skipped_stage(tmp_path):
    """lr=1e30 under 'skip': step 1 is finite, every later step overflows. Steps 2 and 3 are
    skipped; at step 3 the stage has skipped 2 of its 3 steps, more than half: the run fails
    there, without a checkpoint of step 3."""
    workdir = str(tmp_path / "run")
    config = tiny_config(steps=3)
    config.schedule.lr = 1e30
    config.on_nonfinite = "skip"
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    folder = os.path.join(workdir, "checkpoints")
    with pytest.raises(NonFiniteError) as error:
        train_and_evaluate(config, workdir)
    assert str(error.value) == (
        "stage 'main' skipped 2 of its 3 steps by step 3 (non-finite loss or gradient, "
        "on_nonfinite='skip'); with more than half of a stage skipped its result would mean "
        f"little. Lower the learning rate or check the data; the last checkpoint is step 2 in "
        f"{folder}"
    )
    train = read_metrics(workdir, "train")
    assert [(r["finite"], r["skipped_steps"]) for r in train] == [(1.0, 0), (0.0, 1), (0.0, 2)]
    assert step_dirs(workdir) == [1, 2]

    by_step = {s: load_variables(os.path.join(folder, str(s))) for s in (1, 2)}
    assert_same_variables(by_step[1], by_step[2])
    # Step 1 itself was applied: the huge rate moved the weights far from any initialisation.
    assert max(np.abs(x).max() for x in leaves(by_step[1]["student"]["params"])) > 1e20

    # Resumed under 'stop', earlier skipped steps are not reported again; the next bad one is.
    config.on_nonfinite = "stop"
    config.stages[0].steps = 5
    config.on_config_change = "continue"
    with pytest.raises(NonFiniteError, match="at step 3; the last good checkpoint is step 2 "):
        train_and_evaluate(config, workdir)


def test_summary_counts_skipped_steps_and_names_mixed_eval_splits():
    m = {"top1": 0.5, "top5": 0.9, "loss": 1.0}
    stages = [
        {"name": name, "bits": name, "steps": 40, "eval": {"student": m}, "eval_split": split}
        for name, split in (("w4a4", "test"), ("w2a2", "train"))
    ]
    result = RunResult(
        "completed", 80, stages, {"student": m}, 0.0, 1, {"w4a4": 0, "w2a2": 3}, {"w2a2": 40}
    )
    lines = report.format_summary(result, "W").splitlines()
    assert "skipped steps (non-finite loss or gradient): w2a2 3 of 40" in lines
    assert lines[2].endswith("student 0.5000  (on test)")
    assert lines[3].endswith("student 0.5000  (on train)")
    same = RunResult("completed", 80, stages[:1], {"student": m}, 0.0)
    text = report.format_summary(same, "W")
    assert "(on test)" not in text and "skipped" not in text


# ----------------------------------------------------------------------------- exact resume


class _SignalOnLog(logging.Handler):
    """Sends ``signum`` to this process when lbq logs a message containing ``text``."""

    def __init__(self, text: str, signum: int):
        super().__init__()
        self.text, self.signum = text, signum

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            os.kill(os.getpid(), self.signum)


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
    """Two stages, stochastic precision and joint distillation, interrupted twice mid-stage."""
    config = tiny_config()
    config.stages = [
        default.stage("fp", w_bits=32, a_bits=32, steps=3),
        default.stage("low", w_bits=2, a_bits=2, steps=3),
    ]
    config.stochastic.enabled = True
    config.distill.enabled = True
    config.log_every_steps = 1
    config.checkpoint_every_steps = 100  # only stage ends and interruptions save

    straight = str(tmp_path / "straight")
    result = train_and_evaluate(config, straight)
    assert result.status == "completed" and result.step == 6

    resumed = str(tmp_path / "resumed")
    first = train_and_evaluate(config, resumed, stop_at_step=2)  # mid-stage 1
    assert (first.status, first.step, step_dirs(resumed)) == ("preempted", 2, [2])

    # A real SIGINT, raised as stage 2 starts: the watcher stops after that stage's first step.
    handler = _SignalOnLog("stage 2/2", signal.SIGINT)
    logger = logging.getLogger("lbq")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        second = train_and_evaluate(config, resumed)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (second.status, second.step, step_dirs(resumed)) == ("preempted", 4, [2, 3, 4])

    third = train_and_evaluate(config, resumed)
    assert third.status == "completed" and third.step == 6
    assert [s["name"] for s in third.stages] == ["fp", "low"]

    assert_same_variables(load_variables(straight), load_variables(resumed))
    a, b = read_metrics(straight, "train"), read_metrics(resumed, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for key in ("student/loss", "teacher/loss", "student/quantized_fraction"):
        np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-6)
    # The masks really were sampled: some steps ran part of the network in full precision.
    assert min(r["student/quantized_fraction"] for r in a) < 1.0
    np.testing.assert_allclose(third.final["student"]["top1"], result.final["student"]["top1"])


# ----------------------------------------------------------------------------- the workdir lock


def write_config_file(path, steps: int, **fields) -> str:
    """A config file: the tiny default with one stage of ``steps`` steps and ``fields`` set."""
    lines = [
        "from lbq.configs import default",
        "",
        "",
        "def get_config():",
        "    c = default.get_config('tiny')",
        f"    c.stages = [default.stage('main', steps={steps})]",
        *(f"    c.{name} = {value!r}" for name, value in fields.items()),
        "    return c",
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_a_second_run_on_a_busy_workdir_refuses_and_a_killed_holder_needs_no_one(
    tmp_path, cache_env
):
    """Two real `python -m lbq.main` on one workdir: the second refuses at once, naming the
    holder; after a SIGKILL of the holder, the same command runs."""
    config = write_config_file(tmp_path / "two.py", steps=2)
    workdir = str(tmp_path / "run")
    args = [f"--config={config}", f"--workdir={workdir}"]
    env = {**os.environ, **cache_env}
    first = subprocess.Popen(
        [sys.executable, "-m", "lbq.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = os.path.join(workdir, LOCK_FILE)
    deadline = time.time() + 120
    holder: dict = {}
    while holder.get("pid") != first.pid:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() < deadline, "the first run did not take the lock within 120 s"
        time.sleep(0.02)
        try:
            with open(lock) as f:
                holder = json.load(f)
        except (OSError, ValueError):
            holder = {}
    first.send_signal(signal.SIGSTOP)  # holds the lock, wherever it is, until it is killed
    try:
        second = run_main(args, env=cache_env)
    finally:
        first.kill()  # SIGKILL: no handler, no clean-up; the kernel drops the lock
        first.communicate()
    assert second.returncode == 1, second.stderr[-2000:]
    assert error_lines(second.stderr) == [
        f"lbq: error: workdir {workdir} is in use by another lbq run (host "
        f"{socket.gethostname()}, pid {first.pid}, since {holder['started']}); wait for it to "
        f"end, or use another --workdir (the lock is {lock})"
    ]
    assert "Traceback" not in second.stderr

    assert os.path.exists(lock)  # left by the killed run, naming it; no one needs to clear it
    third = run_main(args, env=cache_env)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "lbq run completed at step 2" in third.stdout
    assert not os.path.exists(lock)  # released: removed
    assert step_dirs(workdir)[-1] == 2


def test_lock_refuses_a_second_holder_and_leaves_no_trace_once_released(tmp_path):
    """flock(2) locks of two opens conflict even within one process, so one process can play
    both runs. A released lock removes its file, and the workdir it created."""
    workdir = str(tmp_path / "new")
    first = WorkdirLock(workdir)
    first.acquire()
    with open(os.path.join(workdir, LOCK_FILE)) as f:
        holder = json.load(f)
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(WorkdirError, match=rf"\(host .+, pid {os.getpid()}, since "):
        WorkdirLock(workdir).acquire()
    first.release()
    assert not os.path.exists(workdir)  # created for the lock, and nothing else was written

    kept = tmp_path / "kept"
    kept.mkdir()
    again = WorkdirLock(str(kept))
    again.acquire()
    again.release()
    assert kept.is_dir() and not os.listdir(kept)


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    too_long = str(tmp_path / ("x" * 300))  # one name over the 255 bytes of most filesystems
    with pytest.raises(WorkdirError) as error:
        WorkdirLock(too_long).acquire()
    assert str(error.value) == f"cannot use workdir {too_long}: File name too long ({too_long})"
    with pytest.raises(WorkdirError) as error:
        write_record(too_long, {"seed": 0})
    assert str(error.value) == (
        f"could not write {too_long}/config.json: File name too long ({too_long})"
    )


# ----------------------------------------------------------------------------- failed saves


def _mount_small_tmpfs(target) -> bool:
    target.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0


def _chattr(flag: str, path: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, path], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("fault", ["disk-full", "immutable"])
def test_a_failed_save_stops_the_run_at_once_with_one_line(tmp_path, cache_env, fault):
    """disk-full: the run lives on a real 6 MB tmpfs and fills it with checkpoints (about 2 MB
    each). immutable: the checkpoint folder of a 2-step run is made immutable (``chattr +i``,
    which stops root too) and the run is continued to its full length. Either way the first
    save that fails ends the run with one line, exit status 1, within seconds (Orbax's threads
    once held the process 300 s), and the checkpoints saved before it still restore.

    The write fails on Orbax's background thread, so the step that notices it depends on how
    busy the machine is: the run is long enough (10 steps) that a starved writer still fails
    well before the end, and the check allows a few steps after the failed save."""
    steps = 10
    if fault == "disk-full":
        if not _mount_small_tmpfs(tmp_path / "fs"):
            pytest.skip("mounting a tmpfs needs root")
        workdir = str(tmp_path / "fs" / "run")
        fields = {}
    else:
        workdir = str(tmp_path / "run")
        config = tiny_config(steps=2)
        config.checkpoint_every_steps = 1
        train_and_evaluate(config, workdir)
        if not _chattr("+i", os.path.join(workdir, "checkpoints")):
            pytest.skip("chattr +i is not available here")
        fields = {"on_config_change": "continue"}
    folder = os.path.join(workdir, "checkpoints")
    config_file = write_config_file(
        tmp_path / "run.py",
        steps=steps,
        checkpoint_every_steps=1,
        keep_checkpoints=10,
        log_every_steps=1,
        **fields,
    )
    try:
        proc = run_main([f"--config={config_file}", f"--workdir={workdir}"], env=cache_env)
        ended = time.time()
        saved = step_dirs(workdir)
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = error_lines(proc.stderr)
        assert len(errors) == 1, proc.stderr[-3000:]
        failed = len(saved) + 1  # the steps before it were all saved
        reason = {"disk-full": "No space left on device (ENOSPC)"}.get(
            fault, "Operation not permitted (EPERM)"
        )
        assert errors[0] == (
            f"lbq: error: could not write the checkpoint at step {failed}: {reason}; the "
            f"checkpoints saved before it are intact in {folder}"
        )
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert saved == list(range(1, failed)) and 1 < failed <= steps
        # Stopped at the step boundary after the background write failed, before evaluating.
        logged = {r["step"]: r["time"] for r in read_metrics(workdir, "train")}
        assert failed <= max(logged) <= failed + 3 < steps
        assert ended - logged[failed] < 60  # seconds, not Orbax's 300 s wait
        assert "evaluating" not in proc.stderr
        for step in saved:  # older checkpoints intact
            load_variables(os.path.join(folder, str(step)))
        assert not [n for n in os.listdir(folder) if "tmp" in n]  # the failed save's files
    finally:
        if fault == "immutable":
            _chattr("-i", folder)
        else:
            subprocess.run(["umount", str(tmp_path / "fs")], check=False)


# ----------------------------------------------------------------------------- signals at start


def _handles_sigterm(pid: int) -> bool:
    """Whether process ``pid`` catches SIGTERM (Linux: the SigCgt mask of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_signal_before_training_exits_75_and_the_same_command_runs(tmp_path, cache_env):
    """SIGTERM as soon as the handler is in (start-up: flags, imports), SIGINT when the header
    is printed (init, restore), SIGTERM when the first compile starts: each exits 75, and the
    same command then completes the run with every step once."""
    config = write_config_file(tmp_path / "two.py", steps=2, log_every_steps=1)
    workdir = str(tmp_path / "run")
    command = [sys.executable, "-m", "lbq.main", f"--config={config}", f"--workdir={workdir}"]
    env = {**os.environ, **cache_env}

    def interrupted(signum: int, when: str | None) -> str:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if when is None:  # as early as the handler is installed
            while not _handles_sigterm(proc.pid):
                assert proc.poll() is None, proc.communicate()[0][-2000:]
                time.sleep(0.005)
            proc.send_signal(signum)
            output = proc.communicate(timeout=300)[0]
        else:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if when in line:
                    proc.send_signal(signum)
                    break
            output = "".join(lines) + proc.communicate(timeout=300)[0]
        assert proc.returncode == PREEMPTED_EXIT_CODE, output[-2000:]
        assert "Traceback" not in output
        return output

    output = interrupted(signal.SIGTERM, None)
    assert "stopped by SIGTERM before the first training step; nothing was written" in output
    assert not os.path.exists(workdir)  # created for the lock only, and removed with it

    output = interrupted(signal.SIGINT, "lbq run in")
    assert "stopped by SIGINT before the first training step; nothing was written" in output
    assert not os.path.exists(workdir)

    output = interrupted(signal.SIGTERM, "compiling the train step")
    assert "received SIGTERM" in output
    assert "lbq: preempted at step 1; a checkpoint is saved." in output
    assert step_dirs(workdir) == [1]

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from step 1" in rerun.stderr
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2]


# ----------------------------------------------------------------------------- failed starts


def snapshot(workdir: str) -> dict[str, bytes]:
    """Every file of a workdir and its bytes."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, workdir)] = f.read()
    return files


def test_a_start_that_fails_leaves_the_workdir_as_it_was(saved_run, tmp_path):
    """overwrite with a bad init_from, a model that cannot take the images, start weights that
    are not a run: each fails before the first step, and nothing is deleted or rewritten."""
    _, source, _ = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    before = snapshot(workdir)
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("not a run\n")

    bad_init = tiny_config(steps=3)
    bad_init.init_from = str(not_a_run)
    bad_init.on_config_change = "overwrite"
    with pytest.raises(ConfigError, match=r"^init_from: no checkpoint found in .*notes$"):
        train_and_evaluate(bad_init, workdir)
    assert snapshot(workdir) == before

    alexnet = tiny_config(steps=3)
    alexnet.model.name = "alexnet"
    alexnet.on_config_change = "overwrite"
    with pytest.raises(ConfigError, match=r"^model.name='alexnet' cannot be built for 32x32 "):
        train_and_evaluate(alexnet, workdir)
    assert snapshot(workdir) == before

    teacher = tiny_config(steps=3)
    teacher.distill.enabled = True
    teacher.distill.teacher_init = str(not_a_run)
    teacher.on_config_change = "continue"
    new_workdir = str(tmp_path / "new")
    with pytest.raises(ConfigError, match=r"^distill.teacher_init: no checkpoint found in "):
        train_and_evaluate(teacher, new_workdir)
    assert not os.path.exists(new_workdir)  # not even the folder is left
    teacher.on_config_change = "overwrite"
    with pytest.raises(ConfigError, match=r"^distill.teacher_init: no checkpoint found in "):
        train_and_evaluate(teacher, workdir)
    assert snapshot(workdir) == before


# ----------------------------------------------------------------------------- continued runs


def test_continuing_with_another_optimizer_restores_the_weights_with_a_fresh_optimizer(
    saved_run, tmp_path, caplog
):
    """An SGD run continued with Adam: the parameters and BatchNorm statistics of its newest
    checkpoint are restored and the optimizer state starts afresh; no checkpoint is called
    unreadable, and config.json changes only after the restore worked. Another model is
    refused, naming the first parameter that differs."""
    _, source, final = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    before = snapshot(workdir)

    other_model = tiny_config(steps=4)
    other_model.model.shortcut = "B"  # 1x1 convolutions on the shortcuts: more parameters
    other_model.on_config_change = "continue"
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(other_model, workdir)
    message = str(error.value)
    assert message.startswith(
        f"the checkpoint at step 3 in {os.path.join(workdir, 'checkpoints')} holds another "
        "model than this run builds (params.student."
    ), message
    assert "in the checkpoint, (1, 1, " in message  # a 1x1 kernel that the run lacks
    assert "model.shortcut: 'A' -> 'B'" in message and "overwrite" in message
    assert snapshot(workdir) == before

    adam = tiny_config(steps=4)
    adam.optimizer.name = "adam"
    adam.on_config_change = "continue"
    with caplog.at_level(logging.INFO, logger="lbq"):
        result = train_and_evaluate(adam, workdir)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(
            "restored the parameters and BatchNorm statistics of step 3; the optimizer "
            "state starts afresh"
        )
        and "optimizer.name: 'sgd' -> 'adam'" in m
        for m in messages
    ), messages
    assert not any("unreadable" in m for m in messages), messages
    assert not os.path.exists(os.path.join(workdir, UNREADABLE_DIR))
    assert result.status == "completed" and result.step == 4
    assert step_dirs(workdir) == [2, 3, 4]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optimizer"]["name"] == "adam"
    changes = read_metrics(workdir, "config_change")
    assert [(r["step"], r["changes"]) for r in changes] == [
        (3, ["optimizer.name: 'sgd' -> 'adam'", "stages[0].steps: 3 -> 4"])
    ]
    # Step 4 started from step 3's weights: one Adam step moves them by about the rate.
    start = leaves(final["student"]["params"])
    after = leaves(load_variables(workdir)["student"]["params"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(after, start, strict=True)) < 1.0


def test_a_continued_run_keeps_config_json_true_to_what_the_workdir_holds(saved_run, tmp_path):
    """A finished 3-step run: cutting it to 2 steps, or continuing it with another eval split
    and nothing to train, is refused; a changed finished stage is refused; a new stage with
    another eval split runs, and each stage's result names its split."""
    _, source, _ = saved_run
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    before = snapshot(workdir)

    shorter = tiny_config(steps=2)
    shorter.on_config_change = "continue"
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(shorter, workdir)
    assert str(error.value).startswith(
        f"the run in {workdir} has trained 3 steps, but the stages now end at step 2 "
        "(stages[0].steps: 3 -> 2); a continued run may extend its stages or add stages, not "
        "cut what already ran"
    )
    assert snapshot(workdir) == before

    other_split = tiny_config(steps=3)
    other_split.data.eval_split = "train"
    other_split.on_config_change = "continue"
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(other_split, workdir)
    assert str(error.value).startswith(
        f"the run in {workdir} is complete at step 3; continuing it with (data.eval_split: "
        "'test' -> 'train') would train nothing"
    )
    assert f"start a new workdir with --config.init_from={workdir}" in str(error.value)
    assert snapshot(workdir) == before

    other_split.stages = [
        default.stage("main", steps=3, w_bits=4),
        default.stage("more", steps=1),
    ]
    with pytest.raises(ConfigError, match=r"^stages\[0\] \('main'\) finished at step 3 in "):
        train_and_evaluate(other_split, workdir)
    assert snapshot(workdir) == before

    other_split.stages = [default.stage("main", steps=3), default.stage("more", steps=1)]
    result = train_and_evaluate(other_split, workdir)
    assert result.status == "completed" and result.step == 4
    assert [(s["name"], s["eval_split"]) for s in result.stages] == [
        ("main", "test"),
        ("more", "train"),
    ]
    assert [(r["step"], r["eval_split"]) for r in read_metrics(workdir, "eval")][-1] == (4, "train")
    summary = report.format_summary(result, workdir)
    assert "(on test)" in summary and "(on train)" in summary
