"""PyTorch eager reference of lbq's W2A2 ResNet-20 train step, for throughput comparisons.

The same network and step as ``python -m lbq.bench --model resnet20 --modes w2a2`` on CPU:
CIFAR ResNet-20 (option-A zero-pad shortcuts, post-activation blocks), DoReFa quantizers
(weights ``2 Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1`` per tensor; activations
``Q_k(clip(a, 0, 1))`` in place of ReLU; ``round`` straight-through), full-precision stem,
classifier, BatchNorm and residual additions, a plain ReLU after the last block; uint8 input
normalised inside the step; softmax cross-entropy over 100 classes; SGD with Nesterov momentum
0.9, weight decay 1e-4, learning rate 0.1; float32; NCHW, PyTorch's native layout.

It is written the way a PyTorch user writes it: the bit-width is a Python constant, so no
full-precision branch is computed (lbq's bit-widths are data, see lbq/quant/quantizers.py).
The network and quantizers are ``torch_fakequant.ResNet``'s (the same file also times bfloat16,
``torch.compile``, ResNet-18 and every mode of ``lbq.bench``).

Needs only torch and numpy, in its own environment:

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy
    /work/torchvenv/bin/python benchmarks/torch_reference.py --batch 128 --steps 30

``--serve`` reads commands from stdin instead (``run N`` -> JSON list of N step seconds; ``quit``),
so that ``benchmarks/cpu_compare.py`` can interleave it with other steps on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

# The network and quantizers are torch_fakequant's (run as a script, this folder is on the path).
from torch_fakequant import CIFAR100_MEAN, CIFAR100_STD, ResNet  # noqa: E402


def ResNet20(bits: int | None, num_classes: int = 100) -> ResNet:  # noqa: N802 (a class name)
    """The CIFAR ResNet-20 of ``torch_fakequant`` at ``bits`` (None: full precision)."""
    return ResNet(imagenet=False, bits=bits, num_classes=num_classes)


class Bench:
    """One model, optimizer and synthetic batch; ``run(n)`` times n train steps."""

    def __init__(self, batch: int, bits: int | None, num_classes: int = 100, seed: int = 0):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        self.model = ResNet20(bits, num_classes).train()
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        self.images = torch.from_numpy(rng.integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8))
        self.labels = torch.from_numpy(rng.integers(0, num_classes, (batch,), dtype=np.int64))
        self.mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)

    def step(self) -> float:
        x = (self.images.float() - self.mean) / self.std
        loss = F.cross_entropy(self.model(x), self.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            loss = self.step()
            times.append(time.perf_counter() - start)
        if not np.isfinite(loss):
            raise RuntimeError("non-finite loss")
        return times


def serve(bench: Bench) -> None:
    """Answers ``run N`` with a JSON list of N step times, until ``quit`` or end of input."""
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        print(json.dumps(bench.run(int(words[1]))), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bits", type=int, default=2, help="0: full precision (plain ReLU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: default)"
    )
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.batch, args.bits or None)
    bench.run(1 + args.warmup)
    if args.serve:
        serve(bench)
        return 0
    times = bench.run(args.steps)
    median = statistics.median(times)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "bits": args.bits,
                "median_step_s": median,
                "images_per_second": args.batch / median,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
