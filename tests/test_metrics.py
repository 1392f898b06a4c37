"""lbq.metrics on its own: JSON lines, TensorBoard events read back from disk, the progress line,
and mean_of.

The trainer-level resume case (a writer that resumes at the last checkpoint) is in
test_reliability.py.
"""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from lbq import metrics
from lbq.metrics import MetricsWriter, Progress, drop_records_after, mean_of


def read_records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_events(workdir) -> list[Event]:
    """Every event of the TensorBoard files, in file order.

    The files are TFRecords: [length u64][crc u32][data][crc u32], data an `Event` proto.
    """
    events = []
    files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    for path in sorted(files, key=os.path.getmtime):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
    return events


def scalars(events: list[Event]) -> list[tuple[str, int, float]]:
    return [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value]


def test_writer_appends_one_plain_json_record_per_call(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, "train", {"loss": np.float32(0.5), "lr": 0.1, "stage_name": "w2a2"})
    writer.write(2, "eval", {"top1": np.float64(0.25), "loss": float("nan")})
    writer.close()
    records = read_records(tmp_path)
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "eval")]
    assert records[0]["loss"] == 0.5 and records[0]["lr"] == 0.1
    assert records[0]["stage_name"] == "w2a2"
    assert records[1]["top1"] == 0.25
    assert records[1]["loss"] == "nan"  # JSON has no NaN; the value stays readable
    assert all(isinstance(r["time"], float) for r in records)


def test_writer_writes_numeric_values_as_tensorboard_scalars(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, "train", {"loss": np.float32(0.5), "stage_name": "w2a2"})
    writer.write(2, "train", {"loss": 0.25})
    writer.write(2, "eval", {"top1": 0.75, "count": 3})
    writer.close()
    assert scalars(read_events(tmp_path)) == [
        ("train/loss", 1, 0.5),
        ("train/loss", 2, 0.25),
        ("eval/top1", 2, 0.75),
        ("eval/count", 2, 3.0),
    ]


def test_resumed_writer_trims_the_records_and_purges_tensorboard_after_its_start(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    for step in range(1, 6):
        writer.write(step, "train", {"loss": step / 10})
    writer.close()

    resumed = MetricsWriter(str(tmp_path), start_step=3)
    resumed.write(4, "train", {"loss": 0.45})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_records(tmp_path)] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, 0.45),
    ]
    # TensorBoard hides the older events of steps >= a START session log's step.
    events = read_events(tmp_path)
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts[-1] == 4
    # Both invocations' events are kept, although they opened their files within one second
    # (tensorboardX names event files by the second; lbq adds the start step).
    steps = sorted(step for _, step, _ in scalars(events))
    assert steps == [1, 2, 3, 4, 4, 5], steps
    assert len(glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))) == 2


def test_drop_records_after_counts_what_it_drops_and_keeps_an_intact_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    assert drop_records_after(path, 3) == 0 and not os.path.exists(path)

    records = [{"step": s, "kind": k} for s in (1, 2, 3) for k in ("train", "eval")]
    lines = [json.dumps(r) + "\n" for r in records]
    with open(path, "w") as f:
        f.writelines(lines)
    inode = os.stat(path).st_ino
    assert drop_records_after(path, 3) == 0
    assert os.stat(path).st_ino == inode  # not rewritten

    with open(path, "a") as f:
        f.write(json.dumps({"step": 4, "kind": "eval"}) + "\n")
        f.write('{"step": 2, "kind": "tr')  # a line cut short by a hard kill
    assert drop_records_after(path, 2) == 4
    with open(path) as f:
        assert f.readlines() == lines[:4]


def test_writer_disabled_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "run"), enabled=False)
    writer.write(1, "train", {"loss": 0.5})
    writer.close()
    assert not os.path.exists(tmp_path / "run")


class FakeClock:
    """Stands in for lbq.metrics' `time` module, so that the ETA is known."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now


def test_progress_writes_bar_step_text_and_eta_to_the_current_stderr(monkeypatch):
    clock = FakeClock(1000.0)
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=clock.time))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)  # replaced after lbq.metrics was imported
    progress = Progress(total=100, start=10, enabled=True)
    clock.now += 30.0
    progress.update(25, "loss 1.000")  # 15 steps in 30 s: 75 left take 150 s
    clock.now += 3600.0
    progress.update(40, "loss 0.500")  # 30 steps in 3630 s: 60 left take 7260 s
    progress.close()
    assert stderr.getvalue() == (
        "[######..................] 25/100 loss 1.000 eta 0:02:30\n"
        "[#########...............] 40/100 loss 0.500 eta 2:01:00\n"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line(monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=clock.time))
    terminal = Terminal()
    progress = Progress(total=10, start=0, enabled=True, stream=terminal)
    clock.now = 5.0
    progress.update(5, "x")
    progress.close()
    assert terminal.getvalue() == "\r[############............] 5/10 x eta 0:00:05\033[K\n"


def test_progress_disabled_writes_nothing(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    progress = Progress(total=10, start=0, enabled=False)
    progress.update(5, "x")
    progress.close()
    assert stderr.getvalue() == ""


def test_mean_of_averages_each_key_over_the_records():
    rng = np.random.default_rng(0)
    losses = rng.normal(size=5).astype(np.float32)
    accuracies = rng.uniform(size=5).astype(np.float32)
    records = [
        {"loss": jnp.asarray(x), "top1": jnp.asarray(a)}
        for x, a in zip(losses, accuracies, strict=True)
    ]
    means = mean_of(records)
    assert sorted(means) == ["loss", "top1"]
    assert all(type(v) is float for v in means.values())
    assert means["loss"] == pytest.approx(np.mean(losses.astype(np.float64)), rel=1e-6)
    assert means["top1"] == pytest.approx(np.mean(accuracies.astype(np.float64)), rel=1e-6)
    assert mean_of([]) == {}


def test_clock_is_hours_minutes_seconds_rounded_down():
    from lbq.metrics import clock

    assert clock(0) == "0:00:00"
    assert clock(3725.9) == "1:02:05"  # 1 h, 2 min, 5.9 s
    assert clock(36_000 + 59) == "10:00:59"
    assert clock(-4.0) == "0:00:00"
