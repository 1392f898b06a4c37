"""Helpers for tests that run the real trainer on tiny configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from configs import default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """The trainer's real networks, optimizer, state and jitted steps on random 16x16 data."""

    def __init__(self, config, batch: int = 8, size: int = 16, stage_steps: int = 100):
        import jax
        import jax.numpy as jnp

        from lbq import train
        from lbq.data import DatasetInfo
        from lbq.schedules import build_stages
        from lbq.steps import LossWeights, make_eval_step, make_train_step

        self.config = config
        self.info = DatasetInfo("random", 10, (size, size, 3), 1000, 100, (127.0,) * 3, (64.0,) * 3)
        self.networks = train.build_networks(config, self.info)
        self.optimizer = train.build_optimizer(config, self.networks)
        mesh = train.data_mesh(1)
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state = train.init_state(
            config, self.networks, self.optimizer, self.info, self.sharding
        )
        stage_cfg = [default.stage("s", steps=stage_steps)]
        lr = {n.name: 0.1 for n in self.networks if n.trainable}
        self.stage = build_stages(
            stage_cfg,
            defaults={
                "w_bits": config.quant.w_bits,
                "a_bits": config.quant.a_bits,
                "lr": lr,
                "lr_schedule": "constant",
                "lr_boundaries": (),
                "lr_decay": 0.1,
                "warmup_epochs": 0.0,
            },
            networks=list(lr),
            steps_per_epoch=10,
        )[0]
        opt_state = train.fresh_optimizer_state(
            config, self.optimizer, self.state, self.networks, self.stage, self.sharding
        )
        self.state = self.state.replace(opt_state=opt_state)
        self.bits = train.stage_bits(self.stage, self.networks)
        self.lr = {k: jnp.float32(v) for k, v in lr.items()}
        weights = LossWeights.from_config(config.distill)
        self.train_step = jax.jit(
            make_train_step(self.networks, self.optimizer, weights, self.info.mean, self.info.std)
        )
        self.eval_step = jax.jit(make_eval_step(self.networks, self.info.mean, self.info.std))
        rng = np.random.default_rng(0)
        self.batch = {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, (batch,), dtype=np.int32),
        }

    def step(self, state=None, batch=None):
        state = self.state if state is None else state
        return self.train_step(state, batch or self.batch, {"lr": self.lr, "bits": self.bits})
