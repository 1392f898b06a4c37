"""Reading the accelerator suite's measurements: comparisons, the issue's targets, summary.md.

Pure functions over the dictionaries that benchmarks/accelerator_suite.py collects (and writes
to results.json), so that a results.json that came back from a device can be re-read here:

    python benchmarks/accelerator_report.py results.json > summary.md
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any

# lbq.io needs only the standard library, so the suite's driver can use it on a bare device
# machine before its wheels are installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lbq.io import jsonl_lines  # noqa: E402


def read_json(path: str) -> Any:
    """The JSON document at ``path``; None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, without a line cut off by a stopped process; [] when
    the file is missing."""
    if not os.path.exists(path):
        return []
    return [record for _, _, record in jsonl_lines(path) if record is not None]


def read_run_metrics(path: str) -> dict[str, Any]:
    """Final and per-stage evaluations and the steady training rate from metrics.jsonl.

    The rate is the median over the train records after each stage's first (which includes
    compiling and the stage's start).
    """
    records = read_jsonl(path)
    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train"]
    rates, seen = [], set()
    for r in train:
        if r.get("stage") in seen and r.get("images_per_second"):
            rates.append(r["images_per_second"])
        seen.add(r.get("stage"))
    if not rates:
        rates = [r["images_per_second"] for r in train if r.get("images_per_second")]
    last = evals[-1] if evals else {}
    out: dict[str, Any] = {
        "train_images_per_second": statistics.median(rates) if rates else None,
        "final_top1": last.get("student/top1"),
        "final_top5": last.get("student/top5"),
        "stage_evals": [
            {
                "stage": e.get("stage_name"),
                "step": e.get("step"),
                **{k: v for k, v in e.items() if k.endswith("/top1")},
            }
            for e in evals
        ],
    }
    if "teacher/top1" in last:
        out["teacher_top1"] = last["teacher/top1"]
    return out


def rate_ratios(lbq_rows: list[dict[str, Any]]) -> dict[str, float]:
    """ResNet-20 images/s of each lbq.bench mode relative to fp (for fitting the runs)."""
    rates = {r["mode"]: r["images_per_second"] for r in lbq_rows if r.get("model") == "resnet20"}
    if "fp" not in rates:
        return {}
    out = {mode: rate / rates["fp"] for mode, rate in rates.items() if mode != "fp"}
    out["fp_images_per_second"] = rates["fp"]
    return out


def compare_losses(
    device: dict[str, Any] | None, cpu: dict[str, Any] | None, rtol: dict[str, float]
) -> dict[str, Any] | None:
    """Per mode and step, |device - cpu| / |cpu| against the mode's tolerance."""
    if not device or not cpu:
        return None
    rows = []
    for mode, values in device["losses"].items():
        tolerance = rtol.get(mode, max(rtol.values()))
        for step, (a, b) in enumerate(zip(values, cpu["losses"].get(mode, []), strict=False)):
            relative = abs(a - b) / max(abs(b), 1e-12)
            rows.append(
                {
                    "mode": mode,
                    "step": step + 1,
                    "device": a,
                    "cpu": b,
                    "relative_difference": relative,
                    "tolerance": tolerance,
                    "passed": relative <= tolerance,
                }
            )
    passed = bool(rows) and all(r["passed"] for r in rows)
    return {"rows": rows, "passed": passed, "device": device.get("device")}


def compare_speed(lbq_rows: list[dict], torch_rows: list[dict]) -> list[dict[str, Any]]:
    """One row per (model, mode): lbq and PyTorch figures side by side, with ratios."""
    # The first row of each key, as read in order.
    lbq_of = {(r["model"], r["mode"]): r for r in reversed(lbq_rows)}
    torch_of = {(r["model"], r["mode"], r["backend"]): r for r in reversed(torch_rows)}
    any_torch = {(r["model"], r["mode"]): r for r in reversed(torch_rows)}
    rows = []
    for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in lbq_rows + torch_rows):
        row: dict[str, Any] = {"model": model, "mode": mode}
        lbq = lbq_of.get((model, mode))
        row["batch"] = (lbq or any_torch.get((model, mode), {})).get("batch")
        if lbq:
            row.update(
                lbq_images_per_second=lbq["images_per_second"],
                lbq_async_images_per_second=lbq["pipelined_images_per_second"],
                lbq_step_ms=1e3 * lbq["median_step_s"],
                lbq_compile_s=lbq["lower_s"] + lbq["compile_s"],
                lbq_peak_bytes=lbq["peak_bytes"],
            )
        for backend in ("eager", "compile"):
            t = torch_of.get((model, mode, backend))
            if not t:
                continue
            row[f"torch_{backend}_images_per_second"] = t["images_per_second"]
            row[f"torch_{backend}_step_ms"] = 1e3 * t["median_step_s"]
            row[f"torch_{backend}_peak_bytes"] = t["peak_bytes"]
            if backend == "compile":
                row["torch_compile_s"] = t["compile_s"]
            if lbq:
                row[f"lbq_vs_torch_{backend}"] = lbq["images_per_second"] / t["images_per_second"]
        rows.append(row)
    fp = {r["model"]: r for r in rows if r["mode"] == "fp" and "lbq_images_per_second" in r}
    for row in rows:
        base = fp.get(row["model"])
        if base and "lbq_images_per_second" in row:
            row["lbq_vs_lbq_fp"] = row["lbq_images_per_second"] / base["lbq_images_per_second"]
            row["lbq_peak_vs_fp"] = row["lbq_peak_bytes"] / base["lbq_peak_bytes"]
    return rows


# ----------------------------------------------------------------------------- summary

TARGETS = (
    # (label, key of target_values, comparison, bound)
    ("ResNet-18 W2A2 vs torch.compile W2A2 (images/s ratio)", "r18_w2a2_vs_compile", ">=", 1.15),
    ("ResNet-18 W2A2 vs lbq FP (images/s ratio)", "r18_w2a2_vs_fp", ">=", 0.97),
    ("ResNet-18 joint step peak memory / FP step's", "r18_kd_peak_vs_fp", "<=", 2.1),
    ("ResNet-20 W2A2 images/s", "r20_w2a2_ips", ">=", 70_000.0),
    ("ResNet-20 W2A2 vs lbq FP (images/s ratio)", "r20_w2a2_vs_fp", ">=", 0.95),
    ("CIFAR-10 FP minus W4A4 top-1 (points)", "acc_fp_minus_w4a4", "<=", 1.0),
    ("CIFAR-10 FP minus W2A2 best top-1 (points)", "acc_fp_minus_best", "<=", 3.0),
)


def target_values(results: dict[str, Any]) -> dict[str, float | None]:
    """The measured value of each target (None: not measured)."""
    speed = results.get("parts", {}).get("speed", {}).get("comparison", [])
    acc = results.get("parts", {}).get("accuracy", {}).get("runs", {})

    def row(model, mode):
        return next((r for r in speed if r["model"] == model and r["mode"] == mode), {})

    def fp_minus(name):
        fp, other = acc.get("fp", {}).get("final_top1"), acc.get(name, {}).get("final_top1")
        return None if fp is None or other is None else 100.0 * fp - 100.0 * other

    return {
        "r18_w2a2_vs_compile": row("resnet18", "w2a2").get("lbq_vs_torch_compile"),
        "r18_w2a2_vs_fp": row("resnet18", "w2a2").get("lbq_vs_lbq_fp"),
        "r18_kd_peak_vs_fp": row("resnet18", "w2a2_kd").get("lbq_peak_vs_fp"),
        "r20_w2a2_ips": row("resnet20", "w2a2").get("lbq_images_per_second"),
        "r20_w2a2_vs_fp": row("resnet20", "w2a2").get("lbq_vs_lbq_fp"),
        "acc_fp_minus_w4a4": fp_minus("w4a4"),
        "acc_fp_minus_best": fp_minus("best"),
    }


def _fmt(value: Any, digits: int = 1, scale: float = 1.0) -> str:
    """``value * scale`` with ``digits`` decimals and thousands separators; '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float) or scale != 1.0:
        return f"{value * scale:,.{digits}f}"
    return str(value)


def _row(*cells: Any) -> str:
    """One line of a markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[str]) -> list[str]:
    """The lines of a markdown table (rows from `_row`), then a blank line."""
    return [_row(*header), "|" + "---|" * len(header), *rows, ""]


def summary_markdown(results: dict[str, Any]) -> str:
    """The human-readable report: environment, parts, tables, targets."""
    suite = results["suite"]
    parts = results.get("parts", {})
    setup = parts.get("setup", {})
    env = results.get("environment") or {}
    torch_version = setup.get("torch", {}).get("torch", "not available")
    lines = [
        "# lbq accelerator suite",
        "",
        f"- started {suite['started']}, {suite.get('elapsed_s', 0):.0f} s of a "
        f"{suite['budget_s']:.0f} s budget; tiny mode: {suite['tiny']}",
        f"- commit: {suite.get('commit')}; driver: python {suite['python']}; "
        f"{suite.get('cpu_count')} CPU cores",
        f"- accelerator: {setup.get('nvidia_smi') or env.get('devices') or 'none'}",
        f"- workers: python {env.get('python', '?')}, jax {env.get('jax', '?')} "
        f"({env.get('backend', '?')}); torch {torch_version}",
        "",
    ]
    rows = [
        _row(part, p.get("status"), f"{p.get('budget_s', 0):.0f}", f"{p.get('seconds', 0):.0f}")
        for part, p in parts.items()
        if p
    ]
    lines += _table(["part", "status", "budget s", "used s"], rows)
    lines += _correctness_md(parts.get("correctness"))
    lines += _speed_md(parts.get("speed"))
    lines += _profile_md(parts.get("profile"))
    lines += _accuracy_md(parts.get("accuracy"))
    lines += ["## Targets (H100/H200, bfloat16)", ""]
    if suite["tiny"]:
        lines += ["Tiny mode: sizes differ from the targets', which are not judged.", ""]
    else:
        values = target_values(results)
        rows = []
        for label, key, op, bound in TARGETS:
            value = values[key]
            met = value is not None and (value >= bound if op == ">=" else value <= bound)
            verdict = "not measured" if value is None else ("met" if met else "NOT met")
            rows.append(_row(label, _fmt(value, 3), f"{op} {bound:g}", verdict))
        lines += _table(["target", "measured", "bound", "verdict"], rows)
    return "\n".join(lines) + "\n"


def _correctness_md(part: dict | None) -> list[str]:
    if not part:
        return []
    lines = ["## Correctness", ""]
    q = part.get("quantizers")
    if q:
        lines += [
            f"Quantizers on {q['device']} ({q['backend']}), bits 1-8: "
            f"{'all passed' if q['passed'] else 'FAILURES'}.",
            "",
        ]
        groups: dict[tuple[str, str], list[dict]] = {}
        for c in q["checks"]:
            groups.setdefault((c["quantizer"], c["dtype"]), []).append(c)
        rows = []
        for key, cs in groups.items():
            agree = min(c["agree_exact"] for c in cs)
            rows.append(_row(*key, f"{sum(c['passed'] for c in cs)}/{len(cs)}", f"{agree:.6f}"))
        lines += _table(["quantizer", "dtype", "passed", "min agreement with exact float64"], rows)
        grads = q.get("ste_gradients", [])
        exact = sum(g["passed"] for g in grads)
        lines += [f"Straight-through gradients: {exact}/{len(grads)} exact.", ""]
    comparison = part.get("loss_comparison")
    if comparison:
        header = ["mode", "step", "device loss", "CPU loss", "rel. diff", "tolerance", "passed"]
        rows = [
            f"| {r['mode']} | {r['step']} | {r['device']:.6f} | {r['cpu']:.6f} | "
            f"{r['relative_difference']:.2e} | {r['tolerance']:.0e} | {r['passed']} |"
            for r in comparison["rows"]
        ]
        lines += _table(header, rows)
    default = part.get("loss_device_default")
    if default and part.get("loss_device_highest"):
        lines += [f"Device losses at the default matmul precision: {default['losses']}", ""]
    return lines


# (header, key in a compare_speed row, decimals, scale) of the speed table's columns.
SPEED_COLUMNS = (
    ("model", "model", 0, 1.0),
    ("mode", "mode", 0, 1.0),
    ("batch", "batch", 0, 1.0),
    ("lbq", "lbq_images_per_second", 0, 1.0),
    ("lbq async", "lbq_async_images_per_second", 0, 1.0),
    ("step ms", "lbq_step_ms", 2, 1.0),
    ("compile s", "lbq_compile_s", 1, 1.0),
    ("peak MiB", "lbq_peak_bytes", 0, 2.0**-20),
    ("torch eager", "torch_eager_images_per_second", 0, 1.0),
    ("torch.compile", "torch_compile_images_per_second", 0, 1.0),
    ("compile s", "torch_compile_s", 1, 1.0),
    ("lbq/eager", "lbq_vs_torch_eager", 2, 1.0),
    ("lbq/compile", "lbq_vs_torch_compile", 2, 1.0),
    ("vs lbq fp", "lbq_vs_lbq_fp", 3, 1.0),
    ("peak vs fp", "lbq_peak_vs_fp", 2, 1.0),
)


def _speed_md(part: dict | None) -> list[str]:
    if not part:
        return []
    rows = [
        _row(*(_fmt(r.get(key), digits, scale) for _, key, digits, scale in SPEED_COLUMNS))
        for r in part.get("comparison", [])
    ]
    lines = ["## Speed (images/s: batch / median step, every step waited for)", ""]
    lines += _table([c[0] for c in SPEED_COLUMNS], rows)
    tasks = [_row(t["task"], t.get("status")) for t in part.get("tasks", [])]
    return lines + _table(["task", "status"], tasks)


def _profile_md(part: dict | None) -> list[str]:
    summary = (part or {}).get("summary")
    if not summary:
        return []
    lines = [f"## Profile: {summary['model']} batch {summary['batch']} on {summary['device']}", ""]
    for mode, m in summary["modes"].items():
        ranked = sorted(m["categories_ms_per_step"].items(), key=lambda x: -x[1])
        cats = ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        nets = ", ".join(f"{k} {v:.2f}" for k, v in m["networks_ms_per_step"].items())
        lines += [
            f"- **{mode}**: {m['wall_ms_per_step']:.2f} ms/step wall, "
            f"{m['op_ms_per_step']:.2f} ms/step in traced ops "
            f"({m['unmatched_ms_per_step']:.2f} not matched to the HLO).",
            f"  - by kind (ms/step): {cats}",
            f"  - by network (ms/step): {nets}",
        ]
        lines += [
            f"  - {op['ms_per_step']:.3f} ms {op['category']} ({op['network']}): {op['op']}"
            for op in m["top_ops"][:5]
        ]
    return lines + [""]


def _accuracy_md(part: dict | None) -> list[str]:
    if not part or "runs" not in part:
        return [] if not part else ["## Accuracy", "", f"{part.get('status')}", ""]
    lines = [
        f"## Accuracy: CIFAR-10 ResNet-20, {part['num_train']} train images, "
        f"{part.get('num_test')} test images, batch {part['batch']}",
        "",
    ]
    header = ["run", "steps", "epochs", "lr", "wall s", "train images/s", "top-1 %"]
    rows = [
        f"| {name} | {r.get('steps', '-')} | {_fmt(r.get('epochs'), 2)} | {r.get('lr', '-')} "
        f"| {_fmt(r.get('seconds'), 0)} | {_fmt(r.get('train_images_per_second'), 0)} | "
        f"{_fmt(r.get('final_top1'), 2, 100.0)} | {_fmt(r.get('teacher_top1'), 2, 100.0)} | "
        f"{r.get('status')} |"
        for name, r in part["runs"].items()
    ]
    return lines + _table(header + ["teacher top-1 %", "status"], rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/accelerator_report.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = read_json(argv[0])
    if results is None:
        error = f"accelerator_report: error: {argv[0]} is not a readable results.json"
        print(error, file=sys.stderr)
        return 2
    sys.stdout.write(summary_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
