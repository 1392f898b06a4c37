"""Interleaved CPU step comparisons: lbq's train step against variants and PyTorch eager.

The CPU this runs on is shared, so absolute rates drift with other work. Every variant runs in
its own long-lived worker process (own XLA flags, own framework), and the driver runs them in
rotating order, a few steps each, for several rounds: slow periods then hit all variants alike,
and the per-round ratios to the first variant are reported next to the rates.

    python benchmarks/cpu_compare.py --rounds 8 --steps-per-round 3 \\
        --variant lbq:w2a2 --variant torch:w2a2 --variant lbq:fp --variant torch:fp

Variant specs:
  lbq:MODE[+PATCH...][@XLA_FLAGS]  lbq's step (`lbq.bench.build_step`) for a bench mode, with
                                   optional experiment patches (see `PATCHES`) and XLA flags
                                   (comma-separated, e.g. @--xla_cpu_use_thunk_runtime=false).
  torch:MODE[@THREADS]             the same step in PyTorch eager, float32
                                   (``benchmarks/torch_fakequant.py --serve``), run with
                                   --torch-python (default: this Python).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lbq.io import write_json  # noqa: E402

# ----------------------------------------------------------------------------- patches


def _patch_no_fp_select() -> None:
    """Quantizers without the full-precision ``where`` (valid only when every bit-width < 32)."""
    import jax.numpy as jnp

    from lbq.quant import layers, quantizers

    def quantize_unit(z, bits):
        levels = (jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0).astype(z.dtype)
        return quantizers.round_ste(z * levels) / levels

    def quantize_weight(w, bits, per_channel=False):
        t = jnp.tanh(w)
        max_abs = jnp.maximum(jnp.max(jnp.abs(t)), jnp.finfo(t.dtype).tiny)
        return 2.0 * quantize_unit(t / (2.0 * max_abs) + 0.5, bits) - 1.0

    def quantize_activation(a, bits):
        return quantize_unit(jnp.clip(a, 0.0, 1.0), bits)

    layers.quantize_weight = quantize_weight
    layers.quantize_activation = quantize_activation


def _patch_no_quant() -> None:
    """Quantized networks without quantizers: weights as they are, activations clipped only."""
    import jax.numpy as jnp

    from lbq.quant import layers

    layers.quantize_weight = lambda w, bits, per_channel=False: w
    layers.quantize_activation = lambda a, bits: jnp.clip(a, 0.0, 1.0)


def _patch_no_weight_quant() -> None:
    """Only the activation quantizers: weights used as they are."""
    from lbq.quant import layers

    layers.quantize_weight = lambda w, bits, per_channel=False: w


def _patch_weight_single_select() -> None:
    """The weight quantizer as it was measured with one full-precision ``where`` instead of two.
    lbq has kept the single select since, but its quantizer also gained the zero-kernel
    gradient guard and float32 level computation for narrow dtypes, so this patch is the
    simpler form, not today's lbq."""
    import jax.numpy as jnp

    from lbq.quant import layers, quantizers

    def quantize_weight(w, bits, per_channel=False):
        bits = jnp.asarray(bits, jnp.float32)
        t = jnp.tanh(w)
        axes = tuple(range(w.ndim - 1)) if per_channel else None
        max_abs = jnp.max(jnp.abs(t), axis=axes, keepdims=per_channel)
        max_abs = jnp.maximum(max_abs, jnp.finfo(t.dtype).tiny)
        levels = (jnp.exp2(jnp.minimum(bits, 24.0)) - 1.0).astype(w.dtype)
        z = t / (2.0 * max_abs) + 0.5
        quantized = 2.0 * (quantizers.round_ste(z * levels) / levels) - 1.0
        return jnp.where(bits >= quantizers.FULL_PRECISION_BITS, w, quantized)

    layers.quantize_weight = quantize_weight


def _patch_activation_vjp() -> None:
    """The activation quantizer as one custom_vjp (same values and gradients as autodiff's)."""
    import jax
    import jax.numpy as jnp

    from lbq.quant import layers, quantizers

    def forward(a, bits):
        return quantizers.quantize_unit(jnp.clip(a, 0.0, 1.0), bits)

    @jax.custom_vjp
    def quantize_activation(a, bits):
        return forward(a, bits)

    def fwd(a, bits):
        return forward(a, bits), (a, bits)

    def bwd(res, g):
        a, bits = res
        # d clip / da: 1 inside (0, 1), 0 outside, 1/2 at the ends (lax.max/min tie rule).
        inside = (a > 0) & (a < 1)
        edge = (a == 0) | (a == 1)
        scale = jnp.where(inside, 1.0, jnp.where(edge, 0.5, 0.0)).astype(g.dtype)
        return g * scale, jnp.zeros_like(bits)

    quantize_activation.defvjp(fwd, bwd)
    layers.quantize_activation = quantize_activation


def _patch_activation_barrier() -> None:
    """An optimization barrier after every block activation (ReLU or quantizer), so that XLA
    materialises it once instead of recomputing BatchNorm + activation inside later fusions."""
    import jax

    from lbq.quant import layers

    original = layers.activation

    def activation(x, precision):
        return jax.lax.optimization_barrier(original(x, precision))

    layers.activation = activation  # what quantized_activation calls, looked up at trace time


PATCHES = {
    "activation_barrier": _patch_activation_barrier,
    "activation_vjp": _patch_activation_vjp,
    "weight_single_select": _patch_weight_single_select,
    "no_fp_select": _patch_no_fp_select,
    "no_quant": _patch_no_quant,
    "no_weight_quant": _patch_no_weight_quant,
}


# ----------------------------------------------------------------------------- worker


def worker(mode: str, patches: list[str], batch: int, model: str) -> None:
    """Builds lbq's step and answers ``run N`` lines with N step times (JSON)."""
    for name in patches:
        PATCHES[name]()
    from lbq.bench import build_step

    bench = build_step(model, mode, batch=batch)
    bench.run(3)
    print(json.dumps({"ready": True, "compile_s": bench.lower_s + bench.compile_s}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        print(json.dumps(bench.run(int(words[1]))), flush=True)


# ----------------------------------------------------------------------------- driver


def _command(spec: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    kind, _, rest = spec.partition(":")
    if kind == "lbq":
        rest, _, flags = rest.partition("@")
        mode, *patches = rest.split("+")
        unknown = [p for p in patches if p not in PATCHES]
        if unknown:
            raise SystemExit(f"unknown patches {unknown}; choose from {sorted(PATCHES)}")
        if flags:
            env["XLA_FLAGS"] = " ".join(f for f in flags.split(",") if f)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
        cmd += ["--batch", str(args.batch), "--model", args.model]
        return cmd + [a for p in patches for a in ("--patch", p)], env
    if kind == "torch":
        mode, _, threads = rest.partition("@")
        cmd = [args.torch_python, os.path.join(ROOT, "benchmarks", "torch_fakequant.py")]
        cmd += ["--serve", f"--model={args.model}", f"--batch={args.batch}"]
        cmd += [f"--runs=eager:{mode or 'w2a2'}", "--dtype=float32", "--device=cpu"]
        cmd += [f"--threads={threads or 0}"]  # 0: torch's default
        return cmd, env
    raise SystemExit(f"variant {spec!r} is neither lbq:... nor torch:...")


def drive(args: argparse.Namespace) -> dict:
    """Starts every worker (one at a time), then runs them in rotating order for the rounds."""
    workers = []
    for spec in args.variant:
        cmd, env = _command(spec, args)
        if args.cpus:
            cmd = ["taskset", "-c", args.cpus, *cmd]
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        ready = json.loads(proc.stdout.readline() or "null")
        if not ready:
            raise SystemExit(f"worker {spec!r} failed to start")
        workers.append((spec, proc, ready))
        print(f"started {spec}: {ready}", file=sys.stderr, flush=True)
    times: dict[str, list[list[float]]] = {spec: [] for spec, _, _ in workers}
    start = time.time()
    for r in range(args.rounds):
        shift = r % len(workers)
        for spec, proc, _ in workers[shift:] + workers[:shift]:
            proc.stdin.write(f"run {args.steps_per_round}\n")
            proc.stdin.flush()
            times[spec].append(json.loads(proc.stdout.readline()))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for _, proc, _ in workers:
        proc.communicate("quit\n", timeout=60)
    base = args.variant[0]
    rows = []
    for spec, _, ready in workers:
        flat = [t for rnd in times[spec] for t in rnd]
        # Ratio of medians within each round, then the median over rounds: robust to drift.
        ratios = [
            statistics.median(b) / statistics.median(t)
            for t, b in zip(times[spec], times[base], strict=True)
        ]
        rows.append(
            {
                "variant": spec,
                "images_per_second": args.batch / statistics.median(flat),
                "best_images_per_second": args.batch / min(flat),
                "speed_vs_first": statistics.median(ratios),
                "speed_vs_first_range": [min(ratios), max(ratios)],
                "compile_s": ready.get("compile_s"),
                "step_times_s": times[spec],
            }
        )
    return {
        "model": args.model,
        "batch": args.batch,
        "rounds": args.rounds,
        "cpus": args.cpus,
        "steps_per_round": args.steps_per_round,
        "seconds": time.time() - start,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--torch-python", default=sys.executable)
    cpus = "pin every worker to these CPUs (taskset -c), e.g. 0 for one core"
    parser.add_argument("--cpus", default=None, help=cpus)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--patch", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.patch, args.batch, args.model)
        return 0
    if not args.variant:
        parser.error("give at least one --variant")
    report = drive(args)
    print(f"{'variant':<60}{'img/s':>9}{'best':>9}{'vs first':>10}  range")
    for row in report["rows"]:
        lo, hi = row["speed_vs_first_range"]
        print(
            f"{row['variant']:<60}{row['images_per_second']:>9.1f}"
            f"{row['best_images_per_second']:>9.1f}{row['speed_vs_first']:>10.3f}"
            f"  {lo:.2f}-{hi:.2f}"
        )
    print(f"load average after: {report['load_average_after']}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
