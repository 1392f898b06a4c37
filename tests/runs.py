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
