"""Top-1 of a trained run's weights inside the quantized network, before any fine-tuning.

    python docs/results/finetune/probe_start_model.py RUN_DIR OUT.json

Loads the student of RUN_DIR into a plain-ReLU network at 32 bits and into the quantized
network (clip(0, 1) activations) at 32, 8, 4 and 2 bits, and evaluates each on the run's eval
split with no training step: what a fine-tuning run starts from.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import default  # noqa: E402
from lbq import data as lbq_data  # noqa: E402
from lbq import train  # noqa: E402
from lbq.steps import make_eval_step  # noqa: E402


def probe(run_dir: str) -> dict[str, float]:
    with open(os.path.join(run_dir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    info = lbq_data.get_info(config.data)
    mesh = train.data_mesh()
    replicated, batches = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    out = {}
    for quantized, bits in [(False, 32), (True, 32), (True, 8), (True, 4), (True, 2)]:
        c = ml_collections.ConfigDict(config.to_dict())
        c.model.quantized = quantized
        c.distill.enabled = False
        c.stages = [default.stage("probe", w_bits=bits, a_bits=bits, steps=1)]
        networks = train.build_networks(c, info)
        stage = train.build_run_stages(c, networks, info.num_train // c.batch_size)[0]
        optimizer = train.build_optimizer(c, networks)
        state = train.init_state(c, networks, optimizer, info, replicated)
        state = train._load_into(state, run_dir, {"student": "student"}, "probe")
        eval_step = jax.jit(make_eval_step(networks, info.mean, info.std))
        bits_now = train.stage_bits(stage, networks)
        top1 = train.evaluate(c, state, eval_step, bits_now, batches)["student"]["top1"]
        key = f"{'quantized network' if quantized else 'plain-ReLU network'} w{bits}a{bits}"
        out[key] = top1
        print(f"{key}: top-1 {100 * top1:.2f} %", flush=True)
    return out


if __name__ == "__main__":
    result = probe(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f, indent=1)
