"""Runs that must not fail after their training, and continued runs whose schedule moves.

Every check that can run before the first step does (an empty eval split); a failure that can
only show up after training (an eval image that cannot be decoded) saves the training first, and
the rerun evaluates without training again. A config change accepted by
``on_config_change=continue`` that moves the learning rate at the resumed step is named with the
rate before and after.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from runs import read_metrics, tiny_config

import lbq.data as data
from lbq import evaluate
from lbq.configs import default
from lbq.data import folder
from lbq.data.digits import split_arrays
from lbq.resume import rate_changes, recorded_stages
from lbq.stages import Stage
from lbq.train import train_and_evaluate

pytestmark = pytest.mark.slow  # the full tier: `python -m pytest -m "not slow"` skips it

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pytest.importorskip("tensorflow_datasets")

TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 2


def _write_digits(tmp_path, name: str, broken_test_image: bool) -> str:
    """A two-class TFDS dataset of real digits (16 train, 4 test images), written by the builder
    that lbq.data.prepare uses; with ``broken_test_image`` one more test record holds bytes that
    are no image (as another tool could have written it: prepare itself refuses such files)."""
    x, y = split_arrays("train")
    root = tmp_path / f"{name}_src"
    files: dict[str, list[str]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        for split, chosen in (
            ("train", rows[:TRAIN_PER_CLASS]),
            ("test", rows[TRAIN_PER_CLASS : TRAIN_PER_CLASS + TEST_PER_CLASS]),
        ):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(x[i]).save(root / split / str(label) / f"{i}.png")
                files[split].append(f"{split}/{label}/{i}.png")
                labels[split].append(label)
    if broken_test_image:
        (root / "test" / "1" / "broken.png").write_bytes(b"not an image")
        files["test"].append("test/1/broken.png")
        labels["test"].append(1)
    splits = {s: [(f, n, False) for f, n in zip(files[s], labels[s], strict=True)] for s in files}
    out = str(tmp_path / "tfds")
    target = os.path.join(out, "late_digits")
    if os.path.exists(target):
        import shutil

        shutil.rmtree(target)
    folder.write_tfds("late_digits", str(root), out, ["0", "1"], splits, {}, print)
    return out


def _config(data_dir: str, eval_split: str = "test", steps: int = 2):
    c = tiny_config(steps)
    c.data.name, c.data.data_dir = "late_digits", data_dir
    c.data.eval_split = eval_split
    c.batch_size = c.eval_batch_size = 8
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    return c


def test_an_empty_eval_split_is_refused_before_anything_is_written(tmp_path, capsys):
    data_dir = _write_digits(tmp_path, "good", broken_test_image=False)
    workdir = tmp_path / "run"
    with pytest.raises(data.DataError, match=r"eval split 'test\[4:\]'.*holds no images"):
        train_and_evaluate(_config(data_dir, "test[4:]"), str(workdir))
    assert not workdir.exists()
    # lbq.evaluate on a trained run: another empty split is one line, exit status 1.
    result = train_and_evaluate(_config(data_dir), str(workdir))
    assert result.status == "completed"
    capsys.readouterr()
    assert evaluate.main([f"--workdir={workdir}", "--split=test[2:2]"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lbq: error: eval split 'test[2:2]'") and "holds no images" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_failed_evaluation_keeps_the_training_and_the_rerun_only_evaluates(tmp_path):
    data_dir = _write_digits(tmp_path, "broken", broken_test_image=True)
    workdir = str(tmp_path / "run")
    broken = r"cannot decode record \d+ of late_digits\[test\]"
    with pytest.raises(data.ImageReadError, match=broken):
        train_and_evaluate(_config(data_dir), workdir)
    # The stage's two steps are saved although its evaluation failed.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2]
    # The eval split repaired in place: the rerun evaluates the saved step, trains nothing.
    _write_digits(tmp_path, "repaired", broken_test_image=False)
    result = train_and_evaluate(_config(data_dir), workdir)
    assert result.status == "completed" and result.step == 2
    assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2]
    evals = read_metrics(workdir, "eval")
    assert [r["step"] for r in evals] == [2]
    assert result.final["student"]["top1"] == evals[0]["student/top1"]
    assert [r["name"] for r in result.stages] == ["main"]


def test_reproduce_refuses_an_outdir_it_cannot_write_before_any_run_trains(tmp_path):
    from lbq.experiments import reproduce

    (tmp_path / "results.md").mkdir()  # the table is first written after the first run
    args = ["--preset=tiny", f"--outdir={tmp_path}", "--methods=fp", "--bits=2", "--seeds=0"]
    with pytest.raises(SystemExit, match=r"cannot write .*results\.md: it is a folder"):
        reproduce.main(args)
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


# ----------------------------------------------------------------------------- schedules


def _stage(steps: int, schedule: str = "step", lr: float = 0.1, index: int = 0, start: int = 0):
    return Stage(index, "main", 2, 2, {}, start, steps, {"student": lr}, schedule)


def test_rate_changes_name_the_rate_before_and_after():
    # A finished 10-step stage lengthened to 20: it ended at 0.001, resumes at 0.01.
    assert rate_changes([_stage(10)], [_stage(20)], 10) == [
        "stage 'main' at step 10: student 0.001 -> 0.01"
    ]
    # Inside a stage: the recorded schedule's rate at the same step is compared.
    assert rate_changes([_stage(100)], [_stage(200)], 50) == [
        "stage 'main' at step 50: student 0.01 -> 0.1"
    ]
    assert rate_changes([_stage(100)], [_stage(100, lr=0.05)], 10) == [
        "stage 'main' at step 10: student 0.1 -> 0.05"
    ]
    cosine = rate_changes([_stage(10, "cosine")], [_stage(20, "cosine")], 10)
    assert len(cosine) == 1 and cosine[0].endswith("-> 0.05")
    # Changes that leave the rate at the resumed step alone.
    assert rate_changes([_stage(10, "constant")], [_stage(20, "constant")], 10) == []
    assert rate_changes([_stage(100)], [_stage(100)], 50) == []
    assert rate_changes([_stage(100)], [_stage(110)], 20) == []  # 0.1 under both
    # A stage the recorded run did not have starts its own schedule.
    added = [_stage(10), Stage(1, "next", 2, 2, {}, 10, 10, {"student": 0.1})]
    assert rate_changes([_stage(10)], added, 10) == []
    assert rate_changes([_stage(10)], [_stage(20)], 0) == []


def test_recorded_stages_reads_a_config_json_and_refuses_none():
    import json

    c = tiny_config(10)
    record = json.loads(c.to_json_best_effort())
    stages = recorded_stages(record, num_train=1437)
    assert [(s.name, s.start_step, s.num_steps) for s in stages] == [("main", 0, 10)]
    assert recorded_stages({"stages": "not a list of stages"}, 1437) is None


def test_lengthening_a_finished_stage_warns_naming_both_rates(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    c = tiny_config(10)
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    assert train_and_evaluate(c, workdir).status == "completed"
    lr = [r["student/lr"] for r in read_metrics(workdir, "train")]
    assert lr[-1] == pytest.approx(0.001)
    c.stages = [default.stage("main", steps=20)]
    c.on_config_change = "continue"
    with caplog.at_level(logging.WARNING, logger="lbq"):
        result = train_and_evaluate(c, workdir, stop_at_step=11)
    assert result.step == 11
    moved = [r.getMessage() for r in caplog.records if "moves the learning rate" in r.getMessage()]
    assert len(moved) == 1 and "stage 'main' at step 10: student 0.001 -> 0.01" in moved[0]
    lr = [r["student/lr"] for r in read_metrics(workdir, "train")]
    assert lr[-1] == pytest.approx(0.01)
