"""Per-layer convolution timings of ResNet-20 (batch 128, float32) in XLA:CPU or PyTorch.

For every distinct conv shape of CIFAR ResNet-20 it times the forward conv, the input gradient
and the weight gradient, each alone, and reports the fastest of ``--reps`` runs (the minimum is
the least disturbed by other work on a shared machine) and the count of such convs in the
network. Run once per framework and compare:

    python benchmarks/conv_micro.py --framework jax --json /tmp/conv_jax.json
    /work/torchvenv/bin/python benchmarks/conv_micro.py --framework torch --json /tmp/c_torch.json

XLA convs use lbq's layout (NHWC activations, HWIO kernels); PyTorch uses its native NCHW/OIHW.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lbq.io import write_json  # noqa: E402

# (name, in channels, out channels, stride, input size, kernel, count in ResNet-20)
SHAPES = (
    ("stem 3->16 @32", 3, 16, 1, 32, 3, 1),
    ("16->16 @32", 16, 16, 1, 32, 3, 6),
    ("16->32 /2 @32", 16, 32, 2, 32, 3, 1),
    ("32->32 @16", 32, 32, 1, 16, 3, 5),
    ("32->64 /2 @16", 32, 64, 2, 16, 3, 1),
    ("64->64 @8", 64, 64, 1, 8, 3, 5),
)

KEYS = ("forward_s", "input_grad_s", "weight_grad_s")


def _best(fn, reps: int) -> float:
    """Seconds of the fastest of ``reps`` calls of ``fn`` (timeit), after one untimed call."""
    fn()
    return min(timeit.repeat(fn, repeat=reps, number=1))


def jax_timings(batch: int, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rows = []
    rng = np.random.default_rng(0)
    for name, cin, cout, stride, size, k, count in SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
        conv = functools.partial(
            jax.lax.conv_general_dilated,
            window_strides=(stride, stride),
            padding=[(k // 2, k // 2)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        g = jnp.asarray(rng.standard_normal(conv(x, w).shape), jnp.float32)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
        runs = ((fwd, (x, w)), (dx, (x, w, g)), (dw, (x, w, g)))
        times = {
            key: _best(lambda fn=fn, args=args: fn(*args).block_until_ready(), reps)
            for key, (fn, args) in zip(KEYS, runs, strict=True)
        }
        rows.append({"shape": name, "count": count, **times})
    return rows


def torch_timings(batch: int, reps: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    rows = []
    torch.manual_seed(0)
    for name, cin, cout, stride, size, k, count in SHAPES:
        x = torch.randn(batch, cin, size, size)
        w = torch.randn(cout, cin, k, k)
        pad = k // 2
        g = torch.randn_like(F.conv2d(x, w, None, stride, pad))

        def run(mask, x=x, w=w, g=g, stride=stride, pad=pad):
            if mask is None:  # the forward conv
                return F.conv2d(x, w, None, stride, pad)
            return torch.ops.aten.convolution_backward(
                g, x, w, None, [stride, stride], [pad, pad], [1, 1], False, [0, 0], 1, mask
            )

        masks = zip(KEYS, (None, [True, False, False], [False, True, False]), strict=True)
        with torch.no_grad():
            times = {key: _best(lambda m=m: run(m), reps) for key, m in masks}
        rows.append({"shape": name, "count": count, **times})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--framework", choices=("jax", "torch"), required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = (jax_timings if args.framework == "jax" else torch_timings)(args.batch, args.reps)
    total = {k: sum(r[k] * r["count"] for r in rows) for k in KEYS}
    print(
        f"{args.framework}: batch {args.batch}, best of {args.reps}, milliseconds "
        f"(flags: {os.environ.get('XLA_FLAGS', '')})"
    )
    print(f"{'conv':<18}{'count':>6}{'forward':>10}{'input grad':>12}{'weight grad':>13}")
    for r in rows:
        print(
            f"{r['shape']:<18}{r['count']:>6}{1e3 * r['forward_s']:>10.2f}"
            f"{1e3 * r['input_grad_s']:>12.2f}{1e3 * r['weight_grad_s']:>13.2f}"
        )
    print(
        f"{'network total':<24}{1e3 * total['forward_s']:>10.1f}"
        f"{1e3 * total['input_grad_s']:>12.1f}{1e3 * total['weight_grad_s']:>13.1f}"
    )
    if args.json:
        report = {
            "framework": args.framework,
            "batch": args.batch,
            "reps": args.reps,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "rows": rows,
            "total": total,
            "load_average": os.getloadavg(),
        }
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
