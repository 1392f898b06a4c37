"""lbq.checkpoint on its own: real Orbax checkpoints of a small train-state pytree in a tmp dir.

The trainer-level cases (every kind of damage during a real resume, interrupted saves, no
readable checkpoint, another device count) are in test_reliability.py.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbq.checkpoint import (
    UNREADABLE_DIR,
    CheckpointError,
    CheckpointMismatch,
    Checkpoints,
    checksums,
    load_saved_variables,
    load_variables,
    partial_saves,
)

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it


@flax.struct.dataclass
class State:
    """The fields of the trainer's state that checkpoint.py relies on."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def make_state(
    step: int, seed: int | None = None, *, width: int = 4, optimizer: str = "trace"
) -> State:
    """A state whose every array depends on ``seed`` (default: the step); ``width`` and
    ``optimizer`` change its structure, as another model or another optimizer would."""
    rng = np.random.default_rng(step if seed is None else seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    params = {
        "student": {"conv": {"kernel": normal(3, 3, 2, width)}, "bn": {"scale": normal(width)}},
        "teacher": {"dense": {"kernel": normal(4, 3), "bias": normal(3)}},
    }
    batch_stats = {"student": {"bn": {"mean": normal(width), "var": normal(width)}}}
    transform = optax.trace(0.9) if optimizer == "trace" else optax.scale_by_adam()
    opt_state = {
        "key": jnp.asarray(rng.integers(0, 2**32, 2), jnp.uint32),
        "inner": jax.tree.map(lambda x: x + 1.0, transform.init(params)),
    }
    return State(jnp.int32(step), params, batch_stats, opt_state)


def abstract(state: State) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def assert_same_tree(a: Any, b: Any) -> None:
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(a)[0], strict=True)
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(b)[0], strict=True)
    assert paths_a == paths_b
    for path, x, y in zip(paths_a, leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def variables_of(state: State) -> dict:
    return {
        name: {"params": state.params[name], "batch_stats": state.batch_stats.get(name, {})}
        for name in state.params
    }


def save_steps(workdir: str, steps, keep: int = 0, seeds=None) -> None:
    checkpoints = Checkpoints(workdir, keep)
    for i, step in enumerate(steps):
        seed = None if seeds is None else seeds[i]
        checkpoints.save(make_state(step, seed), {"stage_name": f"stage{step}", "epoch": step})
    checkpoints.close()  # waits for the asynchronous saves


def truncate_array_files(step_dir: str) -> None:
    """Cuts every array data file of a step in half, as a disk that filled up would."""
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    assert files
    for path in files:
        os.truncate(path, os.path.getsize(path) // 2)


def test_restore_reads_the_newest_step_and_its_record(tmp_path):
    workdir = str(tmp_path / "run")
    save_steps(workdir, [1, 3, 2])  # saved out of order: the newest is the highest step
    checkpoints = Checkpoints(workdir, keep=0)
    assert checkpoints.steps() == [1, 2, 3]
    restored = checkpoints.restore(abstract(make_state(0)))
    checkpoints.close()
    assert restored.step == 3 and restored.optimizer_restored and restored.failures == ()
    assert isinstance(restored.state, State)
    assert_same_tree(restored.state, make_state(3))
    # The record as saved, with the step and without the checksums.
    assert restored.meta == {"stage_name": "stage3", "epoch": 3, "step": 3}


def test_a_step_already_saved_is_not_overwritten(tmp_path):
    workdir = str(tmp_path / "run")
    save_steps(workdir, [2, 2], seeds=[0, 1])
    checkpoints = Checkpoints(workdir, keep=0)
    restored = checkpoints.restore(abstract(make_state(0)))
    checkpoints.close()
    assert_same_tree(restored.state, make_state(2, seed=0))


def test_keep_prunes_all_but_the_newest_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    save_steps(workdir, [1, 2, 3, 4], keep=2)
    checkpoints = Checkpoints(workdir, keep=2)
    assert checkpoints.steps() == [3, 4]
    checkpoints.close()
    on_disk = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))
    assert on_disk == [3, 4]


def test_a_run_without_checkpoints_restores_none_and_writes_nothing(tmp_path):
    checkpoints = Checkpoints(str(tmp_path / "new"), keep=0, create=False)
    assert checkpoints.restore(abstract(make_state(0))) is None
    checkpoints.close()
    assert not os.path.exists(tmp_path / "new")


def test_damaged_latest_falls_back_to_the_previous_and_is_set_aside(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    folder = os.path.join(workdir, "checkpoints")
    save_steps(workdir, [1, 2, 3])
    truncate_array_files(os.path.join(folder, "3"))

    # load_variables only reads: it falls back without moving anything.
    assert_same_tree(load_variables(workdir), variables_of(make_state(2)))
    assert os.path.isdir(os.path.join(folder, "3"))

    checkpoints = Checkpoints(workdir, keep=0)
    with caplog.at_level(logging.WARNING, logger="lbq"):
        restored = checkpoints.restore(abstract(make_state(0)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint at step 3" in w and "unreadable" in w for w in warnings), warnings
    assert any("resuming from step 2" in w for w in warnings), warnings
    assert restored.step == 2 and [step for step, _ in restored.failures] == [3]
    assert_same_tree(restored.state, make_state(2))
    assert checkpoints.steps() == [1, 2, 3]  # restore changes nothing on disk
    checkpoints.set_aside()
    assert checkpoints.steps() == [1, 2]
    assert os.path.isdir(os.path.join(workdir, UNREADABLE_DIR, "3"))

    # Step 3 can be saved again; damaged again, it is set aside next to the first copy.
    checkpoints.save(make_state(3), {})
    checkpoints.wait()
    assert checkpoints.steps() == [1, 2, 3]
    truncate_array_files(os.path.join(folder, "3"))
    assert checkpoints.restore(abstract(make_state(0))).step == 2
    checkpoints.set_aside()
    checkpoints.close()
    assert sorted(os.listdir(os.path.join(workdir, UNREADABLE_DIR))) == ["3", "3.1"]


def test_another_structure_is_refused_or_restored_without_the_optimizer(tmp_path):
    workdir = str(tmp_path / "run")
    save_steps(workdir, [1, 2])
    checkpoints = Checkpoints(workdir, keep=0)
    with pytest.raises(CheckpointMismatch, match="another model") as wider:
        checkpoints.restore(abstract(make_state(0, width=8)))
    assert (wider.value.step, wider.value.part) == (2, "weights")
    assert "params.student.bn.scale: (4,) in the checkpoint, (8,) in this run" in wider.value.where

    other_optimizer = abstract(make_state(0, optimizer="adam"))
    with pytest.raises(CheckpointMismatch, match="another optimizer state") as adam:
        checkpoints.restore(other_optimizer)
    assert adam.value.part == "optimizer"
    restored = checkpoints.restore(other_optimizer, allow_new_optimizer=True)
    checkpoints.close()
    assert restored.step == 2 and not restored.optimizer_restored
    saved = make_state(2)
    assert_same_tree(restored.state["params"], saved.params)
    assert_same_tree(restored.state["batch_stats"], saved.batch_stats)
    assert checkpoints.steps() == [1, 2]  # a mismatch is not damage: nothing set aside


def test_load_variables_from_a_workdir_its_checkpoints_folder_or_one_step(tmp_path):
    workdir = str(tmp_path / "run")
    save_steps(workdir, [1, 2])
    newest = variables_of(make_state(2))
    assert sorted(newest["teacher"]) == ["batch_stats", "params"]
    assert_same_tree(load_variables(workdir), newest)
    assert_same_tree(load_variables(os.path.join(workdir, "checkpoints")), newest)
    one_step = load_variables(os.path.join(workdir, "checkpoints", "1"))
    assert_same_tree(one_step, variables_of(make_state(1)))


def test_a_read_during_the_first_save_waits_for_its_commit(tmp_path):
    """A reader that finds only a save in progress (Orbax's temporary folder) reads the step once
    it is committed, however the two happen between the reader's listings; "no checkpoint" is
    for a folder that holds none."""
    workdir = str(tmp_path / "run")
    save_steps(workdir, [3])
    directory = os.path.join(workdir, "checkpoints")
    committed = os.path.join(directory, "3")
    in_progress = os.path.join(directory, "3.orbax-checkpoint-tmp-1")
    os.rename(committed, in_progress)  # as Orbax leaves it until the save commits
    commit = threading.Timer(0.5, os.rename, (in_progress, committed))
    commit.start()
    try:
        step, variables = load_saved_variables(workdir)
    finally:
        commit.join()
    assert step == 3
    assert_same_tree(variables, variables_of(make_state(3)))


def test_load_variables_refuses_a_folder_that_is_not_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run\n")
    with pytest.raises(CheckpointError, match=r"^no checkpoint found in .*empty$"):
        load_variables(str(empty))
    with pytest.raises(CheckpointError, match=r"^checkpoint folder .*missing does not exist$"):
        load_variables(str(tmp_path / "missing"))


def test_checksums_name_every_array_and_change_with_one_element():
    state = make_state(1)
    before = checksums(state)
    assert "params.student.conv.kernel" in before and "opt_state.key" in before
    assert len(before) == len(jax.tree.leaves(state))
    assert checksums(make_state(1)) == before
    params = jax.tree.map(lambda x: x, state.params)  # new dicts, same arrays
    params["teacher"]["dense"]["kernel"] = params["teacher"]["dense"]["kernel"].at[0, 0].add(1e-6)
    changed = state.replace(params=params)
    after = checksums(changed)
    assert [p for p in before if before[p] != after[p]] == ["params.teacher.dense.kernel"]


def test_partial_saves_lists_only_interrupted_step_folders(tmp_path):
    assert partial_saves(str(tmp_path / "missing")) == {}
    for name in ("3.orbax-checkpoint-tmp-1700000000", "4", "notes.orbax-checkpoint-tmp-1"):
        (tmp_path / name).mkdir()
    assert partial_saves(str(tmp_path)) == {3: "3.orbax-checkpoint-tmp-1700000000"}
