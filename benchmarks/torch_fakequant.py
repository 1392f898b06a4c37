"""PyTorch fake-quant ResNets with a straight-through estimator: lbq's train steps in PyTorch.

The modes of ``lbq.bench.MODES``, timed in eager and ``torch.compile`` (docs/accelerator.md,
"speed", lists what differs). One JSON line per (backend, mode) on stdout, also appended to
``--jsonl``:

    python benchmarks/torch_fakequant.py --model resnet18 --batch 256 --modes w2a2,w2a2_kd \\
        --backends eager,compile --dtype bfloat16 --steps 20

``--serve`` builds the first (backend, mode) and answers ``run N`` lines on stdin with a JSON
list of N step seconds until ``quit`` (for benchmarks/cpu_compare.py). Needs torch and numpy.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MODES = ("fp", "w4a4", "w2a2", "w2a2_sp", "w2a2_kd")
MODELS = ("resnet20", "resnet18")
CIFAR100_MEAN = (129.304, 124.070, 112.434)
CIFAR100_STD = (68.170, 65.392, 70.418)
IMAGENET_MEAN = (123.675, 116.280, 103.530)
IMAGENET_STD = (58.395, 57.120, 57.375)
SP_PROBABILITY = 0.5  # stochastic precision at the start of a stage (lbq's p_start)
KD_WEIGHTS = {"student_ce": 0.7, "student_kl": 0.7, "teacher_ce": 1.0, "teacher_kl": 0.5}


# ----------------------------------------------------------------------------- quantizers


class RoundSTE(torch.autograd.Function):
    """round() with an identity gradient (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def quantize_unit(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``round((2^k - 1) z) / (2^k - 1)`` with a straight-through round."""
    levels = float(2**bits - 1)
    return RoundSTE.apply(z * levels) / levels


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weights, per tensor: ``2 Q_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1``."""
    t = torch.tanh(w)
    max_abs = t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)
    return 2.0 * quantize_unit(t / (2.0 * max_abs) + 0.5, bits) - 1.0


# ----------------------------------------------------------------------------- layers


class Precision(nn.Module):
    """Which blocks run quantized: a per-block 0/1 buffer, redrawn each step under stochastic
    precision (a buffer, so ``torch.compile`` reads it as an input and never recompiles)."""

    def __init__(self, bits: int | None, num_blocks: int, stochastic: bool):
        super().__init__()
        self.bits = bits
        self.stochastic = stochastic
        self.register_buffer("mask", torch.ones(num_blocks, dtype=torch.bool))

    def redraw(self) -> None:
        if self.stochastic:
            self.mask.copy_(torch.rand(self.mask.shape, device=self.mask.device) < SP_PROBABILITY)

    def weight(self, w: torch.Tensor, block: int) -> torch.Tensor:
        if self.bits is None:
            return w
        q = quantize_weight(w, self.bits)
        return torch.where(self.mask[block], q, w) if self.stochastic else q

    def act(self, x: torch.Tensor, block: int | None) -> torch.Tensor:
        """ReLU in a full-precision network or at ``block=None``; else clip and quantize."""
        if self.bits is None or block is None:
            return F.relu(x)
        clipped = torch.clamp(x, 0.0, 1.0)
        q = quantize_unit(clipped, self.bits)
        return torch.where(self.mask[block], q, clipped) if self.stochastic else q


class QConv(nn.Conv2d):
    """Conv (no bias) whose weights are quantized by ``precision`` as part of ``block``;
    ``block=None`` keeps it in full precision (the stem)."""

    def __init__(self, cin, cout, kernel, stride, precision: Precision, block: int | None):
        super().__init__(cin, cout, kernel, stride, kernel // 2, bias=False)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.block = block
        # A plain attribute, not a submodule: every layer shares the network's one Precision.
        object.__setattr__(self, "precision", precision)

    def forward(self, x):
        w = self.weight if self.block is None else self.precision.weight(self.weight, self.block)
        return F.conv2d(x, w, None, self.stride, self.padding)


class BasicBlock(nn.Module):
    """Post-activation basic block; ``projection``: a quantized 1x1 conv + BN shortcut (ImageNet
    ResNets), else option A (subsample and zero-pad, CIFAR ResNets)."""

    def __init__(self, cin, cout, stride, precision, index, last, projection):
        super().__init__()
        self.conv1 = QConv(cin, cout, 3, stride, precision, index)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QConv(cout, cout, 3, 1, precision, index)
        self.bn2 = nn.BatchNorm2d(cout)
        changes = stride != 1 or cin != cout
        self.shortcut = None
        if changes and projection:
            self.shortcut = nn.Sequential(
                QConv(cin, cout, 1, stride, precision, index), nn.BatchNorm2d(cout)
            )
        self.pad = cout - cin if changes and not projection else 0
        self.stride, self.index, self.last = stride, index, last
        object.__setattr__(self, "precision", precision)

    def forward(self, x):
        y = self.precision.act(self.bn1(self.conv1(x)), self.index)
        y = self.bn2(self.conv2(y))
        if self.shortcut is not None:
            residual = self.shortcut(x)
        elif self.stride != 1 or self.pad:
            residual = x[:, :, :: self.stride, :: self.stride]
            residual = F.pad(residual, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            residual = x
        return self.precision.act(y + residual, None if self.last else self.index)


class ResNet(nn.Module):
    """CIFAR ResNet-20 (``imagenet=False``) or ImageNet ResNet-18, fake-quantized at ``bits``
    (None: the full-precision network with plain ReLU)."""

    def __init__(
        self, imagenet: bool, bits: int | None, num_classes: int, stochastic: bool = False
    ):
        super().__init__()
        if imagenet:
            stages, widths, stem = (2, 2, 2, 2), (64, 128, 256, 512), 64
        else:
            stages, widths, stem = (3, 3, 3), (16, 32, 64), 16
        self.precision = Precision(bits, sum(stages), stochastic and bits is not None)
        self.imagenet = imagenet
        self.stem = QConv(3, stem, 7 if imagenet else 3, 2 if imagenet else 1, self.precision, None)
        self.stem_bn = nn.BatchNorm2d(stem)
        blocks, cin = [], stem
        for stage, (count, width) in enumerate(zip(stages, widths, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                last = stage == len(stages) - 1 and i == count - 1
                blocks.append(
                    BasicBlock(cin, width, stride, self.precision, len(blocks), last, imagenet)
                )
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        # The stem's activation takes the first block's precision (lbq/models/resnet.py).
        x = self.precision.act(self.stem_bn(self.stem(x)), 0)
        if self.imagenet:
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.blocks(x)
        return self.classifier(x.mean(dim=(2, 3)).float())


# ----------------------------------------------------------------------------- step


def kl_divergence(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` at T = 1, batch mean; target is constant."""
    log_p = F.log_softmax(target_logits.detach().float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


class Bench:
    """One (backend, mode) of ``args.model``: networks, optimizer, a device batch, the step.

    ``args`` is the parsed command line (model, batch, image_size, dtype, compile_mode,
    compile_backend); ``backend``: 'eager' or 'compile'; ``mode``: one of `MODES`.
    """

    def __init__(
        self, args: argparse.Namespace, backend: str, mode: str, device: str, seed: int = 0
    ):
        torch.manual_seed(seed)
        imagenet = args.model == "resnet18"
        classes = 1000 if imagenet else 100
        size = args.image_size or (224 if imagenet else 32)
        self.device = torch.device(device)
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
        cuda = self.device.type == "cuda"
        memory_format = torch.channels_last if cuda else torch.contiguous_format
        bits = None if mode == "fp" else (4 if mode == "w4a4" else 2)
        student = ResNet(imagenet, bits, classes, stochastic=mode == "w2a2_sp")
        teacher = [ResNet(imagenet, None, classes)] if mode == "w2a2_kd" else []
        nets = [student, *teacher]
        self.nets = [n.to(self.device, memory_format=memory_format).train() for n in nets]
        params = [p for n in self.nets for p in n.parameters()]
        kwargs = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
        try:  # fused SGD (one kernel for the whole update) where this torch has it
            self.opt = torch.optim.SGD(params, fused=cuda, **kwargs)
        except (TypeError, RuntimeError):
            self.opt = torch.optim.SGD(params, **kwargs)
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, (args.batch,), dtype=np.int64)
        self.images, self.labels = (torch.from_numpy(a).to(self.device) for a in (images, labels))
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (CIFAR100_MEAN, CIFAR100_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.image_size = size
        self.loss_fn = self._loss
        if backend == "compile":
            self.loss_fn = torch.compile(
                self._loss, mode=args.compile_mode, backend=args.compile_backend
            )
        self.last_loss = None

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 -> NCHW view with channels-last strides, normalised in float32.
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
            logits = [net(x) for net in self.nets]
        student = F.cross_entropy(logits[0], labels)
        if len(logits) == 1:
            return student
        s, t = logits
        w = KD_WEIGHTS
        student = w["student_ce"] * student + w["student_kl"] * kl_divergence(s, t)
        teacher_ce = F.cross_entropy(t, labels)
        return student + (w["teacher_ce"] * teacher_ce + w["teacher_kl"] * kl_divergence(t, s))

    def step(self) -> None:
        """One train step, not waited for."""
        self.nets[0].precision.redraw()
        loss = self.loss_fn(self.images, self.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_steps(self, n: int) -> list[float]:
        """Runs ``n`` steps, each waited for; returns their seconds."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return times

    def pipelined(self, n: int) -> float:
        """Seconds for ``n`` steps dispatched back to back with one wait at the end."""
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        return time.perf_counter() - start


def run_one(args: argparse.Namespace, backend: str, mode: str, device: str) -> dict:
    """Times one (model, mode, backend) as ``lbq.bench.run_mode`` does (first step, warm-up,
    timed steps each waited for, then as many back to back); returns the JSON record.
    ``compile_s`` is the first step minus the median; ``peak_bytes`` is CUDA's
    ``max_memory_allocated``, or the process's peak RSS on CPU (``peak_kind``).

    Raises:
      RuntimeError: when the loss is not finite.
    """
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    bench = Bench(args, backend, mode, device)
    first = bench.timed_steps(1)[0]
    bench.timed_steps(args.warmup)
    times = bench.timed_steps(args.steps)
    pipelined = bench.pipelined(args.steps)
    loss, image_size = float(bench.last_loss), bench.image_size
    if not math.isfinite(loss):
        raise RuntimeError(f"{args.model} {mode} {backend}: the loss is not finite")
    median = statistics.median(times)
    if cuda:
        peak, peak_kind = int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process peak RSS (ru_maxrss)"
        name = platform.processor() or platform.machine()
    del bench
    if backend == "compile":
        torch._dynamo.reset()  # drop the compiled graphs, and the networks they hold on to
    gc.collect()
    compiled = backend == "compile"
    return {
        "framework": "torch",
        "backend": backend,
        "compile_mode": args.compile_mode if compiled else None,
        "compile_backend": args.compile_backend if compiled else None,
        "model": args.model,
        "mode": mode,
        "batch": args.batch,
        "image_size": image_size,
        "dtype": args.dtype,
        "images_per_second": args.batch / median,
        "pipelined_images_per_second": args.batch * args.steps / pipelined,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "first_step_s": first,
        "compile_s": max(first - median, 0.0) if compiled else None,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "loss": loss,
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=MODELS)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, in order")
    parser.add_argument("--backends", default="eager,compile", help="eager and/or compile")
    runs = "comma-separated BACKEND:MODE pairs, run in this order (instead of every mode of"
    parser.add_argument("--runs", help=f"{runs} each backend), e.g. eager:w2a2,compile:w2a2")
    parser.add_argument("--batch", type=int, default=None, help="default 512 (32 px), 256")
    parser.add_argument("--image_size", type=int, default=None, help="default 32 / 224")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile_mode", default="default", help="torch.compile mode")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per result here")
    parser.add_argument("--serve", action="store_true", help="answer 'run N' lines on stdin")
    args = parser.parse_args(argv)
    if args.runs:
        pairs = [r.split(":", 1) if ":" in r else ("", r) for r in args.runs.split(",")]
    else:
        # Every mode of one backend before the next, so that a budget that runs out mid-way
        # has cost the cheap eager figures nothing.
        pairs = [(b, m) for b in args.backends.split(",") for m in args.modes.split(",")]
    for backend, mode in pairs:
        if mode not in MODES:
            parser.error(f"mode {mode!r} is not one of {MODES}")
        if backend not in ("eager", "compile"):
            parser.error(f"backend {backend!r} is not eager or compile")
    args.pairs = [tuple(p) for p in pairs]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.batch = args.batch or (256 if args.model == "resnet18" else 512)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as a tuned PyTorch training script sets it
    if args.serve:  # answers 'run N' with a JSON list of N step seconds, until 'quit' or EOF
        bench = Bench(args, *args.pairs[0], device)
        bench.timed_steps(1 + args.warmup)
        print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            print(json.dumps(bench.timed_steps(int(words[1]))), flush=True)
        return 0
    for backend, mode in args.pairs:
        line = json.dumps(run_one(args, backend, mode, device))
        print(line, flush=True)
        if args.jsonl:  # written as each result comes, so a stopped process loses only its last
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
