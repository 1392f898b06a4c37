"""Where lbq's compiled train step spends its time on XLA:CPU, by kind of operation.

Traces a few steps of `lbq.bench.build_step` with XLA's per-operation trace events
(``--xla_cpu_enable_xprof_traceme``, set here before JAX starts), reads the trace with
`jax.profiler.ProfileData`, and sorts every operation of the optimized HLO into convolution
(YNNPACK or Eigen), copy/transpose, reduction, dot or elementwise fusions. Times are summed over
XLA's threads, per step.

    python benchmarks/profile_step.py --mode w2a2 --top 10 --json /tmp/profile_w2a2.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INSTRUCTION = re.compile(
    r"\s+(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|[\w\[\]{},\d:]+) ([a-z\-]+)\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def categorize(hlo: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (category, HLO line)} for every instruction of the optimized HLO."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line.startswith(" "):
            current = computations.setdefault(match.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)

    def ops(name: str, depth: int = 0) -> set[str]:
        found: set[str] = set()
        for line in computations.get(name, []):
            match = _INSTRUCTION.match(line)
            if match:
                found.add(match.group(2))
            if depth < 8:
                for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                    found |= ops(called, depth + 1)
        return found

    out = {}
    for lines in computations.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, op = match.groups()
            inner = {op}
            for called in re.findall(r"calls=%?([\w.\-]+)", line):
                inner |= ops(called)
            if "convolution" in inner:
                category = "convolution"
            elif "dot" in inner:
                category = "dot"
            elif inner & {"reduce", "reduce-window", "select-and-scatter"}:
                category = "reduce"
            elif inner & {"transpose", "copy"}:
                category = "copy/transpose"
            else:
                category = "elementwise"
            out[name] = (category, line.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--mode", default="w2a2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="print the N slowest operations")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    flag = "--xla_cpu_enable_xprof_traceme=true"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    sys.path.insert(0, ROOT)
    import jax
    from jax.profiler import ProfileData

    from lbq.bench import build_step

    bench = build_step(args.model, args.mode, batch=args.batch)
    names = categorize(bench.compiled.as_text())
    bench.run(3)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            wall = sum(bench.run(args.steps))
        (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        profile = ProfileData.from_file(path)
    per_op: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    per_op[event.name] += event.duration_ns / 1e6 / args.steps
    per_category: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        per_category[names[name][0]] += ms
    total = sum(per_category.values())
    step_ms = 1e3 * wall / args.steps
    print(
        f"{args.model} {args.mode} batch {args.batch}: {step_ms:.0f} ms/step wall, "
        f"{total:.0f} ms/step of operation time summed over threads"
    )
    for category, ms in per_category.most_common():
        print(f"  {category:<16}{ms:>9.1f} ms/step {100 * ms / total:>6.1f}%")
    finite = sum(ms for name, ms in per_op.items() if "is-finite" in name)
    print(f"  (of which is-finite reductions: {finite:.2f} ms/step)")
    for name, ms in per_op.most_common(args.top):
        print(f"{ms:>8.2f} ms  {names[name][0]:<15}{names[name][1][:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "mode": args.mode,
                    "batch": args.batch,
                    "wall_ms_per_step": step_ms,
                    "op_ms_per_step": total,
                    "categories_ms_per_step": dict(per_category),
                    "is_finite_ms_per_step": finite,
                    "load_average": os.getloadavg(),
                    "top": [[n, ms, names[n][1][:300]] for n, ms in per_op.most_common(40)],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
