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
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
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
        stage = r.get("stage")
        if stage in seen and r.get("images_per_second"):
            rates.append(r["images_per_second"])
        seen.add(stage)
    if not rates and train:
        rates = [r["images_per_second"] for r in train if r.get("images_per_second")]
    out: dict[str, Any] = {
        "train_images_per_second": statistics.median(rates) if rates else None,
        "final_top1": evals[-1].get("student/top1") if evals else None,
        "final_top5": evals[-1].get("student/top5") if evals else None,
        "stage_evals": [
            {
                "stage": e.get("stage_name"),
                "step": e.get("step"),
                **{k: v for k, v in e.items() if k.endswith("/top1")},
            }
            for e in evals
        ],
    }
    if evals and "teacher/top1" in evals[-1]:
        out["teacher_top1"] = evals[-1]["teacher/top1"]
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
    rows, passed = [], True
    for mode, values in device["losses"].items():
        reference = cpu["losses"].get(mode, [])
        tolerance = rtol.get(mode, max(rtol.values()))
        for step, (a, b) in enumerate(zip(values, reference, strict=False)):
            relative = abs(a - b) / max(abs(b), 1e-12)
            ok = relative <= tolerance
            passed &= ok
            rows.append(
                {
                    "mode": mode,
                    "step": step + 1,
                    "device": a,
                    "cpu": b,
                    "relative_difference": relative,
                    "tolerance": tolerance,
                    "passed": ok,
                }
            )
    return {"rows": rows, "passed": passed and bool(rows), "device": device.get("device")}


def compare_speed(lbq_rows: list[dict], torch_rows: list[dict]) -> list[dict[str, Any]]:
    """One row per (model, mode): lbq and PyTorch figures side by side, with ratios."""
    keys = []
    for r in lbq_rows + torch_rows:
        key = (r["model"], r["mode"])
        if key not in keys:
            keys.append(key)
    rows = []
    for model, mode in keys:
        row: dict[str, Any] = {"model": model, "mode": mode}
        lbq = next((r for r in lbq_rows if (r["model"], r["mode"]) == (model, mode)), None)
        any_torch = next((r for r in torch_rows if (r["model"], r["mode"]) == (model, mode)), {})
        row["batch"] = (lbq or any_torch).get("batch")
        if lbq:
            row.update(
                lbq_images_per_second=lbq["images_per_second"],
                lbq_async_images_per_second=lbq["pipelined_images_per_second"],
                lbq_step_ms=1e3 * lbq["median_step_s"],
                lbq_compile_s=lbq["lower_s"] + lbq["compile_s"],
                lbq_peak_bytes=lbq["peak_bytes"],
            )
        for backend in ("eager", "compile"):
            t = next(
                (
                    r
                    for r in torch_rows
                    if (r["model"], r["mode"], r["backend"]) == (model, mode, backend)
                ),
                None,
            )
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
    # (label, how to read the value from the results, comparison, bound, unit)
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

    def row(model, mode):
        return next((r for r in speed if r["model"] == model and r["mode"] == mode), {})

    acc = results.get("parts", {}).get("accuracy", {}).get("runs", {})

    def top1(name):
        value = acc.get(name, {}).get("final_top1")
        return None if value is None else 100.0 * value

    def minus(a, b):
        return None if a is None or b is None else a - b

    return {
        "r18_w2a2_vs_compile": row("resnet18", "w2a2").get("lbq_vs_torch_compile"),
        "r18_w2a2_vs_fp": row("resnet18", "w2a2").get("lbq_vs_lbq_fp"),
        "r18_kd_peak_vs_fp": row("resnet18", "w2a2_kd").get("lbq_peak_vs_fp"),
        "r20_w2a2_ips": row("resnet20", "w2a2").get("lbq_images_per_second"),
        "r20_w2a2_vs_fp": row("resnet20", "w2a2").get("lbq_vs_lbq_fp"),
        "acc_fp_minus_w4a4": minus(top1("fp"), top1("w4a4")),
        "acc_fp_minus_best": minus(top1("fp"), top1("best")),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_markdown(results: dict[str, Any]) -> str:
    """The human-readable report: environment, parts, tables, targets."""
    suite = results["suite"]
    parts = results.get("parts", {})
    lines = ["# lbq accelerator suite", ""]
    setup = parts.get("setup", {})
    torch_info = setup.get("torch", {})
    env = results.get("environment") or {}
    lines += [
        f"- started {suite['started']}, {suite.get('elapsed_s', 0):.0f} s of a "
        f"{suite['budget_s']:.0f} s budget; tiny mode: {suite['tiny']}",
        f"- commit: {suite.get('commit')}; driver: python {suite['python']}; "
        f"{suite.get('cpu_count')} CPU cores",
        f"- accelerator: {setup.get('nvidia_smi') or env.get('devices') or 'none'}",
        f"- workers: python {env.get('python', '?')}, jax {env.get('jax', '?')} "
        f"({env.get('backend', '?')}); torch {torch_info.get('torch', 'not available')}",
        "",
        "| part | status | budget s | used s |",
        "|---|---|---|---|",
    ]
    for part, p in parts.items():
        if p:
            lines.append(
                f"| {part} | {p.get('status')} | {p.get('budget_s', 0):.0f} | "
                f"{p.get('seconds', 0):.0f} |"
            )
    lines.append("")
    lines += _correctness_md(parts.get("correctness"))
    lines += _speed_md(parts.get("speed"))
    lines += _profile_md(parts.get("profile"))
    lines += _accuracy_md(parts.get("accuracy"))
    lines += ["## Targets (H100/H200, bfloat16)", ""]
    if suite["tiny"]:
        lines += ["Tiny mode: sizes differ from the targets', which are not judged.", ""]
    else:
        values = target_values(results)
        lines += ["| target | measured | bound | verdict |", "|---|---|---|---|"]
        for label, key, op, bound in TARGETS:
            value = values[key]
            if value is None:
                verdict = "not measured"
            else:
                verdict = "met" if (value >= bound if op == ">=" else value <= bound) else "NOT met"
            lines.append(f"| {label} | {_fmt(value, 3)} | {op} {bound:g} | {verdict} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _correctness_md(part: dict | None) -> list[str]:
    if not part:
        return []
    lines = ["## Correctness", ""]
    q = part.get("quantizers")
    if q:
        lines.append(
            f"Quantizers on {q['device']} ({q['backend']}), bits 1-8: "
            f"{'all passed' if q['passed'] else 'FAILURES'}."
        )
        lines += ["", "| quantizer | dtype | passed | min agreement with exact float64 |"]
        lines.append("|---|---|---|---|")
        groups: dict[tuple[str, str], list[dict]] = {}
        for c in q["checks"]:
            groups.setdefault((c["quantizer"], c["dtype"]), []).append(c)
        for (name, dtype), checks in groups.items():
            passed = sum(c["passed"] for c in checks)
            agree = min(c["agree_exact"] for c in checks)
            lines.append(f"| {name} | {dtype} | {passed}/{len(checks)} | {agree:.6f} |")
        grads = q.get("ste_gradients", [])
        lines += [
            "",
            f"Straight-through gradients: {sum(g['passed'] for g in grads)}/{len(grads)} exact.",
            "",
        ]
    comparison = part.get("loss_comparison")
    if comparison:
        lines += ["| mode | step | device loss | CPU loss | rel. diff | tolerance | passed |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in comparison["rows"]:
            lines.append(
                f"| {r['mode']} | {r['step']} | {r['device']:.6f} | {r['cpu']:.6f} | "
                f"{r['relative_difference']:.2e} | {r['tolerance']:.0e} | {r['passed']} |"
            )
        lines.append("")
    default = part.get("loss_device_default")
    if default and part.get("loss_device_highest"):
        lines += [f"Device losses at the default matmul precision: {default['losses']}", ""]
    return lines


def _speed_md(part: dict | None) -> list[str]:
    if not part:
        return []
    lines = ["## Speed (images/s: batch / median step, every step waited for)", ""]
    lines += [
        "| model | mode | batch | lbq | lbq async | step ms | compile s | peak MiB | "
        "torch eager | torch.compile | compile s | lbq/eager | lbq/compile | vs lbq fp | "
        "peak vs fp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.get("comparison", []):
        peak = r.get("lbq_peak_bytes")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r.get('batch', '-')} | "
            f"{_fmt(r.get('lbq_images_per_second'), 0)} | "
            f"{_fmt(r.get('lbq_async_images_per_second'), 0)} | {_fmt(r.get('lbq_step_ms'), 2)} | "
            f"{_fmt(r.get('lbq_compile_s'), 1)} | "
            f"{_fmt(None if peak is None else peak / 2**20, 0)} | "
            f"{_fmt(r.get('torch_eager_images_per_second'), 0)} | "
            f"{_fmt(r.get('torch_compile_images_per_second'), 0)} | "
            f"{_fmt(r.get('torch_compile_s'), 1)} | {_fmt(r.get('lbq_vs_torch_eager'), 2)} | "
            f"{_fmt(r.get('lbq_vs_torch_compile'), 2)} | {_fmt(r.get('lbq_vs_lbq_fp'), 3)} | "
            f"{_fmt(r.get('lbq_peak_vs_fp'), 2)} |"
        )
    lines += ["", "| task | status |", "|---|---|"]
    for t in part.get("tasks", []):
        lines.append(f"| {t['task']} | {t.get('status')} |")
    lines.append("")
    return lines


def _profile_md(part: dict | None) -> list[str]:
    summary = (part or {}).get("summary")
    if not summary:
        return []
    lines = [
        f"## Profile: {summary['model']} batch {summary['batch']} on {summary['device']}",
        "",
    ]
    for mode, m in summary["modes"].items():
        cats = ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(m["categories_ms_per_step"].items(), key=lambda x: -x[1])
        )
        nets = ", ".join(f"{k} {v:.2f}" for k, v in m["networks_ms_per_step"].items())
        lines += [
            f"- **{mode}**: {m['wall_ms_per_step']:.2f} ms/step wall, "
            f"{m['op_ms_per_step']:.2f} ms/step in traced ops "
            f"({m['unmatched_ms_per_step']:.2f} not matched to the HLO).",
            f"  - by kind (ms/step): {cats}",
            f"  - by network (ms/step): {nets}",
        ]
        for op in m["top_ops"][:5]:
            lines.append(
                f"  - {op['ms_per_step']:.3f} ms {op['category']} ({op['network']}): {op['op']}"
            )
    lines.append("")
    return lines


def _accuracy_md(part: dict | None) -> list[str]:
    if not part or "runs" not in part:
        return [] if not part else ["## Accuracy", "", f"{part.get('status')}", ""]
    lines = [
        f"## Accuracy: CIFAR-10 ResNet-20, {part['num_train']} train images, "
        f"{part.get('num_test')} test images, batch {part['batch']}",
        "",
        "| run | steps | epochs | lr | wall s | train images/s | top-1 % | teacher top-1 % | "
        "status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in part["runs"].items():
        top1 = r.get("final_top1")
        teacher = r.get("teacher_top1")
        lines.append(
            f"| {name} | {r.get('steps', '-')} | {_fmt(r.get('epochs'), 2)} | {r.get('lr', '-')} "
            f"| {_fmt(r.get('seconds'), 0)} | {_fmt(r.get('train_images_per_second'), 0)} | "
            f"{_fmt(None if top1 is None else 100 * top1, 2)} | "
            f"{_fmt(None if teacher is None else 100 * teacher, 2)} | {r.get('status')} |"
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/accelerator_report.py RESULTS_JSON", file=sys.stderr)
        return 2
    results = read_json(argv[0])
    if results is None:
        print(
            f"accelerator_report: error: {argv[0]} is not a readable results.json", file=sys.stderr
        )
        return 2
    sys.stdout.write(summary_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
