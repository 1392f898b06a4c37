"""Helpers for tests that run the real trainer on tiny configs."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from lbq.configs import default
from lbq.stages import lay_out
from lbq.trainer import host_stage_bits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA:CPU's LLVM optimisation off: it halves the compile time that dominates the tiny runs of the
# tests. tests/conftest.py sets it for the test processes and the subprocesses that inherit their
# XLA_FLAGS; runs that are compared always share their flags (the golden runs pin their own,
# GOLDEN_XLA_FLAGS; the 1-against-8-devices test runs at XLA's default optimisation).
FAST_XLA = "--xla_backend_optimization_level=0"


def load_benchmark(name: str):
    """The module of benchmarks/NAME.py, imported by its path (benchmarks/ is not a package) and
    registered in ``sys.modules`` under NAME, as the accelerator suite's scripts import each
    other by that name."""
    path = os.path.join(REPO, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def xla_env(*flags: str) -> dict[str, str]:
    """``{'XLA_FLAGS': ...}`` for a subprocess: `FAST_XLA` and ``flags``."""
    return {"XLA_FLAGS": " ".join((FAST_XLA, *flags))}


def tiny_config(steps: int = 3, **stage_bits):
    """The default config's tiny variant with one stage of ``steps`` steps."""
    c = default.get_config("tiny")
    c.stages = [default.stage("main", steps=steps, **stage_bits)]
    return c


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if kind is None or r["kind"] == kind]


def run_main(args: list[str], env: dict | None = None, timeout: int = 300):
    """Runs ``python -m lbq.main`` in a subprocess from the repo root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lbq.main", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


class StepRig:
    """The trainer's real networks, optimizer, state and jitted steps (built by
    `lbq.trainer.build_trainer`) on random 16x16 data, with one constant-rate stage."""

    def __init__(self, config, batch: int = 8, size: int = 16, stage_steps: int = 100):
        import jax.numpy as jnp

        from lbq.data import DatasetInfo
        from lbq.mesh import data_mesh
        from lbq.plan import parse_config
        from lbq.trainer import build_trainer

        config = config.copy_and_resolve_references()
        config.stages = [default.stage("s", steps=stage_steps, lr_schedule="constant")]
        config.schedule.teacher_lr = config.schedule.lr = 0.1
        self.config = config
        self.plan = parse_config(config)
        self.info = DatasetInfo("random", 10, (size, size, 3), 1000, 100, (127.0,) * 3, (64.0,) * 3)
        self.trainer = build_trainer(self.plan, self.info, data_mesh(1), donate=False)
        self.networks = self.trainer.networks
        self.stage = lay_out(self.plan.stages, steps_per_epoch=10)[0]
        self.state = self.trainer.start_stage(self.trainer.init_state(), self.stage)
        self.bits = host_stage_bits(self.stage, self.networks)
        self.lr = {k: jnp.float32(v) for k, v in self.stage.lr.items()}
        self.train_step = self.trainer.train_step
        self.eval_step = self.trainer.eval_step
        rng = np.random.default_rng(0)
        self.batch = {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch,), dtype=np.int32),
        }

    def step(self, state=None, batch=None):
        state = self.state if state is None else state
        return self.train_step(state, batch or self.batch, {"lr": self.lr, "bits": self.bits})


def cifar_jpeg_source() -> pathlib.Path | None:
    """Real CIFAR-10 JPEGs: a folder with train/ and test/ (LBQ_CIFAR10_JPEG, or an unpacked
    DATA/ folder), or the shared tarball; None when none is here. An explicit LBQ_CIFAR10_JPEG
    is the only candidate, so LBQ_CIFAR10_JPEG=none turns the real-image tests off."""
    env = os.environ.get("LBQ_CIFAR10_JPEG")
    repo = pathlib.Path(REPO)
    candidates = (
        [pathlib.Path(env)]
        if env
        else [
            repo / "DATA" / "cifar10-jpeg",
            repo / "DATA",
            repo.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
        ]
    )
    for path in candidates:
        if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
            return path
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return path
    return None
