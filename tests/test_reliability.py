"""Reliability of long runs on the real trainer: preemption, exact resume, damaged checkpoints,
a workdir that holds another run, and non-finite values.

Every run here is a real `train_and_evaluate` (or `python -m lbq.main`) on a tiny config. Each
call compiles its own steps, about 15 s per program on a 2-core CPU, so the module shares a
persistent JAX compilation cache between its runs and subprocesses: a repeated program is then
read from disk instead of compiled again. Nothing else is shared or mocked.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from runs import REPO, leaves, read_metrics, run_main, tiny_config

from lbq.checkpoint import UNREADABLE_DIR, CheckpointError, load_variables
from lbq.configs import default
from lbq.metrics import MetricsWriter
from lbq.train import PREEMPTED_EXIT_CODE, NonFiniteError, train_and_evaluate
from lbq.validate import ConfigError
from lbq.workdir import PreemptionWatcher


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

    # Only an interrupted first save: also no checkpoint to resume, also refused.
    only_partial = str(tmp_path / "partial")
    os.makedirs(os.path.join(only_partial, "checkpoints", "1.orbax-checkpoint-tmp-5", "state"))
    shutil.copy(os.path.join(source, "config.json"), only_partial)
    with pytest.raises(CheckpointError, match="only interrupted saves"):
        train_and_evaluate(config, only_partial)


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
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
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
        signal.raise_signal(signal.SIGTERM)
        assert watcher.should_stop(sync=True)
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM still waits for the checkpoint
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C after a request: stop at once
    assert {sig: signal.getsignal(sig) for sig in before} == before


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


def test_nonfinite_skip_leaves_parameters_unchanged(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(steps=3)
    config.schedule.lr = 1e30
    config.on_nonfinite = "skip"
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1
    result = train_and_evaluate(config, workdir)
    assert result.status == "completed" and result.step == 3
    assert [r["finite"] for r in read_metrics(workdir, "train")] == [1.0, 0.0, 0.0]

    by_step = {s: load_variables(os.path.join(workdir, "checkpoints", str(s))) for s in (1, 2, 3)}
    assert_same_variables(by_step[1], by_step[2])
    assert_same_variables(by_step[1], by_step[3])
    # Step 1 itself was applied: the huge rate moved the weights far from any initialisation.
    assert max(np.abs(x).max() for x in leaves(by_step[1]["student"]["params"])) > 1e20

    # Resumed under 'stop', earlier skipped steps are not reported again; the next bad one is.
    config.on_nonfinite = "stop"
    config.stages[0].steps = 5
    config.on_config_change = "continue"
    with pytest.raises(NonFiniteError, match="at step 4; the last good checkpoint is step 3 "):
        train_and_evaluate(config, workdir)


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
