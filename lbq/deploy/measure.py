"""Measure an export against lbq's fake-quantized forward: agreement, logit differences, sizes.

    python -m lbq.deploy.measure --workdir=W [--step=N] [--images=K] [--exact_images=K]
        [--qonnx_images=K] [--json=PATH]

Exports the checkpoint at its stage's bit-widths into a temporary folder, reads the files back,
and on the first K images of the run's eval split compares with lbq's fake-quantized forward:

- the integer forward (float32 full-precision parts) with lbq in float32: the deployment figure;
- the QONNX graph, run by qonnx's executor, with lbq in float32;
- the integer forward with float64 parts with lbq's model code in float64 (JAX x64): whether
  the integer arithmetic computes exactly the quantized network (``--exact_images=0`` skips it);
- for a run that evaluates in another dtype (bfloat16), lbq in that dtype with lbq in float32:
  the reference is float32, and this says how far the run's own evaluation lies from it.

Prints one block per network and writes the figures, timings, sizes, machine and software
versions as JSON. Performance is printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np

from lbq.bench import cpu_model
from lbq.deploy.cli import run_command
from lbq.io import write_json


def machine() -> dict[str, Any]:
    import importlib.metadata

    import jax

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        # qonnx has no __version__: the installed distributions' own records.
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "qonnx": importlib.metadata.version("qonnx"),
    }


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_network(
    run, net, folder: str, images, labels, qonnx_count: int, exact_count: int
) -> dict[str, Any]:
    """Agreement figures and timings of one exported network."""
    from lbq.deploy.integer import IntegerForward
    from lbq.deploy.package import load_model
    from lbq.deploy.qonnx_export import run_qonnx
    from lbq.deploy.verify import fake_quant_logits, logit_agreement

    model = load_model(folder, net.name, check_qonnx=True)
    w_bits = [layer["w_bits"] for layer in model.program.layers]
    a_bits = [layer["a_bits"] for layer in model.program.layers]
    mean, std = run.info.mean, run.info.std
    variables = run.variables[net.name]
    lbq32, t_lbq = _timed(
        lambda: fake_quant_logits(net.model, variables, w_bits, a_bits, images, mean, std)
    )
    integer32, t_int = _timed(lambda: IntegerForward(model.program, mean, std)(images))
    q = images[:qonnx_count]
    qonnx32, t_qonnx = _timed(lambda: run_qonnx(model.file("qonnx"), q, batch_size=250))
    exact = None
    if exact_count > 0:
        e = images[:exact_count]
        lbq64 = fake_quant_logits(
            net.model, _float64(variables), w_bits, a_bits, e, mean, std, float64=True
        )
        with _x64():
            from lbq.deploy.program import build_program

            exact_program = build_program(
                net.model,
                _float64(variables),
                w_bits,
                a_bits,
                image_size=int(run.info.image_shape[0]),
                quantizers=run.quantizers(),
            )
        integer64 = IntegerForward(exact_program, mean, std, float_dtype=np.float64)(e)
        exact = logit_agreement(lbq64, integer64)
    own = _run_forward(net, variables, w_bits, a_bits, images, labels, mean, std, lbq32)
    return {
        "bits": sorted({(w, a) for w, a in zip(w_bits, a_bits, strict=True)}),
        "top1_accuracy": {
            "lbq_float32": float(np.mean(np.argmax(lbq32, -1) == labels)),
            "integer": float(np.mean(np.argmax(integer32, -1) == labels)),
            "qonnx": float(np.mean(np.argmax(qonnx32, -1) == labels[: len(q)])),
        },
        "integer_vs_lbq_float32": logit_agreement(lbq32, integer32),
        "qonnx_vs_lbq_float32": logit_agreement(lbq32[: len(q)], qonnx32),
        "integer_float64_vs_lbq_float64": exact,
        "run_forward": own,
        "seconds": {"lbq_float32": t_lbq, "integer": t_int, "qonnx": t_qonnx},
        "images_per_second": {
            "lbq_float32": len(images) / t_lbq,
            "integer": len(images) / t_int,
            "qonnx": len(q) / t_qonnx,
        },
        "size": model.entry["size"],
        "packed_file_bytes": model.entry["packed_file_bytes"],
    }


def _run_forward(net, variables, w_bits, a_bits, images, labels, mean, std, lbq32):
    """lbq in the run's own compute dtype against lbq in float32, or None for a float32 run."""
    import jax.numpy as jnp

    from lbq.deploy.verify import fake_quant_logits, logit_agreement

    dtype = jnp.dtype(getattr(net.model, "dtype", None) or jnp.float32)
    if dtype == jnp.float32:
        return None
    own = fake_quant_logits(net.model, variables, w_bits, a_bits, images, mean, std, dtype=dtype)
    return {
        "dtype": dtype.name,
        "top1_accuracy": float(np.mean(np.argmax(own, -1) == labels)),
        "vs_lbq_float32": logit_agreement(lbq32, own),
    }


def _float64(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _x64():
    import jax

    return jax.enable_x64(True)


def _line(label: str, c: dict[str, Any]) -> str:
    return (
        f"  {label:<32} {c['images']:>6} images  top-1 agreement {100 * c['top1_agreement']:7.3f} %"
        f" ({c['top1_mismatches']} differ)  max |dlogit| {c['max_abs_diff']:.2e}"
        f"  p99.9 {c['p999_abs_diff']:.2e}  max rel {c['max_rel_diff']:.2e}"
        f"  within rtol {100 * c['within_tolerance']:.2f} %"
    )


def report(name: str, result: dict[str, Any]) -> str:
    size = result["size"]
    lines = [f"{name}: bits {result['bits']}"]
    for kind in ("quantized_convs", "quantized_dense"):
        if kind in size:
            s = size[kind]
            lines.append(
                f"  {kind}: {s['float32_bytes']:,} B float32 -> {s['packed_bytes']:,} B packed "
                f"(1/{1 / s['fraction_of_float32']:.2f})"
            )
    lines.append(
        f"  all arrays {size['all_float32_bytes']:,} B float32 -> packed file "
        f"{result['packed_file_bytes']:,} B"
    )
    acc = result["top1_accuracy"]
    lines.append(
        f"  top-1 accuracy: lbq {100 * acc['lbq_float32']:.2f} %, integer "
        f"{100 * acc['integer']:.2f} %, qonnx {100 * acc['qonnx']:.2f} %"
    )
    lines.append(_line("integer vs lbq (float32)", result["integer_vs_lbq_float32"]))
    lines.append(_line("qonnx vs lbq (float32)", result["qonnx_vs_lbq_float32"]))
    if result["integer_float64_vs_lbq_float64"] is not None:
        lines.append(_line("integer vs lbq (float64)", result["integer_float64_vs_lbq_float64"]))
    own = result.get("run_forward")
    if own:
        lines.append(
            f"  the run evaluates in {own['dtype']}: top-1 accuracy "
            f"{100 * own['top1_accuracy']:.2f} % there (the reference above is float32)"
        )
        lines.append(_line(f"lbq {own['dtype']} vs lbq (float32)", own["vs_lbq_float32"]))
    ips = result["images_per_second"]
    lines.append(
        "  images/s: lbq " + f"{ips['lbq_float32']:.0f}, integer {ips['integer']:.1f}, "
        f"qonnx {ips['qonnx']:.1f}"
    )
    return "\n".join(lines)


def check_arguments(args: argparse.Namespace) -> None:
    """Raises DeployError (one line) for an out-of-range count."""
    from lbq.deploy.errors import DeployError

    for field, low, meaning in (
        ("images", 1, "eval images to compare on"),
        ("qonnx_images", 0, "0: all --images"),
        ("exact_images", 0, "0: no float64 check"),
    ):
        value = getattr(args, field)
        if value < low:
            raise DeployError(f"--{field}={value} must be >= {low} ({meaning})")


def measure_command(args: argparse.Namespace) -> int:
    from lbq.deploy import run as runs
    from lbq.export import export

    check_arguments(args)
    run = runs.load_run(args.workdir, args.step, data_dir=args.data_dir)
    images, labels = run.eval_images(args.images)
    qonnx_count = min(args.qonnx_images or len(images), len(images))
    exact_count = min(args.exact_images, len(images))
    record = {
        "workdir": run.workdir,
        "step": run.step,
        "stage": run.stage.name,
        "data": f"first {len(images)} images of {run.plan.data.name}[{run.plan.data.eval_split}]",
        "machine": machine(),
        "networks": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        export(run, os.path.join(folder, "model"))
        for net in run.students:
            result = measure_network(
                run, net, os.path.join(folder, "model"), images, labels, qonnx_count, exact_count
            )
            record["networks"][net.name] = result
            print(report(net.name, result), flush=True)
    if args.json:
        write_json(args.json, record, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbq.deploy.measure", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--images", type=int, default=1000, help="eval images to compare on")
    parser.add_argument("--qonnx_images", type=int, default=0, help="0: all --images")
    parser.add_argument(
        "--exact_images", type=int, default=500, help="for the float64 check (0: skip it)"
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    return run_command(lambda: measure_command(args))


if __name__ == "__main__":
    sys.exit(main())
