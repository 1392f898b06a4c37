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
from torch import nn

CIFAR100_MEAN = (129.304, 124.070, 112.434)
CIFAR100_STD = (68.170, 65.392, 70.418)


class RoundSTE(torch.autograd.Function):
    """round() with an identity gradient (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def quantize_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    levels = float(2**bits - 1)
    return RoundSTE.apply(z * levels) / levels


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    t = torch.tanh(w)
    max_abs = t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)
    return 2.0 * quantize_unit(t / (2.0 * max_abs) + 0.5, bits) - 1.0


def quantize_activation(a: torch.Tensor, bits: int) -> torch.Tensor:
    return quantize_unit(torch.clamp(a, 0.0, 1.0), bits)


class QConv(nn.Conv2d):
    """3x3 conv (no bias) whose weights are DoReFa-quantized, or full precision at bits=None."""

    def __init__(self, cin, cout, stride, bits):
        super().__init__(cin, cout, 3, stride, 1, bias=False)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.bits = bits

    def forward(self, x):
        w = self.weight if self.bits is None else quantize_weight(self.weight, self.bits)
        return F.conv2d(x, w, None, self.stride, self.padding)


class Act(nn.Module):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        return F.relu(x) if self.bits is None else quantize_activation(x, self.bits)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, bits, last):
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            QConv(cin, cout, stride, bits),
            nn.BatchNorm2d(cout),
            Act(bits),
        )
        self.conv2, self.bn2 = QConv(cout, cout, 1, bits), nn.BatchNorm2d(cout)
        self.act2 = Act(None if last else bits)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        residual = x
        if self.stride != 1 or self.extra:
            # Option A: subsample, zero-pad the new channels.
            residual = x[:, :, :: self.stride, :: self.stride]
            residual = F.pad(residual, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return self.act2(y + residual)


class ResNet20(nn.Module):
    def __init__(self, bits: int | None, num_classes: int = 100):
        super().__init__()
        self.stem = QConv(3, 16, 1, None)
        self.stem_bn, self.stem_act = nn.BatchNorm2d(16), Act(bits)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(3):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(Block(cin, width, stride, bits, last=stage == 2 and index == 2))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem_act(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.classifier(x.mean(dim=(2, 3)))


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
