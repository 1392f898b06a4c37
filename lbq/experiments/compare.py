"""Side by side: several `reproduce` studies that differ in one setting (the quantizers, say).

    python -m lbq.experiments.compare --out=DIR --control=OUTDIR_FP \\
        --study dorefa/dorefa=OUTDIR_A --study lsq/lsq=OUTDIR_B [--gaps=1,6]

Each ``--study LABEL=OUTDIR`` is a `reproduce` output folder (one ``RUN/result.json`` per
finished run). Writes ``DIR/comparison.md`` (a row per study, a column per method and
bit-width found: top-1 mean ± sample std over seeds, n, and the difference to the control's
mean), ``DIR/comparison.json`` (the same numbers and every run's top-1) and
``DIR/comparison.png`` (bars of the means, std as error bars, one dot per seed, the control as
a line; ``--gaps`` draws lines that many points below it, for targets stated as a gap).

Top-1 is the final student's, in percent, on the split the runs evaluated. This module is also
where `reproduce` reads its runs' records (`load_results`, `summarize`) and draws its plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from lbq.configs.recipes import METHODS
from lbq.io import write_json


def load_results(outdir: str) -> list[dict[str, Any]]:
    """Every finished run's record under ``outdir``."""
    names = sorted(os.listdir(outdir)) if os.path.isdir(outdir) else []
    paths = [pathlib.Path(outdir, name, "result.json") for name in names]
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method, bits): {'mean', 'std', 'n', 'seeds', 'top1', 'epochs', 'seconds'}}: top-1 (%)
    mean and sample std (None for one seed), and the seeds with their top-1, in seed order."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        mean, std = _mean_std([100 * r["top1"] for r in rs])
        per_seed = sorted((r["seed"], 100 * r["top1"]) for r in rs)
        out[key] = {
            "mean": mean,
            "std": std,
            "n": len(rs),
            "seeds": [s for s, _ in per_seed],
            "top1": [t for _, t in per_seed],
            "epochs": sorted({round(r["epochs"], 2) for r in rs}),
            "seconds": sum(r["seconds"] for r in rs) / len(rs),
        }
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lbq.experiments.compare", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="folder for comparison.md/.json/.png")
    p.add_argument("--study", action="append", required=True, help="LABEL=OUTDIR, repeatable")
    p.add_argument("--control", help="OUTDIR of the full-precision control (method fp)")
    p.add_argument("--gaps", default="", help="comma-separated points below the control to draw")
    p.add_argument("--title", default="", help="the plot's title")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out={args.out} is a file, not a folder")
    args.study = [_study(p, item) for item in args.study]
    labels = [label for label, _ in args.study]
    if len(set(labels)) != len(labels):
        p.error(f"--study labels must differ: {labels}")
    args.control_records = load_results(args.control) if args.control else []
    if args.control and ("fp", 32) not in summarize(args.control_records):
        p.error(f"--control={args.control}: no finished fp run")
    try:
        args.gaps = [float(g) for g in args.gaps.split(",") if g.strip()]
    except ValueError:
        p.error(f"--gaps={args.gaps!r}: expected comma-separated numbers")
    if args.gaps and not args.control:
        p.error("--gaps are drawn below the control: give --control")
    return args


def _study(p: argparse.ArgumentParser, item: str) -> tuple[str, list[dict[str, Any]]]:
    """(label, the finished runs' records) of one ``--study LABEL=OUTDIR``."""
    label, sep, outdir = item.partition("=")
    if not sep or not label or not outdir:
        p.error(f"--study {item!r}: expected LABEL=OUTDIR")
    records = load_results(outdir)
    if not records:
        p.error(f"--study {item!r}: no finished run (RUN/result.json) in {outdir}")
    if all(r["method"] == "fp" for r in records):
        p.error(f"--study {item!r}: no quantized run (only fp runs) in {outdir}")
    return label, records


def compare(
    studies: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    control: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The comparison's numbers.

    Args:
      studies: (label, the study's result.json records), in display order.
      control: the control's records (its fp runs are used), or none.

    Returns:
      ``{'columns': [[method, bits], ...], 'budgets': ['N steps, evaluated on SPLIT', ...],
      'control': {mean, std, n, top1} | None,
      'studies': {label: {'method wKaK': {mean, std, n, top1: [per seed], delta}}}}``;
      top-1 in percent, ``std`` the sample std (None for one seed), ``delta`` the mean minus
      the control's mean (absent without a control).
    """
    summaries = {label: summarize(records) for label, records in studies}
    found = {c for s in summaries.values() for c in s if c[0] != "fp"}
    columns = sorted(found, key=lambda c: (METHODS.index(c[0]), -c[1]))
    fp = summarize(control).get(("fp", 32)) if control else None
    every_run = [r for _, records in studies for r in records] + list(control)
    return {
        "columns": [list(c) for c in columns],
        "budgets": sorted({_budget(r) for r in every_run}),
        "control": None if fp is None else _cell(fp, None),
        "studies": {
            label: {_name(c): _cell(summary[c], fp) for c in columns if c in summary}
            for label, summary in summaries.items()
        },
    }


def _budget(record: dict[str, Any]) -> str:
    """A run's training steps and evaluated split, which runs must share to compare."""
    split = record["stages"][-1].get("eval_split") if record.get("stages") else None
    return f"{record['steps']} steps, evaluated on {split or 'an unrecorded split'}"


def _name(column: tuple[str, int]) -> str:
    method, bits = column  # a column of the table
    return f"{method} w{bits}a{bits}"


def _cell(summary: dict[str, Any], fp: dict[str, Any] | None) -> dict[str, Any]:
    cell = {key: summary[key] for key in ("mean", "std", "n", "seeds", "top1")}
    if fp is not None:
        cell["delta"] = summary["mean"] - fp["mean"]
    return cell


def format_mean(summary: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std (n=N)`` of a `summarize` entry at ``digits`` decimals (no std for one seed)."""
    std = "" if summary["std"] is None else f" ± {summary['std']:.{digits}f}"
    return f"{summary['mean']:.{digits}f}{std} (n={summary['n']})"


def _format(cell: dict | None) -> str:
    if cell is None:
        return "—"
    return format_mean(cell) + (f", {cell['delta']:+.2f}" if "delta" in cell else "")


def format_markdown(result: dict[str, Any]) -> str:
    """The Markdown table of `compare`'s result."""
    names = [_name(tuple(c)) for c in result["columns"]]
    budgets = result["budgets"]
    if len(budgets) == 1:
        lines = [f"Every run: {budgets[0]}.", ""]
    else:
        lines = ["**The runs differ in budget or split:** " + "; ".join(budgets) + ".", ""]
    control = result["control"]
    if control is not None:
        lines += [f"Control (fp, full precision): {_format(control)}.", ""]
    lines += [
        "Top-1 (%), mean ± sample std over seeds (n seeds)"
        + (", then the difference to the control's mean." if control else "."),
        "",
        "| study | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for label, cells in result["studies"].items():
        cells_text = " | ".join(_format(cells.get(n)) for n in names)
        lines.append(f"| {label.replace('|', '&#124;')} | {cells_text} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str, gaps: Sequence[float] = (), title: str = "") -> None:
    """Grouped bars (one group per method and bit-width, one bar per study) as a PNG."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    names = [_name(tuple(c)) for c in result["columns"]]
    labels = list(result["studies"])
    width = 0.8 / max(len(labels), 1)
    # Matplotlib's default cycle repeats after 10 colours; tab20 keeps up to 20 studies apart.
    colours = colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    fig = Figure(figsize=(1.6 + 2.0 * len(names), 5.0))
    ax = fig.subplots()
    for i, label in enumerate(labels):
        legend, colour = label, colours[i % len(colours)]
        for j, name in enumerate(names):
            cell = result["studies"][label].get(name)
            if cell is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            err = cell["std"] or 0.0
            ax.bar(x, cell["mean"], width, yerr=err, capsize=3, color=colour, label=legend)
            ax.plot([x] * len(cell["top1"]), cell["top1"], "k.", ms=4)
            legend = None  # one legend entry per study
    control = result["control"]
    if control is not None:
        ax.axhline(control["mean"], color="k", lw=1, label=f"fp control {control['mean']:.2f}")
        for gap in gaps:
            ax.axhline(control["mean"] - gap, color="k", lw=1, ls=":")
            ax.text(-0.5, control["mean"] - gap, f"control − {gap:g}", va="bottom", fontsize=7)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 per study (bars: mean, error bars: std, dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = compare(args.study, args.control_records)
    os.makedirs(args.out, exist_ok=True)
    table = format_markdown(result)
    pathlib.Path(args.out, "comparison.md").write_text(table)
    write_json(os.path.join(args.out, "comparison.json"), result, indent=1)
    plot(result, os.path.join(args.out, "comparison.png"), args.gaps, args.title)
    print(table, end="")
    print(f"wrote comparison.md, comparison.json and comparison.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
