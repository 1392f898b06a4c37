"""JAX-side measurements of the accelerator suite, one per process, each writing ``--json``.

Subcommands ``quantizers``, ``train_loss`` and ``profile`` (docs/accelerator.md, "What it runs",
says what each checks); ``profile`` works on XLA:CPU too (benchmarks/RESULTS.md):

    python benchmarks/accelerator_worker.py profile --model=resnet20 --modes=w2a2 --batch=128 \\
        --dtype=float32 --trace_dir=/tmp/trace --json=/tmp/profile.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import re
import sys
import time

import ml_dtypes  # noqa: F401  (NumPy knows the dtype name 'bfloat16' once it is imported)
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lbq.io import write_json  # noqa: E402

BITS = tuple(range(1, 9))
DTYPES = ("float32", "bfloat16")
# Elements whose level index matches neither reference (e.g. a transcendental a few ulps off
# NumPy's next to a rounding tie): at most this fraction, and never more than one level away.
MAX_UNEXPLAINED_FRACTION = 1e-3


def _rounder(name: str):
    """x (float64) -> x rounded to dtype ``name`` (round to nearest even), as float64."""
    return lambda x: np.asarray(x, np.float64).astype(name).astype(np.float64)


def _ulp(values: np.ndarray, name: str) -> np.ndarray:
    """One unit in the last place of dtype ``name`` at each |value| (0 at 0)."""
    magnitude = np.abs(values)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    mantissa_bits = {"float32": 23, "bfloat16": 7}[name]
    return np.where(magnitude > 0, np.exp2(exponent - mantissa_bits), 0.0)


# ----------------------------------------------------------------------------- references


def reference_unit_index(z: np.ndarray, bits: int, rnd=None) -> np.ndarray:
    """Level index ``round((2^k - 1) z)`` of SPEC's k-bit quantizer on [0, 1]; with ``rnd``,
    the product is rounded to the dtype first, as a dtype computation does."""
    levels = 2.0**bits - 1
    product = z * levels
    return np.round(product if rnd is None else rnd(product))


def reference_weight_index(w: np.ndarray, bits: int, per_channel: bool, rnd=None) -> np.ndarray:
    """Level index of DoReFa's ``Q_k(tanh(w) / (2 max|tanh w|) + 1/2)``; with ``rnd``, every
    operation's result is rounded to the dtype (tanh exactly, then rounded)."""
    r = (lambda x: x) if rnd is None else rnd
    t = r(np.tanh(w))
    if per_channel:
        m = np.abs(t).reshape(-1, t.shape[-1]).max(axis=0)
    else:
        m = np.abs(t).max()
    m = np.maximum(m, np.finfo(np.float32).tiny)
    z = r(r(t / r(2.0 * m)) + 0.5)
    return reference_unit_index(z, bits, rnd)


def check_quantizer(
    out: np.ndarray, exact: np.ndarray, emulated: np.ndarray, bits: int, dtype: str, weights: bool
) -> dict:
    """Compares a quantizer's output with the references' level indices; docs/accelerator.md
    ("What passes") has the three conditions (levels i/(2^k - 1) on [0, 1], 2 i/(2^k - 1) - 1
    for weights; at most `MAX_UNEXPLAINED_FRACTION` of the elements unexplained).

    Args:
      out: the quantizer's output, as float64.
      exact, emulated: level indices of the exact and dtype-rounded references.
      bits: k.
      dtype: 'float32' or 'bfloat16'.
      weights: whether levels are the weight quantizer's [-1, 1] ones.
    """
    levels = 2.0**bits - 1
    unit = (out + 1.0) / 2.0 if weights else out
    index = np.round(unit * levels)
    level_values = 2.0 * index / levels - 1.0 if weights else index / levels
    # Weights are 2 q - 1 of a rounded q in [0, 1]: the rounding of q (at most half a unit in
    # the last place of 1) doubles, so their tolerance is at the scale of 1, not of the level.
    scale = np.maximum(np.abs(level_values), 1.0) if weights else level_values
    off_grid = np.abs(out - level_values) > _ulp(scale, dtype)
    off_grid |= (index < 0) | (index > levels)
    explained = (index == exact) | (index == emulated)
    distance = np.abs(index - exact)
    n = out.size
    result = {
        "bits": bits,
        "dtype": dtype,
        "elements": int(n),
        "distinct_values": int(len(np.unique(out))),
        "off_grid": int(off_grid.sum()),
        "agree_exact": float(np.mean(index == exact)),
        "agree_dtype_rounded": float(np.mean(index == emulated)),
        "unexplained": int((~explained).sum()),
        "max_level_distance": int(distance.max()) if n else 0,
    }
    result["passed"] = bool(
        result["off_grid"] == 0
        and result["distinct_values"] <= 2**bits
        and result["unexplained"] <= MAX_UNEXPLAINED_FRACTION * n
        and result["max_level_distance"] <= 1
    )
    return result


def run_quantizers(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from lbq.quant import quantize_activation, quantize_unit, quantize_weight

    rng = np.random.default_rng(0)
    n = args.elements
    raw = {
        "unit": rng.uniform(0.0, 1.0, n),
        "activation": rng.uniform(-0.5, 1.5, n),
        "weight": rng.normal(0.0, 0.1, (3, 3, 64, max(n // 576, 2))),
    }
    functions = {
        "unit": jax.jit(quantize_unit),
        "activation": jax.jit(quantize_activation),
        "weight": jax.jit(lambda w, b: quantize_weight(w, b, per_channel=False)),
        "weight_per_channel": jax.jit(lambda w, b: quantize_weight(w, b, per_channel=True)),
    }
    activation_grad = jax.jit(jax.grad(lambda a, b: jnp.sum(quantize_activation(a, b))))
    checks, gradients = [], []
    for dtype in DTYPES:
        rnd = _rounder(dtype)
        inputs = {k: rnd(v) for k, v in raw.items()}  # the values the device really gets
        device = {k: jnp.asarray(v.astype(dtype)) for k, v in inputs.items()}
        for bits in BITS:
            b = jnp.float32(bits)  # traced, as lbq passes bit-widths
            for name, fn in functions.items():
                key = "weight" if name.startswith("weight") else name
                out = np.asarray(fn(device[key], b)).astype(np.float64)
                x = inputs[key]
                if key == "weight":
                    per_channel = name == "weight_per_channel"
                    reference = functools.partial(reference_weight_index, x, bits, per_channel)
                else:
                    reference = functools.partial(reference_unit_index, np.clip(x, 0.0, 1.0), bits)
                exact, emulated = reference(), reference(rnd=rnd)
                check = check_quantizer(out, exact, emulated, bits, dtype, key == "weight")
                checks.append({"quantizer": name, **check})
            # Straight-through estimator: gradient 1 inside (0, 1), 0 outside; the endpoints
            # themselves (where clip's subgradient is a convention) are left out.
            a = inputs["activation"]
            grad = np.asarray(activation_grad(device["activation"], b)).astype(np.float64)
            inside = (a > 0) & (a < 1)
            strict = (a != 0) & (a != 1)
            wrong = int(np.sum((grad != inside.astype(np.float64)) & strict))
            gradients.append({"dtype": dtype, "bits": bits, "wrong": wrong, "passed": wrong == 0})
    return {
        "checks": checks,
        "ste_gradients": gradients,
        "passed": all(c["passed"] for c in checks) and all(g["passed"] for g in gradients),
    }


def _device_info() -> dict:
    """The default backend, its first device's kind and JAX's version."""
    import jax

    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
    }


# ----------------------------------------------------------------------------- train loss


def run_train_loss(args: argparse.Namespace) -> dict:
    import jax

    if args.precision != "default":
        # Full float32 products (no TF32 on GPUs), so that the comparison is of the step's
        # arithmetic, not of the matmul unit's input rounding.
        jax.config.update("jax_default_matmul_precision", args.precision)
    from lbq.bench import build_step

    losses = {}
    for mode in args.modes.split(","):
        bench = build_step(args.model, mode, batch=args.batch, dtype="float32")
        values = []
        for _ in range(args.steps):
            bench.step()
            values.append(float(bench.metrics["loss"]))
        losses[mode] = values
    return {"precision": args.precision, "model": args.model, "batch": args.batch, "losses": losses}


# ----------------------------------------------------------------------------- profile

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_INSTRUCTION = re.compile(
    r"\s+(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|[\w\[\]{},\d:]+) ([a-z\-]+)\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
# (category, HLO ops that put an instruction in it), first match wins; else 'elementwise'.
_CATEGORIES = (
    ("convolution", {"convolution"}),
    ("dot", {"dot"}),
    ("reduce", {"reduce", "reduce-window", "select-and-scatter"}),
    ("copy/transpose", {"transpose", "copy"}),
)


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
            category = next((c for c, kinds in _CATEGORIES if inner & kinds), "elementwise")
            out[name] = (category, line.strip())
    return out


def network_of(hlo_line: str) -> str:
    """'teacher', 'student' or 'other' (optimizer, input normalisation, checks), from the op's
    ``op_name`` metadata: lbq wraps each network's apply in ``jax.named_call``."""
    match = _OP_NAME.search(hlo_line)
    name = match.group(1) if match else ""
    return next((net for net in ("teacher", "student") if net in name), "other")


def op_events(profile, names: set[str]) -> tuple[collections.Counter, collections.Counter]:
    """Summed durations (ns) of the trace's events: (by HLO instruction name, by kernel name).

    On GPUs and TPUs the device planes' op lines are read ('XLA Ops'), their other lines for
    kernels; on CPU (no device plane) every event named like an HLO instruction.
    """
    per_op: collections.Counter = collections.Counter()
    kernels: collections.Counter = collections.Counter()
    device_planes = [p for p in profile.planes if p.name.startswith("/device:")]
    for plane in device_planes or profile.planes:
        for line in plane.lines:
            is_ops = "XLA Ops" in line.name
            for event in line.events:
                # Op events may carry the HLO text ('%fusion.3 = ...'): keep the name.
                name = event.name.split(" ")[0].lstrip("%")
                if device_planes and is_ops:
                    per_op[name] += event.duration_ns
                elif device_planes and "XLA Modules" not in line.name:
                    kernels[event.name] += event.duration_ns
                elif not device_planes and name in names:
                    per_op[name] += event.duration_ns
    return per_op, kernels


def run_profile(args: argparse.Namespace) -> dict:
    # Per-operation trace events on XLA:CPU (the tiny mode); a no-op for GPU backends.
    flag = "--xla_cpu_enable_xprof_traceme=true"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    from jax.profiler import ProfileData

    from lbq.bench import build_step

    results = {}
    for mode in args.modes.split(","):
        bench = build_step(args.model, mode, batch=args.batch, dtype=args.dtype)
        names = categorize(bench.compiled.as_text())
        bench.run(args.warmup)
        trace_dir = os.path.join(args.trace_dir, f"{args.model}_{mode}")
        with jax.profiler.trace(trace_dir):
            wall = sum(bench.run(args.steps))
        paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        per_op, kernels = op_events(ProfileData.from_file(paths[0]), set(names))
        steps = args.steps
        by_category: collections.Counter = collections.Counter()
        by_network: collections.Counter = collections.Counter()
        unmatched = 0.0
        is_finite = sum(ns for name, ns in per_op.items() if "is-finite" in name)
        for name, ns in per_op.items():
            ms = ns / 1e6 / steps
            if name in names:
                category, line = names[name]
                by_category[category] += ms
                by_network[network_of(line)] += ms
            else:
                unmatched += ms
        top = [
            {
                "op": name,
                "ms_per_step": ns / 1e6 / steps,
                "category": names.get(name, ("unmatched", ""))[0],
                "network": network_of(names[name][1]) if name in names else "unknown",
                "hlo": names.get(name, ("", ""))[1][:240],
            }
            for name, ns in per_op.most_common(args.top)
        ]
        results[mode] = {
            "wall_ms_per_step": 1e3 * wall / steps,
            "op_ms_per_step": sum(per_op.values()) / 1e6 / steps,
            "categories_ms_per_step": dict(by_category),
            "is_finite_ms_per_step": is_finite / 1e6 / steps,
            "networks_ms_per_step": dict(by_network),
            "unmatched_ms_per_step": unmatched,
            "top_ops": top,
            "top_kernels": [
                {"kernel": k[:200], "ms_per_step": ns / 1e6 / steps}
                for k, ns in kernels.most_common(args.top)
            ],
            "trace_files": [os.path.relpath(p, args.trace_dir) for p in paths],
        }
        _print_profile(f"{args.model} {mode} batch {args.batch}", results[mode])
    return {**{k: getattr(args, k) for k in ("model", "batch", "dtype", "steps")}, "modes": results}


def _print_profile(title: str, result: dict) -> None:
    """The time per kind of operation and the slowest operations, one line each."""
    total = sum(result["categories_ms_per_step"].values()) or 1.0
    print(
        f"{title}: {result['wall_ms_per_step']:.0f} ms/step wall, "
        f"{result['op_ms_per_step']:.0f} ms/step of operation time"
    )
    ranked = sorted(result["categories_ms_per_step"].items(), key=lambda item: -item[1])
    for category, ms in ranked:
        print(f"  {category:<16}{ms:>9.1f} ms/step {100 * ms / total:>6.1f}%")
    print(f"  (of which is-finite reductions: {result['is_finite_ms_per_step']:.2f} ms/step)")
    for op in result["top_ops"]:
        print(f"{op['ms_per_step']:>8.2f} ms  {op['category']:<15}{op['hlo'][:150]}")


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    q = sub.add_parser("quantizers")
    q.add_argument("--elements", type=int, default=1 << 16)
    t = sub.add_parser("train_loss")
    t.add_argument("--model", default="resnet20")
    t.add_argument("--modes", default="fp,w2a2")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--precision", default="highest", help="jax_default_matmul_precision")
    p = sub.add_parser("profile")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--modes", default="w2a2,w2a2_kd")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace_dir", required=True)
    for each in (q, t, p):
        each.add_argument("--json", required=True, help="write the result here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    run = {"quantizers": run_quantizers, "train_loss": run_train_loss, "profile": run_profile}
    result = {**_device_info(), **run[args.task](args)}  # after: profile sets XLA_FLAGS first
    result["seconds"] = time.perf_counter() - start
    write_json(args.json, result, indent=1)
    print(f"{args.task}: done in {result['seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
