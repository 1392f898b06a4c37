"""What a trained model is worth inside the quantized network, before any training step.

    python -m lbq.experiments.probe --start_from=RUN --out=probe.json \
        [--quantizers=dorefa/dorefa,dorefa/pact,lsq/lsq] [--bits=32,8,4] \
        [--recalibrate_bn_batches=4] [--data_dir=DIR]

For each (weight quantizer / activation quantizer) pair and bit-width k, RUN's student is
loaded into the quantized network at wKaK exactly as a fine-tuning run with
``init_from=RUN`` starts: its learned ranges (PACT clips, LSQ step sizes) are calibrated on
RUN's own weights and activations (`lbq.calibrate.start_ranges`, the run's
``quant.calibration_*`` fields). Each is then evaluated on RUN's eval split with its own
BatchNorm statistics and, with ``--recalibrate_bn_batches=N``, again after re-estimating them
over N training batches (`lbq.trainer.Trainer.evaluation_state`). The plain-ReLU network at 32
bits is the reference: RUN's own accuracy.

Top-1 values are fractions; the JSON holds ``{label: {'top1', 'top1_bn_reestimated'}}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lbq.io import write_json
from lbq.validate import whole_numbers

PAIRS = ("dorefa/dorefa", "dorefa/pact", "lsq/lsq")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lbq.experiments.probe", description=__doc__)
    p.add_argument("--start_from", required=True, help="a trained run's workdir")
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--quantizers", default=",".join(PAIRS), help="weights/activations pairs")
    bits = whole_numbers(1, 32)
    p.add_argument("--bits", type=bits, default="32,8,4", help="bit-widths k (wKaK) to probe")
    p.add_argument("--recalibrate_bn_batches", type=int, default=4, help="0: skip that column")
    p.add_argument("--data_dir", default=None, help="TFDS data dir, if not the run's")
    args = p.parse_args(argv)
    for pair in args.quantizers.split(","):
        if pair.count("/") != 1:
            p.error(f"--quantizers: {pair!r} is not weights/activations, e.g. lsq/lsq")
    return args


def probe_config(run_config, start_from: str, pair: str | None, bits: int, bn_batches: int):
    """RUN's config turned into a one-stage run that starts from RUN at wKaK (``pair`` None:
    the plain-ReLU network)."""
    from lbq.configs import default

    c = run_config.copy_and_resolve_references()
    c.model.quantized = pair is not None
    if pair is not None:
        c.quant.weight_quantizer, c.quant.activation_quantizer = pair.split("/")
    c.distill.enabled = False
    c.stochastic.enabled = False
    c.init_from = start_from
    c.eval["recalibrate_bn_batches"] = bn_batches
    c.stages = [default.stage("probe", w_bits=bits, a_bits=bits, steps=1)]
    c.progress = False
    return c


def probe_one(config) -> dict[str, float]:
    """Top-1 of the start model in ``config``'s network, with its own and with re-estimated
    BatchNorm statistics (no training step)."""
    from lbq import data as lbq_data
    from lbq.plan import parse_config
    from lbq.stages import lay_out
    from lbq.trainer import build_trainer, evaluate_split

    plan = parse_config(config)
    info = lbq_data.get_info(plan.data)
    trainer = build_trainer(plan, info)
    state = trainer.load_start_weights(trainer.init_state())
    bits = trainer.stage_bits(lay_out(plan.stages, plan.steps_per_epoch(info.num_train))[0])
    result = {"top1": evaluate_split(trainer, state, bits)["student"]["top1"]}
    if plan.calibration.recalibrate_bn_batches:
        reestimated = trainer.evaluation_state(state, bits)
        reestimated_top1 = evaluate_split(trainer, reestimated, bits)["student"]["top1"]
        result["top1_bn_reestimated"] = reestimated_top1
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from lbq.deploy.run import read_config

    run_config = read_config(args.start_from, {"data_dir": args.data_dir})
    cases = [("plain-ReLU network w32a32", None, 32)] + [
        (f"{pair} w{k}a{k}", pair, k) for pair in args.quantizers.split(",") for k in args.bits
    ]
    results = {}
    for label, pair, bits in cases:
        config = probe_config(run_config, args.start_from, pair, bits, args.recalibrate_bn_batches)
        results[label] = probe_one(config)
        text = ", ".join(f"{k} {100 * v:.2f} %" for k, v in results[label].items())
        print(f"{label}: {text}", flush=True)
        write_json(args.out, results, indent=1)  # partial results survive an interrupted probe
    return 0


if __name__ == "__main__":
    sys.exit(main())
