"""lbq.plot: the curves drawn from a real run's metrics.jsonl, the PNG it writes, its errors.

One real two-stage tiny run (the trainer on the embedded digits data, a train record at every
step) gives the file; a second run's file, with a teacher, a non-finite value and a line cut
short, is written through lbq.metrics.MetricsWriter as the trainer writes it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from runs import REPO, read_metrics

from lbq.configs import default
from lbq.metrics import MetricsWriter
from lbq.plot import Curves, main, plot_runs, read_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PANEL_METRICS = (("train", "loss"), ("train", "accuracy"), ("eval", "top1"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> str:
    """A W32A32 -> W2A2 tiny run, 2 steps per stage, logged at every step."""
    from lbq.train import train_and_evaluate

    config = default.get_config("tiny")
    config.stages = [
        default.stage("w32a32", w_bits=32, a_bits=32, steps=2),
        default.stage("w2a2", w_bits=2, a_bits=2, steps=2),
    ]
    config.log_every_steps = 1
    workdir = str(tmp_path_factory.mktemp("plot") / "two_stage")
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture
def kd_run(tmp_path) -> str:
    """A distillation run's file, written by MetricsWriter: 3 stages of 2 steps, a NaN loss at
    step 3, and a last line cut short as by a kill in mid-write."""
    workdir = str(tmp_path / "kd")
    writer = MetricsWriter(workdir)
    for step, stage, name in [(1, 0, "w32a32"), (2, 0, "w32a32"), (3, 1, "w2a2"), (4, 1, "w2a2")]:
        values = {"loss": 4.0 / step, "stage": stage, "stage_name": name}
        for network, offset in (("student", 0.0), ("teacher", 0.5)):
            values[f"{network}/loss"] = float("nan") if step == 3 else 2.0 / step + offset
            values[f"{network}/accuracy"] = 0.1 * step + offset / 10
        writer.write(step, "train", values)
        if step % 2 == 0:
            evals = {"student/top1": 0.2 * step, "teacher/top1": 0.25 * step}
            writer.write(step, "eval", {**evals, "stage_name": name})
    writer.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "kind": "train", "stud')
    return workdir


def _line(ax, label: str):
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


def _stage_lines(ax) -> list[tuple[float, str, str]]:
    return [
        (float(line.get_xdata()[0]), line.get_gid(), line.get_color())
        for line in ax.get_lines()
        if (line.get_gid() or "").startswith("stage:")
    ]


@pytest.mark.slow
def test_curves_hold_the_values_of_a_real_run(real_run):
    records = read_metrics(real_run)  # read independently of lbq.plot
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    fig = plot_runs([Curves("two_stage", read_records(real_run))])
    assert len(fig.axes) == 3
    for ax, (kind, metric) in zip(fig.axes, PANEL_METRICS, strict=True):
        line = _line(ax, "two_stage: student")
        expected = [(r["step"], r[f"student/{metric}"]) for r in records if r["kind"] == kind]
        assert list(line.get_xdata()) == [step for step, _ in expected]
        assert list(line.get_ydata()) == [value for _, value in expected]
        # One stage boundary, after the 2 steps of the first stage, on every panel.
        assert _stage_lines(ax) == [(2.0, "stage:w2a2", "C0")]
    texts = {(t.get_position()[0], t.get_text()) for t in fig.axes[0].texts}
    assert texts == {(0, "w32a32"), (2, "w2a2")}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["two_stage: student"]


@pytest.mark.slow
def test_runs_side_by_side_with_a_teacher_and_a_gap(real_run, kd_run):
    fig = plot_runs(
        [Curves("two_stage", read_records(real_run)), Curves("kd", read_records(kd_run))]
    )
    loss, accuracy, top1 = fig.axes
    teacher = _line(loss, "kd: teacher")
    assert teacher.get_linestyle() == "--" and _line(loss, "kd: student").get_linestyle() == "-"
    assert list(teacher.get_xdata()) == [1, 2, 3, 4]  # the line cut short is left out
    y = list(teacher.get_ydata())
    assert y[:2] == [2.5, 1.5] and math.isnan(y[2]) and y[3] == 1.0  # "nan" in the file
    assert list(_line(top1, "kd: teacher").get_ydata()) == [0.5, 1.0]
    assert _line(loss, "kd: student").get_color() != _line(loss, "two_stage: student").get_color()
    # Both runs start w2a2 at step 2: one grey line; each panel has it once.
    for ax in fig.axes:
        assert _stage_lines(ax) == [(2.0, "stage:w2a2", "0.45")]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["two_stage: student", "kd: student", "kd: teacher"]


@pytest.mark.slow
def test_command_writes_a_png_of_the_curves(real_run, tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lbq.plot", real_run, f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lbq: wrote {out} (1 run(s), steps 0-4)"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1080, 1140)  # 9 x 9.5 inches at 120 dpi
    assert 20_000 < len(data) < 2_000_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out))[..., :3]
    ink = (pixels.mean(axis=-1) < 0.9).mean()  # share of pixels that are not near-white
    assert 0.01 < ink < 0.5, ink
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.1
    assert blue.sum() > 200  # the run's curves in its colour, C0


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lbq: error: "), err
    return err.strip()


def test_errors_are_one_line(capsys, tmp_path, kd_run):
    missing = tmp_path / "nope"
    out = f"--out={tmp_path / 'c.png'}"
    assert _error(capsys, [str(missing), out]) == f"lbq: error: workdir '{missing}' is not a folder"
    empty_dir = tmp_path / "fresh"
    empty_dir.mkdir()
    assert _error(capsys, [str(empty_dir), out]) == (
        f"lbq: error: no metrics.jsonl in '{empty_dir}': no run has logged there yet"
    )
    (empty_dir / "metrics.jsonl").write_text("")
    assert "holds no train or eval record yet" in _error(capsys, [str(empty_dir), out])
    (empty_dir / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\nnot json\n')
    assert "metrics.jsonl' line 2 is not a metrics record: not json" in _error(
        capsys, [str(empty_dir), out]
    )
    assert not (tmp_path / "c.png").exists()
    assert _error(capsys, [kd_run, f"--out={tmp_path / 'no_folder' / 'c.png'}"]) == (
        f"lbq: error: cannot write '{tmp_path / 'no_folder' / 'c.png'}': folder "
        f"'{tmp_path / 'no_folder'}' does not exist"
    )
    (tmp_path / "taken.png").mkdir()  # the output path is a folder: the write itself fails
    assert _error(capsys, [kd_run, f"--out={tmp_path / 'taken.png'}"]) == (
        f"lbq: error: cannot write '{tmp_path / 'taken.png'}': Is a directory"
    )
    assert "needs an image extension, one of" in _error(capsys, [kd_run, "--out=curves.txt"])


def test_read_records_leaves_out_a_line_cut_short(kd_run):
    records = read_records(kd_run)
    with open(os.path.join(kd_run, "metrics.jsonl")) as f:
        complete = [json.loads(line) for line in f if line.endswith("\n")]
    assert records == complete
