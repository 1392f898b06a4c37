"""Evaluate a trained run without training: ``python -m lbq.evaluate --workdir=W``.

Evaluates every network of the newest readable checkpoint (or ``--step``) with lbq's own eval
step, on the run's eval split or other data (docs/deploy.md). Prints top-1, top-5 and loss as
JSON and writes the same JSON to ``--output`` (default
``WORKDIR/evaluations/step<N>-<split>[-w<W>a<A>].json``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from lbq.deploy.cli import run_command
from lbq.deploy.errors import DeployError
from lbq.io import write_json
from lbq.quant.quantizers import check_bits


def _bits_field(value: str) -> int:
    try:
        return check_bits(int(value), "bits")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _bits_summary(bits) -> dict:
    """{student: 'w2a2'} for uniform bit-widths, else the per-layer lists."""
    out = {}
    for name, (w, a) in bits.items():
        w, a = [int(v) for v in w], [int(v) for v in a]
        uniform = len(set(w)) == len(set(a)) == 1
        out[name] = f"w{w[0]}a{a[0]}" if uniform else {"w_bits": w, "a_bits": a}
    return out


def default_output(workdir: str, step: int, split: str, w_bits, a_bits) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")
    bits = (f"w{w_bits}" if w_bits else "") + (f"a{a_bits}" if a_bits else "")
    if bits:
        label += f"-{bits}"
    return os.path.join(workdir, "evaluations", f"step{step}-{label}.json")


def evaluate_command(args: argparse.Namespace) -> int:
    from lbq.deploy import run as runs

    run = runs.load_run(args.workdir, args.step, data_dir=None if args.dataset else args.data_dir)
    bits = run.bits(args.w_bits, args.a_bits)
    overrides = {"eval_split": args.split, "name": args.dataset}
    if args.dataset:
        overrides["data_dir"] = args.data_dir
    if args.recalibrate_bn_batches is not None and args.recalibrate_bn_batches < 0:
        raise DeployError(f"--recalibrate_bn_batches={args.recalibrate_bn_batches} must be >= 0")
    results, data = runs.evaluate(run, bits, overrides, args.recalibrate_bn_batches)
    record = {
        "workdir": run.workdir,
        "step": run.step,
        "stage": run.stage.name,
        "data": data,
        "bits": _bits_summary(bits),
        "quantizers": dict(zip(("weight", "activation"), run.quantizers(), strict=True)),
        "results": results,
    }
    print(json.dumps(record, indent=2))
    path = args.output or default_output(
        run.workdir, run.step, data["split"], args.w_bits, args.a_bits
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, record)
    print(f"lbq: wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lbq.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the run's folder")
    p.add_argument("--step", type=int, default=None, help="a saved step (default: newest)")
    p.add_argument("--split", default=None, help="eval split (default: the run's)")
    p.add_argument("--dataset", default=None, help="evaluate on this dataset instead")
    p.add_argument("--data_dir", default=None, help="TFDS data dir of the dataset")
    p.add_argument("--w_bits", type=_bits_field, default=None, help="students' weight bits")
    p.add_argument("--a_bits", type=_bits_field, default=None, help="students' act. bits")
    p.add_argument(
        "--recalibrate_bn_batches",
        type=int,
        default=None,
        help="re-estimate BatchNorm statistics over N training batches first (default: the "
        "run's eval.recalibrate_bn_batches)",
    )
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    return run_command(lambda: evaluate_command(args))


if __name__ == "__main__":
    sys.exit(main())
