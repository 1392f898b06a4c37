"""Multi-host training, rehearsed with two CPU processes on localhost.

JAX's CPU client runs cross-process collectives over Gloo (the default of
jax_cpu_collectives_implementation in jax 0.10; the subprocesses also set it explicitly), so
two processes with one CPU device each form a 2-device mesh, as two hosts would. The training
processes start through `launch/local.sh --processes=2`, which sets LBQ_COORDINATOR_ADDRESS /
LBQ_NUM_PROCESSES / LBQ_PROCESS_ID for `lbq.mesh.maybe_initialize_distributed`.

XLA's LLVM optimisation is off in the subprocesses too (`runs.FAST_XLA`); runs that are compared
use the same flags.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from runs import FAST_XLA, REPO, read_metrics, run_main, tiny_config, xla_env

from lbq import data as lbq_data
from lbq.data import digits

pytestmark = [
    pytest.mark.skipif(
        sys.platform == "win32", reason="JAX multi-process CPU collectives need Linux or macOS"
    ),
    pytest.mark.slow,  # the full tier: `python -m pytest -m "not slow"` skips it
]

GLOO = {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}  # the default in jax 0.10; said explicitly
LOCAL = os.path.join(REPO, "launch", "local.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _saved_state(workdir: str, step: int) -> dict:
    """A checkpoint's train state as numpy arrays, whatever devices wrote it."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _rows(images: np.ndarray) -> list[int]:
    """Indices into the digits train split of un-augmented images."""
    train_images, _ = digits.split_arrays("train")
    lookup = {im.tobytes(): i for i, im in enumerate(train_images)}
    return [lookup[im.tobytes()] for im in images]


def test_each_host_reads_its_own_disjoint_rows():
    """Host p of 2 gets rows [16p, 16p+16) of every global batch of 32, and no row twice."""
    data = tiny_config().data
    data.augment = "none"  # so that images map back to dataset rows
    steps = 4

    def batches(index: int, count: int) -> list[dict]:
        iterator = lbq_data.train_iterator(
            data, seed=0, global_batch=32, process_index=index, process_count=count
        )
        return [next(iterator) for _ in range(steps)]

    one = batches(0, 1)
    hosts = [batches(0, 2), batches(1, 2)]
    for step in range(steps):
        parts = [hosts[p][step] for p in range(2)]
        assert all(part["image"].shape == (16, 32, 32, 3) for part in parts)
        rows = [_rows(part["image"]) for part in parts]
        assert not set(rows[0]) & set(rows[1])
        assert rows[0] + rows[1] == _rows(one[step]["image"])
        np.testing.assert_array_equal(
            np.concatenate([p["label"] for p in parts]), one[step]["label"]
        )
    # Eval: every example exactly once over both hosts, padding masked out.
    seen = []
    for index in range(2):
        for batch in lbq_data.eval_iterator(
            data, global_batch=128, process_index=index, process_count=2
        ):
            seen += [lbl for lbl, keep in zip(batch["label"], batch["mask"], strict=True) if keep]
    assert sorted(seen) == sorted(digits.split_arrays("test")[1].tolist())


WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    from jax.experimental import multihost_utils
    sys.path[:0] = [{repo!r}, {tests!r}]
    from runs import tiny_config
    from lbq import data as lbq_data
    from lbq.trainer import train_batches
    from lbq.trainer import build_trainer
    from lbq.mesh import maybe_initialize_distributed
    from lbq.plan import parse_config

    config = tiny_config()
    maybe_initialize_distributed(config.distributed)  # from LBQ_* set by the test
    index, count = jax.process_index(), jax.process_count()
    ids = multihost_utils.process_allgather(np.int32(index))
    plan = parse_config(config, num_devices=jax.device_count(), num_processes=count)
    trainer = build_trainer(plan, lbq_data.get_info(plan.data))
    batches = train_batches(trainer, start_step=2, on_device=False)
    batch = next(batches)  # the trainer's global batch of step 2, built from host parts
    local = np.concatenate([np.asarray(s.data) for s in batch["image"].addressable_shards])
    full = multihost_utils.process_allgather(batch["image"], tiled=True)
    labels = multihost_utils.process_allgather(batch["label"], tiled=True)
    np.savez({out!r} + f"/{{index}}.npz", local=local, full=full, labels=labels)
    print(json.dumps({{"index": index, "count": count, "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), "ids": ids.tolist()}}))
""")


def test_two_processes_assemble_the_same_global_batch(tmp_path):
    """jax.distributed over LBQ_* variables; each process feeds its half of the batch."""
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(repo=REPO, tests=os.path.join(REPO, "tests"), out=str(tmp_path))
    )
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "LBQ_DISTRIBUTED": "1",
                "LBQ_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "LBQ_NUM_PROCESSES": "2",
                "LBQ_PROCESS_ID": str(i),
                "XLA_FLAGS": FAST_XLA,
                **GLOO,
            },
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, report in enumerate(outputs):
        assert report == {
            "index": index,
            "count": 2,
            "devices": 2,
            "local_devices": 1,
            "ids": [0, 1],
        }
    iterator = lbq_data.train_iterator(tiny_config().data, seed=0, global_batch=32, start_step=2)
    expected = next(iterator)
    results = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result["full"], expected["image"])
        np.testing.assert_array_equal(result["labels"], expected["label"])
        np.testing.assert_array_equal(
            result["local"], expected["image"][16 * index : 16 * (index + 1)]
        )


def _local_sh(workdir: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", LOCAL, "--processes=2", f"--port={_free_port()}", *args, f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        env={
            **os.environ,
            **GLOO,
            "PYTHON": sys.executable,
            "XLA_FLAGS": FAST_XLA,
            "LBQ_STOP_GRACE": "10",
        },
    )
    log_1 = os.path.join(workdir, "logs", "process_1.log")
    detail = proc.stderr[-3000:] + (open(log_1).read()[-2000:] if os.path.exists(log_1) else "")
    assert proc.returncode == 0, detail
    return proc


def test_two_process_training_matches_one_process_with_two_devices(tmp_path):
    """`launch/local.sh --processes=2` against one process over two CPU devices.

    Both runs shard the global batch of 32 as 2 x 16 over a 2-device mesh, so every loss and
    eval metric agrees to float precision (BatchNorm statistics are reduced across the
    processes); process 0 alone writes metrics; the checkpoint that the two processes wrote
    together into a shared local folder holds the same state, and both processes resume from it.
    """
    args = ["--config=configs/default.py:tiny", "--config.log_every_steps=1"]
    multi = str(tmp_path / "multi")
    _local_sh(multi, *args)
    single = str(tmp_path / "single")
    ref = run_main(
        [*args, f"--workdir={single}"],
        timeout=300,
        env=xla_env("--xla_force_host_platform_device_count=2"),
    )
    assert ref.returncode == 0, ref.stderr[-3000:]

    train_m, train_s = read_metrics(multi, "train"), read_metrics(single, "train")
    assert [r["step"] for r in train_m] == [1, 2, 3]  # written once, by process 0
    np.testing.assert_allclose(
        [r["loss"] for r in train_m], [r["loss"] for r in train_s], rtol=1e-5
    )
    eval_m, eval_s = read_metrics(multi, "eval"), read_metrics(single, "eval")
    assert len(eval_m) == 1
    for key in ("student/loss", "student/top1", "student/top5"):
        np.testing.assert_allclose(eval_m[0][key], eval_s[0][key], rtol=1e-5)
    state_m, state_s = _saved_state(multi, 3), _saved_state(single, 3)
    flat_m, flat_s = (dict(jax_paths(s)) for s in (state_m, state_s))
    assert flat_m.keys() == flat_s.keys() and len(flat_m) > 10
    for key, value in flat_m.items():
        np.testing.assert_allclose(value, flat_s[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert "Rank 1 is connected" in open(os.path.join(multi, "logs", "process_1.log")).read()

    # Both processes restore the finished run from the shared checkpoint and stop at once.
    again = _local_sh(multi, *args)
    assert "resumed from step 3" in again.stderr
    assert "completed at step 3" in again.stdout
    assert len(read_metrics(multi, "train")) == 3


def jax_paths(tree) -> list[tuple[str, np.ndarray]]:
    """(path, leaf) pairs of a pytree, with printable paths."""
    import jax

    return [
        (jax.tree_util.keystr(path), np.asarray(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LBQ_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "LBQ_NUM_PROCESSES, LBQ_PROCESS_ID unset"),
        (
            {"LBQ_COORDINATOR_ADDRESS": "h:1", "LBQ_NUM_PROCESSES": "two", "LBQ_PROCESS_ID": "0"},
            "must be integers",
        ),
    ],
)
def test_incomplete_distributed_environment_is_a_config_error(monkeypatch, env, message):
    from lbq.mesh import maybe_initialize_distributed
    from lbq.validate import ConfigError

    for name in ("LBQ_COORDINATOR_ADDRESS", "LBQ_NUM_PROCESSES", "LBQ_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"LBQ_DISTRIBUTED": "1", **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        maybe_initialize_distributed(False)
