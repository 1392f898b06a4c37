"""Training-step benchmark: images/s, compile time and peak memory of lbq's real train step.

Run from the repository root, for example (one GPU, the issue's ResNet-18 targets):

    python -m lbq.bench --model resnet18 --batch 256 --json /tmp/bench.json

The step is the trainer's own: networks, optimizer, state and stage bit-widths are built with
`lbq.trainer.build_trainer` from lbq's default config (`lbq/configs/default.py`) with the
mode's bits and methods, exactly as the trainer builds them: the same jitted step, shardings
(replicated state, batch sharded over a ('data',) mesh) and donation. The data is one
synthetic batch that already lives on the device, so the figures are the step's alone, not
the input pipeline's (``benchmarks/input_pipeline.py`` measures that).

Timing: every step is dispatched and then waited for (``block_until_ready``); the reported rate
is ``batch / median(step seconds)`` over the timed steps after warm-up. The same number of steps
is then also dispatched back to back with one wait at the end, as the trainer runs them
(``pipelined_images_per_second``, "async" in the table): the difference is the host's dispatch
time per step, which the trainer hides behind device work. Compile time is
``jit(...).lower(...)`` plus ``.compile()`` (ahead of time; the first step's execution is not
included). Peak memory is ``device.memory_stats()['peak_bytes_in_use']`` where the backend has
it (GPU, TPU); on CPU it is the process's peak resident set size (``ru_maxrss``), which includes
the Python interpreter and XLA itself. Each (model, mode) runs in its own subprocess by default so
that the peak belongs to that mode alone.

The bench needs jax, flax, optax, orbax, ml_collections and numpy: tensorflow-datasets and grain
are not imported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import runpy
import statistics
import subprocess
import sys
import time
from typing import Any

from lbq.io import write_json
from lbq.models import SMALL_INPUT_MODELS

# The paper's methods (the default set, mirrored by benchmarks/torch_fakequant.py) and the
# learned-range quantizers at W2A2: PACT activations, LSQ weights and activations. A
# "_conv_input" mode is the same with model.activation_placement='conv_input' (SPEC section 9).
DEFAULT_MODES = ("fp", "w4a4", "w2a2", "w2a2_sp", "w2a2_kd")
_CONV_INPUT = "_conv_input"
MODES = (
    *DEFAULT_MODES,
    "w2a2_pact",
    "w2a2_lsq",
    *(f"{m}{_CONV_INPUT}" for m in ("w2a2", "w2a2_sp", "w2a2_kd", "w2a2_pact", "w2a2_lsq")),
)
MODELS = ("resnet20", "resnet18", "resnet50")
# The paper's recipes: CIFAR-100 for the CIFAR ResNets (32 px), ImageNet for the others (224 px).
# The stochastic-precision stage is made this long so that p(t) stays near its start value and
# the timed steps see random masks, as in the first part of a real stage.
_SP_STAGE_STEPS = 100_000
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout of lbq


@dataclasses.dataclass
class Result:
    """One benchmarked (model, mode); the rates, times and peak as the module docstring defines
    them (seconds, bytes). ``step_times_s``: every timed step, in order; ``first_step_s``: the
    first execution after compiling; ``compiled_temp_bytes``: XLA's temporary buffer size of the
    compiled step, None where the backend does not report it."""

    model: str
    mode: str
    batch: int
    image_size: int
    dtype: str
    images_per_second: float
    pipelined_images_per_second: float
    median_step_s: float
    min_step_s: float
    max_step_s: float
    step_times_s: list[float]
    lower_s: float
    compile_s: float
    first_step_s: float
    peak_bytes: int
    peak_kind: str
    compiled_temp_bytes: int | None
    device: str
    backend: str
    num_devices: int


# ----------------------------------------------------------------------------- config


def mode_config(model: str, mode: str, batch: int, dtype: str = "auto"):
    """The run config of one benchmark mode (see `MODES`): lbq's default config with the
    mode's bits and methods, and one long constant-rate stage."""
    from lbq.configs import default

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    config = default.get_config()
    if mode.endswith(_CONV_INPUT):
        config.model.activation_placement = "conv_input"
        mode = mode.removesuffix(_CONV_INPUT)
    config.model.name = model
    config.batch_size = batch
    config.compute_dtype = dtype
    config.model.quantized = mode != "fp"
    bits = 32 if mode == "fp" else 4 if mode == "w4a4" else 2
    config.stages = [
        default.stage(
            "bench", w_bits=bits, a_bits=bits, steps=_SP_STAGE_STEPS, lr_schedule="constant"
        )
    ]
    config.stochastic.enabled = mode == "w2a2_sp"
    config.distill.enabled = mode == "w2a2_kd"
    config.distill.teacher = "joint"
    if mode == "w2a2_pact":
        config.quant.activation_quantizer = "pact"
    if mode == "w2a2_lsq":
        config.quant.weight_quantizer = config.quant.activation_quantizer = "lsq"
    return config


@dataclasses.dataclass
class StepBench:
    """The trainer's compiled step for one (model, mode), its state and a device batch.

    Build it with `build_step`; ``run(n)`` executes n steps and returns their seconds.
    """

    compiled: Any
    state: Any
    device_batch: Any
    hparams: Any
    model: str
    mode: str
    image_size: int
    dtype: str
    lower_s: float
    compile_s: float
    step_index: int = 0
    metrics: Any = None

    def step(self) -> float:
        """One step, waited for; returns its seconds (dispatch to completion)."""
        return self.run_pipelined(1)

    def run_pipelined(self, n: int) -> float:
        """Dispatches ``n`` steps back to back, as the trainer does, and waits once at the end;
        returns the total seconds (host dispatch overlaps device work)."""
        import jax

        start = time.perf_counter()
        for _ in range(n):
            hparams = self.hparams(self.step_index)
            self.state, self.metrics = self.compiled(self.state, self.device_batch, hparams)
            self.step_index += 1
        jax.block_until_ready((self.state, self.metrics))
        return time.perf_counter() - start

    def run(self, n: int) -> list[float]:
        """Runs ``n`` steps; returns each one's seconds. Raises if the loss is not finite."""
        import numpy as np

        times = [self.step() for _ in range(n)]
        if n and not np.isfinite(float(self.metrics["loss"])):
            raise RuntimeError(f"{self.model} {self.mode}: the step's loss is not finite")
        return times


def build_step(model: str, mode: str, *, batch: int, dtype: str = "auto") -> StepBench:
    """Builds and compiles the trainer's train step for ``mode`` on a synthetic batch.

    Args:
      model: a network name of `lbq.models`.
      mode: one of `MODES`.
      batch: global batch.
      dtype: the config's compute_dtype ('auto': bfloat16 on accelerators, float32 on CPU).
    """
    import jax
    import numpy as np

    from lbq.data.config import DatasetInfo, known_stats
    from lbq.plan import parse_config
    from lbq.stages import lay_out
    from lbq.trainer import build_trainer

    config = mode_config(model, mode, batch, dtype)
    cifar = model in SMALL_INPUT_MODELS
    size = 32 if cifar else 224
    classes = 100 if cifar else 1000
    mean, std = known_stats("cifar100" if cifar else "imagenet2012")
    info = DatasetInfo("synthetic", classes, (size, size, 3), 50_000, 10_000, mean, std)
    trainer = build_trainer(parse_config(config, num_devices=jax.device_count()), info)
    stage = lay_out(trainer.plan.stages, steps_per_epoch=1)[0]
    state = trainer.start_stage(trainer.init_state(), stage)
    bits = trainer.stage_bits(stage)
    rng = np.random.default_rng(0)
    device_batch = jax.device_put(
        {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, classes, (batch,), dtype=np.int32),
        },
        trainer.batch_sharding,
    )

    def hparams(step: int) -> dict:
        # As the trainer: host learning rates each step, device bit-widths for the stage.
        return {"lr": {k: np.float32(stage.learning_rate(step, k)) for k in stage.lr}, "bits": bits}

    t0 = time.perf_counter()
    lowered = trainer.train_step.lower(state, device_batch, hparams(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return StepBench(
        compiled=compiled,
        state=state,
        device_batch=device_batch,
        hparams=hparams,
        model=model,
        mode=mode,
        image_size=size,
        dtype=str(np.dtype(trainer.networks[0].model.dtype)),
        lower_s=t1 - t0,
        compile_s=t2 - t1,
    )


def run_mode(
    model: str,
    mode: str,
    *,
    batch: int,
    steps: int = 30,
    warmup: int = 3,
    profile_dir: str | None = None,
    profile_steps: int = 3,
    dtype: str = "auto",
) -> Result:
    """Builds the trainer's step for ``mode`` and times it on a synthetic on-device batch.

    Args:
      model, mode, batch, dtype: as `build_step`.
      steps: timed steps (the median is reported).
      warmup: untimed steps after the first.
      profile_dir: if set, a `jax.profiler` trace of ``profile_steps`` more steps goes here.
      profile_steps: steps in the trace.
    """
    import jax

    bench = build_step(model, mode, batch=batch, dtype=dtype)
    temp_bytes = None
    with contextlib.suppress(Exception):  # not every backend reports it
        temp_bytes = int(bench.compiled.memory_analysis().temp_size_in_bytes)
    first = bench.run(1)[0]
    bench.run(warmup)
    times = bench.run(steps)
    pipelined = bench.run_pipelined(steps)
    if profile_dir:
        with jax.profiler.trace(os.path.join(profile_dir, f"{model}_{mode}")):
            for i in range(profile_steps):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    bench.step()

    device = jax.devices()[0]
    stats = None
    with contextlib.suppress(Exception):
        stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak, peak_kind = int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    else:  # ru_maxrss is in KiB on Linux and in bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        peak_kind = "process peak RSS (ru_maxrss)"
    median = statistics.median(times)
    return Result(
        model=model,
        mode=mode,
        batch=batch,
        image_size=bench.image_size,
        dtype=bench.dtype,
        images_per_second=batch / median,
        pipelined_images_per_second=batch * steps / pipelined,
        median_step_s=median,
        min_step_s=min(times),
        max_step_s=max(times),
        step_times_s=times,
        lower_s=bench.lower_s,
        compile_s=bench.compile_s,
        first_step_s=first,
        peak_bytes=peak,
        peak_kind=peak_kind,
        compiled_temp_bytes=temp_bytes,
        device=getattr(device, "device_kind", str(device)),
        backend=jax.default_backend(),
        num_devices=jax.device_count(),
    )


# ----------------------------------------------------------------------------- driver


def _run_isolated(model: str, mode: str, **options: Any) -> Result:
    """`run_mode` in a fresh interpreter, so that its peak memory is its own."""
    cmd = [sys.executable, "-m", "lbq.bench", "--model", model, "--modes", mode, "--no-isolate"]
    cmd += ["--quiet", "--json", "-"]
    for name, value in options.items():
        if value is not None:  # profile_dir
            cmd += [f"--{'profile' if name == 'profile_dir' else name}", str(value)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {mode} failed:\n{proc.stderr[-4000:]}")
    return Result(**json.loads(proc.stdout)["results"][0])


def results_table(results: list[Result]) -> str:
    """A plain-text table of the results, with each mode's ratio to fp of the same model."""
    fp = {r.model: r.images_per_second for r in results if r.mode == "fp"}
    lines = [
        f"{'model':<10}{'mode':<10}{'batch':>6}{'dtype':>10}{'img/s':>10}{'vs fp':>7}"
        f"{'async':>10}{'step ms':>9}{'compile s':>11}{'peak MiB':>10}  peak"
    ]
    for r in results:
        ratio = f"{r.images_per_second / fp[r.model]:.2f}" if r.model in fp else "-"
        lines.append(
            f"{r.model:<10}{r.mode:<10}{r.batch:>6}{r.dtype:>10}{r.images_per_second:>10.1f}"
            f"{ratio:>7}{r.pipelined_images_per_second:>10.1f}{1e3 * r.median_step_s:>9.2f}"
            f"{r.lower_s + r.compile_s:>11.2f}"
            f"{r.peak_bytes / 2**20:>10.0f}  {r.peak_kind}"
        )
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    import jax

    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [getattr(d, "device_kind", str(d)) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def git_commit(root: str | None = None) -> str | None:
    """The checkout's short commit (with '+dirty' for local changes), or None outside git: the
    one capture of the source commit, for the bench's reports and benchmarks/ (``root``: the
    checkout, by default the one lbq is imported from)."""
    root = root or _ROOT
    git = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=10)
    try:
        head = git(["git", "rev-parse", "--short", "HEAD"], check=True)
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"])
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), for the
    figures' hardware line."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lbq.bench", description=__doc__.split("\n")[0])
    add, models, modes = parser.add_argument, ",".join(MODELS), ",".join(MODES)
    add("--model", default="resnet20", help=f"comma-separated networks, or 'all' ({models})")
    add("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {modes}")
    add("--batch", type=int, help="global batch (default: 128 at 32 px, 256 at 224 px)")
    add("--steps", type=int, default=30, help="timed steps (median reported)")
    add("--warmup", type=int, default=3, help="untimed steps after the first")
    add("--dtype", default="auto", help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    add("--json", help="write the results here ('-': stdout)")
    add("--profile", help="write a jax.profiler trace here")
    pipeline = "benchmarks/input_pipeline.py instead; its options follow --"
    add("--input", action="store_true", help=f"benchmark the host input pipeline ({pipeline})")
    cumulative = "run every mode in this process (peak memory is then cumulative)"
    add("--no-isolate", dest="isolate", action="store_false", help=cumulative)
    add("--quiet", action="store_true", help="no table")
    args, rest = parser.parse_known_args(argv)
    args.rest = [r for r in rest if r != "--"]
    if args.rest and not args.input:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input:
        path = os.path.join(_ROOT, "benchmarks", "input_pipeline.py")
        return runpy.run_path(path, run_name="_lbq_input_bench")["main"](args.rest)
    models = list(MODELS) if args.model == "all" else args.model.split(",")
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {MODES}")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    results = []
    for model in models:
        batch = args.batch or (128 if model in SMALL_INPUT_MODELS else 256)
        options = {"batch": batch, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype}
        for mode in modes:
            run = _run_isolated if args.isolate else run_mode
            result = run(model, mode, **options, profile_dir=args.profile)
            results.append(result)
            if not args.quiet:
                print(f"{model} {mode}: {result.images_per_second:.1f} images/s", flush=True)
    report = {"environment": _environment(), "results": [dataclasses.asdict(r) for r in results]}
    if not args.quiet:
        print(results_table(results))
    if args.json == "-":
        print(json.dumps(report))
    elif args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
