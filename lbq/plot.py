"""Training curves of lbq runs, drawn from their metrics files into one image.

    python -m lbq.plot WORKDIR [WORKDIR ...] --out=curves.png

Each WORKDIR's ``metrics.jsonl`` (written by `lbq.metrics.MetricsWriter`: one JSON record per
line, ``"kind": "train"`` at every logging interval and ``"kind": "eval"`` at every evaluation)
gives three panels against the global training step: the training loss and the training
accuracy of each network (averaged over the logging interval), and the evaluation top-1 of each
network. A vertical line marks where each stage of a run starts, labelled with the stage's name.
Colours tell the runs apart, line styles the networks (student solid, teacher dashed).

The drawing is matplotlib's (a `matplotlib.figure.Figure`, rendered by the Agg backend for PNG,
without pyplot); this module only reads the records and lays them out.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from lbq.io import jsonl_lines

METRICS_FILE = "metrics.jsonl"
# (record kind, metric suffix after "NETWORK/", y-axis label)
PANELS = (
    ("train", "loss", "training loss"),
    ("train", "accuracy", "training accuracy"),
    ("eval", "top1", "evaluation top-1"),
)
NETWORK_STYLES = {"student": "-", "teacher": "--"}
OTHER_NETWORK_STYLE = ":"
MARKERS_UP_TO = 60  # points per line; a longer line is drawn without markers


class PlotError(ValueError):
    """A workdir, metrics file or output path that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Curves:
    """One run's records, as read from ``WORKDIR/metrics.jsonl``.

    Attributes:
      label: the run's name in the legend.
      records: the JSON records in file order (dicts with at least "step" and "kind").
    """

    label: str
    records: list[dict]


def read_records(workdir: str) -> list[dict]:
    """The records of ``workdir``'s metrics file, in file order.

    A last line without its newline (a run killed while writing, or one still running) is
    left out, as `lbq.metrics.drop_records_after` does on resume.

    Raises:
      PlotError: ``workdir`` is not a folder; it has no metrics file; the file cannot be read,
        holds a line that is not a JSON record with an integer "step" and a "kind", or holds
        no train or eval record.
    """
    if not os.path.isdir(workdir):
        raise PlotError(f"workdir '{workdir}' is not a folder")
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        raise PlotError(f"no {METRICS_FILE} in '{workdir}': no run has logged there yet")
    try:
        lines = list(jsonl_lines(path))
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(f"cannot read '{path}': {error}") from None
    records = []
    for number, line, record in lines:
        if not line.strip() or not line.endswith("\n"):
            continue  # blank, or the last line cut short by a kill
        valid = isinstance(record, dict) and isinstance(record.get("step"), int)
        if not (valid and isinstance(record.get("kind"), str)):
            raise PlotError(f"'{path}' line {number} is not a metrics record: {line.strip()[:60]}")
        records.append(record)
    if not any(r["kind"] in ("train", "eval") for r in records):
        raise PlotError(f"'{path}' holds no train or eval record yet")
    return records


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each workdir's last folder name, or the paths as given where those names repeat."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def network_names(records: Sequence[dict], kind: str, metric: str) -> list[str]:
    """The networks with a ``NETWORK/metric`` value in the records of ``kind``, student first.

    A train record of an older file with only a total ``loss`` gives the name "total".
    """
    of_kind = [r for r in records if r["kind"] == kind]
    names = {key.split("/")[0] for r in of_kind for key in r if key.endswith(f"/{metric}")}
    if not names and any(metric in r for r in of_kind):
        return ["total"]
    return sorted(names, key=lambda name: (name != "student", name != "teacher", name))


def series(
    records: Sequence[dict], kind: str, metric: str, network: str
) -> tuple[list[int], list[float]]:
    """The steps and values of one network's metric over the records of ``kind``, by step.

    Non-finite values (stored as "nan"/"inf" strings by MetricsWriter) become float NaN/inf,
    which matplotlib leaves as gaps.
    """
    key = metric if network == "total" else f"{network}/{metric}"
    points = [(r["step"], _number(r[key])) for r in records if r["kind"] == kind and key in r]
    points.sort(key=lambda point: point[0])
    return [step for step, _ in points], [value for _, value in points]


def stage_starts(records: Sequence[dict]) -> list[tuple[int, str]]:
    """(first step, name) of each stage in the train records, in order.

    The trainer logs a train record at the last step of every stage, so a stage starts at the
    step of the previous stage's last record; the first stage starts at step 0. Records
    without "stage_name" (older files) give no stages.
    """
    train = sorted(
        (r for r in records if r["kind"] == "train" and "stage_name" in r), key=lambda r: r["step"]
    )
    starts: list[tuple[int, str]] = []
    previous, last_step = None, 0
    for record in train:
        stage = (record.get("stage"), record["stage_name"])
        if stage != previous:
            starts.append((last_step, record["stage_name"]))
            previous = stage
        last_step = record["step"]
    return starts


def plot_runs(runs: Sequence[Curves]) -> Figure:
    """Draws the runs' curves; returns the Figure without saving it.

    Args:
      runs: one `Curves` per workdir, e.g. from `read_records` and `run_labels`.

    Returns:
      A Figure with one Axes per panel of PANELS (training loss, training accuracy, evaluation
      top-1; x: global step). Each curve is a Line2D labelled "RUN: NETWORK" whose data are the
      file's values; each stage boundary is a vertical Line2D with gid "stage:NAME" (a line
      shared by several runs is grey, otherwise in its run's colour), and the name is written
      above the top panel.
    """
    fig = Figure(figsize=(9, 9.5), layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (kind, metric, ylabel) in zip(axes, PANELS, strict=True):
        for run, colour in zip(runs, colours, strict=True):
            for network in network_names(run.records, kind, metric):
                steps, values = series(run.records, kind, metric, network)
                style = NETWORK_STYLES.get(network, OTHER_NETWORK_STYLE)
                marker = "o" if len(steps) <= MARKERS_UP_TO else None
                label = f"{run.label}: {network}"
                ax.plot(steps, values, color=colour, ls=style, marker=marker, ms=3, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    axes[0].set_xlim(left=0)
    _mark_stages(axes, runs, colours)
    entries: dict[str, object] = {}  # label: handle, one per curve label over all panels
    for ax in axes:  # a network that only one panel has still gets its legend entry
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside right upper", fontsize=8)
    return fig


def _mark_stages(axes, runs: Sequence[Curves], colours: Sequence[str]) -> None:
    owners: dict[tuple[int, str], list[int]] = {}
    for index, run in enumerate(runs):
        starts = stage_starts(run.records)
        if len(starts) > 1:  # one stage has no boundary worth marking
            for start in starts:
                owners.setdefault(start, []).append(index)
    above = axes[0].get_xaxis_transform()  # x in steps, y in axes fractions
    for (step, name), indices in owners.items():
        colour = colours[indices[0]] if len(indices) == 1 else "0.45"
        if step > 0:
            for ax in axes:
                ax.axvline(step, color=colour, linestyle=":", linewidth=1, gid=f"stage:{name}")
        # Above the top panel, clear of the curves.
        axes[0].text(step, 1.01, name, transform=above, va="bottom", fontsize=8, color=colour)


def save_figure(fig: Figure, out: str) -> None:
    """Writes ``fig`` to ``out`` in the format its extension names (.png, .pdf, .svg, ...).

    Raises:
      PlotError: no or an unknown extension, a missing folder, or a write that fails.
    """
    extension = os.path.splitext(out)[1].lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if extension not in supported:
        known = ", ".join(f".{name}" for name in sorted(supported))
        raise PlotError(f"--out '{out}' needs an image extension, one of {known}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise PlotError(f"cannot write '{out}': folder '{folder}' does not exist")
    try:
        fig.savefig(out, format=extension, dpi=120)
    except OSError as error:
        raise PlotError(f"cannot write '{out}': {error.strerror or error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns 0, or 2 after a one-line ``lbq: error:`` on stderr."""
    parser = argparse.ArgumentParser(prog="python -m lbq.plot", description=__doc__.split("\n")[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="a run's workdir")
    parser.add_argument("--out", default="curves.png", help="image to write (default: curves.png)")
    args = parser.parse_args(argv)
    try:
        labels = run_labels(args.workdirs)
        runs = [
            Curves(label, read_records(w)) for label, w in zip(labels, args.workdirs, strict=True)
        ]
        save_figure(plot_runs(runs), args.out)
    except PlotError as error:
        print(f"lbq: error: {error}", file=sys.stderr)
        return 2
    last = max(r["step"] for run in runs for r in run.records)
    print(f"lbq: wrote {args.out} ({len(runs)} run(s), steps 0-{last})")
    return 0


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


if __name__ == "__main__":
    sys.exit(main())
