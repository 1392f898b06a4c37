"""One prepared accelerator call: correctness, speed against PyTorch, CIFAR-10 accuracy.

docs/accelerator.md describes the parts, their budgets, the subprocesses and the 5 files
written under ``--out``:

    python benchmarks/accelerator_suite.py --budget 480                    # a GPU machine
    python benchmarks/accelerator_suite.py --out /tmp/suite --tiny          # this CPU, ~2 min
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

from accelerator_report import (
    compare_losses,
    compare_speed,
    rate_ratios,
    read_json,
    read_jsonl,
    read_run_metrics,
    summary_markdown,
)

# Standard library only, so importable before the wheels are installed (accelerator_report put
# the repository on the path).
from lbq.io import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "accelerator_worker.py")
PARTS = ("setup", "correctness", "speed", "profile", "accuracy")
# Shares of the budget left after setup; a part's unused time goes to the parts after it.
DEVICE_SHARES = {"correctness": 0.09, "speed": 0.45, "profile": 0.08, "accuracy": 0.38}
# Train-step losses, device against the CPU backend, float32 with full-precision products:
# the relative difference allowed per mode. Quantized steps may flip an activation that lies
# within rounding error of a level boundary, which moves the loss more than reassociation does.
LOSS_RTOL = {"fp": 1e-4, "w2a2": 2e-3}
DATASET = "cifar10_jpeg"
ARCHIVE_CANDIDATES = ("DATA/cifar10-jpeg.tar.gz", "../shared/data/cifar10-jpeg.tar.gz")
FP_SHARE = 0.4  # of the accuracy part, for the full-precision run
SAFETY = 0.8  # fraction of a fitted time that training steps may fill
# (lr, teacher_lr) of the accuracy runs: fp from scratch, the others fine-tuning from the fp
# model at lbq.experiments.reproduce's rates: 0.01, and 0.2x that for the teacher (the
# ImageNet recipe's ratio).
LEARNING_RATES = {"fp": (0.1, 0.1), **dict.fromkeys(("best", "w4a4", "w2a2"), (0.01, 0.002))}


# ----------------------------------------------------------------------------- sizes


class SpeedTask(NamedTuple):
    """One process of the speed part. ``runs``: comma-separated modes for lbq, 'backend:mode'
    for torch; ``estimate_s``: a-priori seconds."""

    framework: str
    model: str
    batch: int
    runs: str
    estimate_s: float
    image_size: int | None = None

    @property
    def name(self) -> str:
        return f"{self.framework} {self.model} b{self.batch} {self.runs.replace(',', '+')}"


# The speed tasks in priority order (docs/accelerator.md, "speed"). The estimates are guesses
# for an H100/H200 (process start, compilation, 40 timed steps), not measurements.
DEVICE_SPEED = (
    SpeedTask("lbq", "resnet18", 256, "w2a2", 35),
    SpeedTask("lbq", "resnet18", 256, "fp", 30),
    SpeedTask("torch", "resnet18", 256, "eager:w2a2,compile:w2a2", 75),
    SpeedTask("lbq", "resnet20", 512, "w2a2", 20),
    SpeedTask("lbq", "resnet20", 512, "fp", 18),
    SpeedTask("lbq", "resnet18", 256, "w2a2_kd", 45),
    SpeedTask("torch", "resnet18", 256, "eager:w2a2_kd,compile:w2a2_kd,eager:fp", 90),
    SpeedTask("torch", "resnet20", 512, "eager:w2a2,eager:fp,compile:w2a2", 70),
    SpeedTask("lbq", "resnet18", 256, "w4a4", 35),
    SpeedTask("lbq", "resnet18", 256, "w2a2_sp", 35),
    SpeedTask("lbq", "resnet20", 512, "w2a2_kd", 25),
    SpeedTask("lbq", "resnet20", 512, "w4a4", 20),
    SpeedTask("lbq", "resnet20", 512, "w2a2_sp", 20),
    SpeedTask("torch", "resnet18", 256, "eager:w4a4,eager:w2a2_sp,compile:fp", 80),
    SpeedTask("torch", "resnet20", 512, "eager:w4a4,eager:w2a2_sp,eager:w2a2_kd,compile:fp", 70),
    SpeedTask("torch", "resnet18", 256, "compile:w4a4,compile:w2a2_sp", 120),
    SpeedTask("torch", "resnet20", 512, "compile:w4a4,compile:w2a2_sp,compile:w2a2_kd", 120),
)

# Everything that differs between the device run and ``--tiny`` (a 2-core CPU in well under
# two minutes: the same code paths at toy sizes), as (device, tiny).
_SIZES = {
    "shares": (DEVICE_SHARES, {"correctness": 0.2, "speed": 0.3, "profile": 0.1, "accuracy": 0.4}),
    "setup_estimate_s": (45, 12),
    "quantizer_elements": (1 << 16, 1 << 12),
    "loss_batch": (64, 8),  # tiny: the speed task's batch, so one compilation serves both parts
    "loss_modes": (("fp", "w2a2"), ("w2a2",)),
    # The device runs, the first also on the CPU backend for the comparison. Full float32
    # products ('highest') on accelerators; on a CPU host 'default' computes the same and is
    # the speed part's compilation.
    "loss_precisions": (("highest", "default"), ("default",)),
    "correctness_estimate_s": (35, 15),
    "bench_steps": (20, 2),
    "bench_warmup": (3, 1),
    "dtype": ("bfloat16", "float32"),
    "speed_tasks": (
        DEVICE_SPEED,
        (
            SpeedTask("lbq", "resnet20", 8, "fp,w2a2", 15),
            SpeedTask("torch", "resnet20", 8, "eager:fp,eager:w2a2,compile:w2a2", 15),
            SpeedTask("torch", "resnet18", 2, "eager:w2a2_kd", 8, image_size=64),
        ),
    ),
    "torch_compile_backend": ("inductor", "aot_eager"),
    "profile_model": ("resnet18", "resnet20"),
    "profile_batch": (256, 8),  # tiny: the speed task's, whose compilation is reused
    "profile_modes": (("w2a2", "w2a2_kd"), ("w2a2",)),
    "profile_steps": (3, 2),
    "profile_estimate_s": (40, 12),
    "train_per_class": (None, 24),  # None: the whole split
    "test_per_class": (None, 10),
    "acc_batch": (128, 32),
    "acc_max_epochs": (200.0, 1.0),
    "acc_min_steps": (20, 2),
    "acc_prior_images_per_second": (20_000.0, 150.0),
    "acc_prior_overhead_s": (40.0, 10.0),
    "acc_log_every": (50, 2),
    "acc_eval_batch": (1000, 50),
}
DEVICE = SimpleNamespace(tiny=False, **{k: v[0] for k, v in _SIZES.items()})
TINY = SimpleNamespace(tiny=True, **{k: v[1] for k, v in _SIZES.items()})


# ----------------------------------------------------------------------------- budget


def part_budget(part: str, remaining_s: float, done: set[str], shares: dict[str, float]) -> float:
    """Seconds for ``part`` out of ``remaining_s``: its share among the parts not yet run."""
    left = [p for p in shares if p not in done]
    return remaining_s * shares[part] / sum(shares[p] for p in left)


def fit_steps(
    seconds: float,
    seconds_per_step: float,
    overhead_s: float,
    steps_per_epoch: int,
    *,
    min_steps: int,
    max_steps: int,
) -> int:
    """How many steps fit in ``seconds``, each run costing ``overhead_s`` once.

    ``SAFETY`` of the time left after the overhead is filled with steps of
    ``seconds_per_step``; from one epoch up, whole epochs. The result is clamped to
    [min_steps, max_steps] (min_steps wins when the budget is too small).
    """
    usable = SAFETY * (seconds - overhead_s)
    steps = int(max(usable, 0.0) / max(seconds_per_step, 1e-9))
    if steps >= steps_per_epoch > 0:
        steps -= steps % steps_per_epoch
    return max(min_steps, min(steps, max_steps))


# ----------------------------------------------------------------------------- running


class Suite:
    """Runs the parts, keeps the results and writes the output files."""

    def __init__(self, args: argparse.Namespace, sizes: SimpleNamespace):
        self.args = args
        self.sizes = sizes
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.out = os.path.abspath(args.out)
        self.scratch = os.path.abspath(args.scratch)
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.scratch, exist_ok=True)
        self.log_path = os.path.join(self.out, "suite.log")
        open(self.log_path, "w").close()
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)
        # One compilation cache for this run: the profile reuses the speed part's compilations.
        # A fresh one each run, so that no compile time measured here is a cache hit of an
        # earlier run's.
        self.env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
            self.scratch, f"jax_cache_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
        )
        # Per-operation trace events on XLA:CPU, for the profile; set for every process, since
        # compiler flags are part of the compilation cache's key (no effect on GPU code).
        flag = "--xla_cpu_enable_xprof_traceme=true"
        if flag not in self.env.get("XLA_FLAGS", ""):
            self.env["XLA_FLAGS"] = f"{self.env.get('XLA_FLAGS', '')} {flag}".strip()
        self.python = args.python or sys.executable
        self.results: dict[str, Any] = {
            "suite": {
                "command": sys.argv,
                "tiny": sizes.tiny,
                "budget_s": args.budget,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "commit": source_commit(),
                "python": platform.python_version(),
                "host": platform.node(),
                "cpu_count": os.cpu_count(),
            },
            "plan": [],
            "parts": {},
        }

    # ------------------------------------------------------------------ plumbing

    def now(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        line = f"[{self.now():7.1f}s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        """Runs ``cmd`` (cwd: the repository root) for at most ``timeout`` seconds.

        Its output goes to the log. Returns {'returncode', 'seconds', 'timed_out', 'tail'}.
        """
        return self.run_many([(name, cmd, env)], timeout)[name]

    def run_many(self, jobs: list[tuple[str, list[str], dict | None]], timeout: float) -> dict:
        """Runs (name, cmd, env or None) jobs side by side, stopping any still running after
        ``timeout`` seconds; returns {name: result} as `run` does."""
        timeout = max(timeout, 1.0)
        started = {}
        for index, (name, cmd, env) in enumerate(jobs):
            self.log(f"run {name} (limit {timeout:.0f} s): {' '.join(cmd)}")
            output = os.path.join(self.scratch, f"output_{index}.txt")
            sink = open(output, "w")
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env or self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
            started[name] = (proc, sink, output, time.monotonic())
        end = time.monotonic() + timeout
        finished: dict[str, float] = {}
        while len(finished) < len(started) and time.monotonic() < end:
            for name, (proc, *_rest) in started.items():
                if name not in finished and proc.poll() is not None:
                    finished[name] = time.monotonic()
            time.sleep(0.1)
        results = {}
        for name, (proc, sink, output, start) in started.items():
            timed_out = name not in finished and proc.poll() is None
            if timed_out:
                stop_group(proc)
            seconds = finished.get(name, time.monotonic()) - start
            sink.close()
            text = pathlib.Path(output).read_text(errors="replace")
            with open(self.log_path, "a") as f:
                f.write(f"----- output of {name} ({seconds:.1f} s, rc {proc.returncode}) -----\n")
                f.write(text + ("\n" if text and not text.endswith("\n") else ""))
                f.write(f"----- end of {name} -----\n")
            state = "stopped at its limit" if timed_out else f"rc {proc.returncode}"
            self.log(f"{name}: {state} after {seconds:.1f} s")
            results[name] = {
                "returncode": proc.returncode,
                "seconds": seconds,
                "timed_out": timed_out,
                "tail": text[-3000:],
            }
        return results

    def save(self) -> None:
        """Rewrites results.json and summary.md (after every part, so partial runs report)."""
        self.results["suite"]["elapsed_s"] = self.now()
        write_json(os.path.join(self.out, "results.json"), self.results, indent=1, default=str)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(summary_markdown(self.results))

    # ------------------------------------------------------------------ plan

    def print_plan(self) -> None:
        """Logs and records each part's budget (if every part used exactly its share) and each
        task's estimate, with the cumulative time per part."""
        s = self.sizes
        loss = f"train-step loss {','.join(s.loss_modes)} device vs CPU"
        checks = f"quantizers bits 1-8 x float32/bfloat16; {loss}"
        profile = f"{s.profile_model} b{s.profile_batch} {'+'.join(s.profile_modes)}"
        tasks = [
            ("setup", "wheels, dataset, torch check", s.setup_estimate_s),
            ("correctness", checks, s.correctness_estimate_s),
            *(("speed", task.name, task.estimate_s) for task in s.speed_tasks),
            ("profile", profile, s.profile_estimate_s),
            ("accuracy", "fp, then best / w4a4 / w2a2 from it: steps fitted to what is left", None),
        ]
        left = self.args.budget - s.setup_estimate_s
        budgets = {part: part_budget(part, left, set(), s.shares) for part in s.shares}
        kind = "a 2-core CPU (--tiny)" if s.tiny else "an H100/H200"
        self.log(
            f"PLAN: budget {self.args.budget:.0f} s; estimates are a-priori guesses for {kind}"
        )
        self.log(f"  {'part':<12}{'budget s':>9}{'est s':>7}{'cum s':>7}  task")
        rows, cumulative = [], {}
        for part, task, estimate in tasks:
            budget = s.setup_estimate_s if part == "setup" else budgets[part]
            row = {"part": part, "task": task, "estimate_s": estimate}
            est = cum = "fill"
            if estimate is not None:
                cumulative[part] = cumulative.get(part, 0.0) + estimate
                est, cum = f"{estimate:.0f}", f"{cumulative[part]:.0f}"
                row["expected_to_fit"] = cumulative[part] <= budget
            mark = "" if row.get("expected_to_fit", True) else "  (past the budget: if time)"
            self.log(f"  {part:<12}{budget:>9.0f}{est:>7}{cum:>7}  {task}{mark}")
            rows.append(row)
        known = sum(t[2] for t in tasks if t[2] is not None)
        self.log(
            f"  estimated {known:.0f} s for the listed tasks; speed tasks run in the order shown "
            f"while their part's budget lasts (time a part leaves goes to the next); accuracy "
            f"fills what is left"
        )
        self.results["plan"] = rows
        self.results["plan_budgets_s"] = budgets

    # ------------------------------------------------------------------ parts

    def main(self) -> int:
        self.print_plan()
        if self.args.plan_only:
            return 0
        self.save()
        parts = [p for p in PARTS if p in self.args.parts]
        done = set(self.sizes.shares) - set(parts)  # a skipped part's share goes to the others
        for part in parts:
            budget = self.remaining()
            if part != "setup":
                budget = part_budget(part, budget, done, self.sizes.shares)
            self.log(f"=== part {part}: budget {budget:.0f} s ({self.remaining():.0f} s left)")
            start = self.now()
            try:
                result = getattr(self, f"part_{part}")(budget)
                result.setdefault("status", "ok")
            except Exception as error:  # a broken part must not cost the others their turn
                self.log(f"part {part} failed: {error!r}")
                result = {"status": "failed", "error": repr(error)}
            result.update(budget_s=budget, seconds=self.now() - start)
            self.results["parts"][part] = result
            done.add(part)
            self.log(f"=== part {part}: {result['status']} in {result['seconds']:.1f} s")
            self.save()
        self.pack()
        shutil.rmtree(self.env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
        self.save()
        self.log(f"done in {self.now():.1f} s; files in {self.out}")
        return 0

    def part_setup(self, budget: float) -> dict[str, Any]:
        out: dict[str, Any] = {"nvidia_smi": nvidia_smi()}
        site = self.install_wheels(out)
        if site:
            self.env["PYTHONPATH"] = os.pathsep.join((site, self.env["PYTHONPATH"]))
        try:  # without the dataset only the accuracy part is lost
            out["dataset"] = self.prepare_dataset()
        except (OSError, RuntimeError, tarfile.TarError, subprocess.SubprocessError) as error:
            self.log(f"dataset: {error!r}")
            out["dataset"] = {"error": repr(error)}
            out["status"] = "dataset failed"
        out["torch"] = self.check_torch()
        return out

    def install_wheels(self, out: dict[str, Any]) -> str | None:
        """Installs .whl/*.whl into a private folder; protobuf only if imports need it."""
        wheels = [] if self.args.no_wheels else sorted(glob.glob(os.path.join(ROOT, ".whl/*.whl")))
        if not wheels:
            out["wheels"] = "none carried: using the installed packages"
            return None
        site = os.path.join(self.scratch, "site")
        protobuf = [w for w in wheels if os.path.basename(w).startswith("protobuf-")]
        others = [w for w in wheels if w not in protobuf]
        pip = [self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        pip += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
        out["wheels"] = [os.path.basename(w) for w in wheels]
        out["wheel_install"] = self.run("pip install wheels", pip + others, 180)
        env = dict(self.env, PYTHONPATH=os.pathsep.join((site, self.env["PYTHONPATH"])))
        check = [self.python, "-c", IMPORT_CHECK]
        out["import_check"] = self.run("import check", check, 120, env=env)
        if out["import_check"]["returncode"] != 0 and protobuf:
            self.log("imports failed with the installed protobuf: adding the carried one")
            out["protobuf_install"] = self.run("pip install protobuf", pip + protobuf, 60)
            out["import_check_with_protobuf"] = self.run("import check", check, 120, env=env)
        return site

    def prepare_dataset(self) -> dict[str, Any]:
        """CIFAR-10 as the TFDS dataset ``cifar10_jpeg`` (lbq.data.prepare), from the archive."""
        s = self.sizes
        data_dir = os.path.join(self.scratch, "tfds_tiny" if s.tiny else "tfds")
        info = {"name": DATASET, "data_dir": data_dir}
        prepared = os.path.join(data_dir, DATASET, "1.0.0", "dataset_info.json")
        if os.path.exists(prepared):
            info["reused"] = True
            info.update(read_split_sizes(prepared))
            return info
        found = [os.path.join(ROOT, a) for a in ARCHIVE_CANDIDATES]
        archive = self.args.archive or next(filter(os.path.exists, found), None)
        if archive is None:
            raise FileNotFoundError(
                f"no CIFAR-10 archive: pass --archive or place it at {ARCHIVE_CANDIDATES[0]}"
            )
        folder = os.path.join(self.scratch, "cifar10_jpeg")
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.monotonic()
        counts = extract_archive(archive, folder, s.train_per_class, s.test_per_class)
        info.update(extract_s=time.monotonic() - t0, archive=archive, extracted=counts)
        workers = str(min(16, os.cpu_count() or 1))
        cmd = [self.python, "-m", "lbq.data.prepare", f"--root={folder}"]
        cmd += [f"--data_dir={data_dir}", f"--name={DATASET}", f"--num_workers={workers}"]
        info["prepare"] = self.run("lbq.data.prepare", cmd, 300)
        if info["prepare"]["returncode"] != 0:
            raise RuntimeError("lbq.data.prepare failed (see suite.log)")
        info.update(read_split_sizes(prepared))
        return info

    def check_torch(self) -> dict[str, Any]:
        python = self.args.torch_python or self.python
        code = (
            "import json, torch; print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else 'cpu'}))"
        )
        result = self.run("torch check", [python, "-c", code], 120)
        last = result["tail"].strip().splitlines()[-1:]
        if result["returncode"] == 0:
            return {"python": python, **json.loads(last[0]), "available": True}
        self.log(f"PyTorch is not importable with {python}: its runs will be skipped")
        return {"python": python, "available": False, "reason": last or ["no output"]}

    def worker(self, folder: str, key: str, *args: str) -> list[str]:
        """accelerator_worker.py with ``args``, writing its result to ``folder/<key>.json``."""
        return [self.python, WORKER, *args, f"--json={os.path.join(folder, key)}.json"]

    def part_correctness(self, budget: float) -> dict[str, Any]:
        s = self.sizes
        deadline = time.monotonic() + budget
        folder = fresh_folder(os.path.join(self.scratch, "correctness"))
        out: dict[str, Any] = {}
        elements = f"--elements={s.quantizer_elements}"
        quantizers = self.worker(folder, "quantizers", "quantizers", elements)
        out["quantizers_run"] = self.run("quantizers", quantizers, budget / 2)
        out["quantizers"] = read_json(os.path.join(folder, "quantizers.json"))
        # The step on the device at full float32 precision first; then the same step on the
        # CPU backend, beside the device's default-precision run where there is one (on a CPU
        # host the second process finds the first one's compilation in the cache instead).
        loss_args = ["train_loss", f"--modes={','.join(s.loss_modes)}", f"--batch={s.loss_batch}"]
        reference = s.loss_precisions[0]  # the precision the comparison is made at
        losses = [
            (f"loss_device_{p}", f"train loss (device, {p} precision)", p, None)
            for p in s.loss_precisions
        ]
        cpu_env = dict(self.env, JAX_PLATFORMS="cpu")
        losses.append(("loss_cpu", "train loss (CPU backend)", reference, cpu_env))
        jobs = [
            (name, self.worker(folder, key, *loss_args, f"--precision={p}"), e)
            for key, name, p, e in losses
        ]
        runs = self.run_many(jobs[:1], deadline - time.monotonic())
        runs.update(self.run_many(jobs[1:], deadline - time.monotonic()))
        out.update((key, read_json(os.path.join(folder, f"{key}.json"))) for key, *_ in losses)
        out["loss_runs"] = runs
        out["loss_comparison"] = compare_losses(
            out.get(f"loss_device_{reference}"), out.get("loss_cpu"), LOSS_RTOL
        )
        quant_ok = bool(out["quantizers"] and out["quantizers"].get("passed"))
        loss_ok = bool(out["loss_comparison"] and out["loss_comparison"]["passed"])
        out["passed"] = quant_ok and loss_ok
        out["status"] = "ok" if out["quantizers"] and out["loss_comparison"] else "incomplete"
        return out

    def part_speed(self, budget: float) -> dict[str, Any]:
        s = self.sizes
        deadline = time.monotonic() + budget
        folder = fresh_folder(os.path.join(self.scratch, "speed"))
        torch_ok = self.results["parts"].get("setup", {}).get("torch", {}).get("available")
        tasks, lbq_rows, torch_rows = [], [], []
        for index, task in enumerate(s.speed_tasks):
            left = deadline - time.monotonic()
            entry = {"task": task.name, "estimate_s": task.estimate_s}
            tasks.append(entry)
            if task.framework == "torch" and not torch_ok:
                entry["status"] = "skipped: PyTorch is not importable (see setup.torch)"
                continue
            if left < 0.5 * task.estimate_s:
                entry["status"] = f"skipped: {left:.0f} s left in the part"
                continue
            path = os.path.join(folder, f"task{index:02d}.json")
            common = [f"--model={task.model}", f"--batch={task.batch}", f"--steps={s.bench_steps}"]
            common += [f"--warmup={s.bench_warmup}", f"--dtype={s.dtype}"]
            if task.framework == "lbq":
                cmd = [self.python, "-m", "lbq.bench", *common, f"--modes={task.runs}"]
                cmd += ["--no-isolate", "--quiet", f"--json={path}"]
            else:
                script = os.path.join(ROOT, "benchmarks", "torch_fakequant.py")
                cmd = [
                    self.args.torch_python or self.python,
                    script,
                    *common,
                    f"--runs={task.runs}",
                ]
                cmd += [f"--jsonl={path}", f"--compile_backend={s.torch_compile_backend}"]
                cmd += [f"--image_size={task.image_size}"] if task.image_size else []
            # A task may overrun its estimate, but not by so much that it eats the part.
            limit = min(left, max(3.0 * task.estimate_s, 60.0))
            entry["run"] = self.run(task.name, cmd, limit)
            entry["status"] = run_status(entry["run"])
            if task.framework == "lbq":
                report = read_json(path) or {}
                lbq_rows += [{**row, "framework": "lbq"} for row in report.get("results", [])]
                if report:
                    self.results.setdefault("environment", report.get("environment"))
            else:
                torch_rows.extend(read_jsonl(path))
        comparison = compare_speed(lbq_rows, torch_rows)
        return {"tasks": tasks, "lbq": lbq_rows, "torch": torch_rows, "comparison": comparison}

    def part_profile(self, budget: float) -> dict[str, Any]:
        s = self.sizes
        folder = fresh_folder(os.path.join(self.scratch, "profile"))
        args = [f"--model={s.profile_model}", f"--batch={s.profile_batch}", f"--dtype={s.dtype}"]
        args += [f"--modes={','.join(s.profile_modes)}", f"--steps={s.profile_steps}"]
        cmd = self.worker(folder, "profile_summary", "profile", *args, f"--trace_dir={folder}")
        run = self.run("profile", cmd, budget)
        summary = read_json(os.path.join(folder, "profile_summary.json"))
        return {"run": run, "summary": summary, "status": "ok" if summary else "failed"}

    # ------------------------------------------------------------------ accuracy

    def part_accuracy(self, budget: float) -> dict[str, Any]:
        s = self.sizes
        deadline = time.monotonic() + budget
        dataset = self.results["parts"].get("setup", {}).get("dataset") or {}
        if not dataset.get("num_train"):
            return {"status": "skipped: no dataset (see setup)"}
        folder = fresh_folder(os.path.join(self.scratch, "accuracy"))
        steps_per_epoch = dataset["num_train"] // s.acc_batch
        max_steps = max(int(s.acc_max_epochs * steps_per_epoch), 1)
        ratios = rate_ratios(self.results["parts"].get("speed", {}).get("lbq", []))
        prior = s.acc_prior_images_per_second
        if ratios.get("fp_images_per_second") and not s.tiny:
            # The bench's batch-512 step rate, halved for batch 128 and the trainer's host work.
            prior = 0.5 * ratios["fp_images_per_second"]
        out: dict[str, Any] = {
            "batch": s.acc_batch,
            "steps_per_epoch": steps_per_epoch,
            "num_train": dataset["num_train"],
            "num_test": dataset.get("num_test"),
            "prior_images_per_second": prior,
            "rate_ratios": ratios,
            "runs": {},
        }
        fit = functools.partial(fit_steps, min_steps=s.acc_min_steps, max_steps=max_steps)
        fp_seconds = FP_SHARE * budget
        fp_steps = fit(fp_seconds, s.acc_batch / prior, s.acc_prior_overhead_s, steps_per_epoch)
        limit = min(2.0 * fp_seconds, deadline - time.monotonic())
        run = self.run_many([self.train_job(folder, "fp", fp_steps, None)], limit)["train fp"]
        fp = self.train_result(folder, "fp", fp_steps, run)
        out["runs"]["fp"] = fp
        if fp.get("final_top1") is None:
            out["status"] = "failed: the full-precision run gave no evaluation"
            return out
        # The quantized runs (equal steps each) run side by side, fitted from what the fp run
        # measured: their compilations overlap, and the accelerator takes their steps in turn.
        rate = fp.get("train_images_per_second") or prior
        overhead = max(fp["seconds"] - fp["steps"] * s.acc_batch / rate, 0.0)
        q_ratio = ratios.get("w2a2", 1.0)
        kd_ratio = ratios.get("w2a2_kd", 0.5)
        per_step = s.acc_batch / rate * (2.0 / q_ratio + 1.0 / kd_ratio)
        left = deadline - time.monotonic()
        # Three compilations at once, the joint one the largest.
        steps = fit(left, per_step, 1.5 * overhead, steps_per_epoch)
        out["fit"] = {
            "fp_images_per_second": rate,
            "fp_overhead_s": overhead,
            "seconds_left": left,
            "quantized_steps_each": steps,
        }
        self.log(
            f"accuracy: fp ran at {rate:.0f} images/s with {overhead:.0f} s overhead; "
            f"{left:.0f} s left: {steps} steps ({steps / steps_per_epoch:.2f} epochs) per run"
        )
        methods = ("best", "w4a4", "w2a2")
        jobs = [self.train_job(folder, m, steps, fp["workdir"]) for m in methods]
        runs = self.run_many(jobs, deadline - time.monotonic())
        for method in methods:
            out["runs"][method] = self.train_result(folder, method, steps, runs[f"train {method}"])
        out["top1"] = {k: v.get("final_top1") for k, v in out["runs"].items()}
        failed = [k for k, v in out["runs"].items() if v["status"] != "ok"]
        out["status"] = "ok" if not failed else f"incomplete: {', '.join(failed)}"
        return out

    def train_job(
        self, folder: str, method: str, steps: int, init_from: str | None
    ) -> tuple[str, list[str], dict]:
        """The ``python -m lbq.main`` job of one run of benchmarks/accelerator_cifar10.py."""
        s = self.sizes
        lr, teacher_lr = LEARNING_RATES[method]
        dataset = self.results["parts"]["setup"]["dataset"]
        config = os.path.join(ROOT, "benchmarks", "accelerator_cifar10.py")
        cmd = [self.python, "-m", "lbq.main", f"--config={config}:{method},steps={steps}"]
        cmd += [f"--workdir={os.path.join(folder, method)}"]
        cmd += [f"--config.data.name={dataset['name']}"]
        cmd += [f"--config.data.data_dir={dataset['data_dir']}"]
        cmd += [f"--config.data.workers={min(16, os.cpu_count() or 1)}"]
        cmd += [f"--config.batch_size={s.acc_batch}"]
        cmd += [f"--config.eval_batch_size={s.acc_eval_batch}"]
        cmd += [f"--config.schedule.lr={lr}", f"--config.schedule.teacher_lr={teacher_lr}"]
        cmd += [f"--config.log_every_steps={s.acc_log_every}"]
        if init_from:
            cmd += [f"--config.init_from={init_from}"]
        # Runs share the accelerator: each allocates what it uses, not 75 % of the memory.
        env = dict(self.env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        return f"train {method}", cmd, env

    def train_result(self, folder: str, method: str, steps: int, run: dict) -> dict[str, Any]:
        """A run's figures: its process's outcome and what its metrics.jsonl holds."""
        workdir = os.path.join(folder, method)
        num_train = self.results["parts"]["setup"]["dataset"]["num_train"]
        lr, teacher_lr = LEARNING_RATES[method]
        result = {"method": method, "steps": steps, "workdir": workdir, "lr": lr, **run}
        if method == "best":  # the only run with a teacher
            result["teacher_lr"] = teacher_lr
        result["epochs"] = steps / max(num_train // self.sizes.acc_batch, 1)
        result.update(read_run_metrics(os.path.join(workdir, "metrics.jsonl")))
        result["status"] = run_status(run, " (no final evaluation)")
        return result

    # ------------------------------------------------------------------ files

    def pack(self) -> None:
        """profiles.tar.gz and accuracy_runs.tar.gz (small files only: no checkpoints), of the
        parts this call ran."""
        small = ("metrics.jsonl", "config.json")
        for part, name, keep in (
            ("profile", "profiles.tar.gz", None),
            ("accuracy", "accuracy_runs.tar.gz", lambda p: os.path.basename(p) in small),
        ):
            folder = os.path.join(self.scratch, part)
            if part in self.args.parts and os.path.isdir(folder):
                pack_folder(folder, os.path.join(self.out, name), self.args.max_pack_mb, keep)


IMPORT_CHECK = (
    "import ml_collections, tensorflow_datasets, tensorboardX, orbax.checkpoint, optax, flax; "
    "import lbq.train, lbq.main; print('imports ok')"
)


# ----------------------------------------------------------------------------- helpers


def fresh_folder(path: str) -> str:
    """An empty folder at ``path``: nothing a part reads may be left from an earlier call."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (lbq.main then saves a checkpoint), SIGKILL after 20 s."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def run_status(run: dict[str, Any], stopped_note: str = "") -> str:
    """'ok', 'failed' or 'stopped at its limit' (+ ``stopped_note``), from `Suite.run`'s result."""
    if run["timed_out"]:
        return "stopped at its limit" + stopped_note
    return "ok" if run["returncode"] == 0 else "failed"


def source_commit() -> str | None:
    """The checkout's commit ('+dirty' with local changes); on a copy without .git, the one
    that benchmarks/prepare_device_data.py recorded in DATA/source_commit.txt."""
    # The short hash and mark of lbq.bench.git_commit, which this driver cannot import: it runs
    # on a bare device machine before the carried wheels are installed (lbq's imports need jax).
    describe = ["git", "describe", "--always", "--dirty=+dirty", "--exclude=*"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = subprocess.run(describe, cwd=ROOT, capture_output=True, text=True, timeout=10)
        if run.returncode == 0:
            return run.stdout.strip()
    path = os.path.join(ROOT, "DATA", "source_commit.txt")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip() + " (recorded when the call was prepared)"
    return None


def nvidia_smi() -> str | None:
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    cmd = ["nvidia-smi", query, "--format=csv,noheader"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # None without nvidia-smi
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    return None


def extract_archive(
    archive: str, folder: str, train_per_class: int | None, test_per_class: int | None
) -> dict[str, int]:
    """Unpacks the JPEG archive's ``<split>/<class>/*.jpg`` into ``folder``; with per-class
    limits, only the first files of each class (in archive order). Returns files per split."""
    if train_per_class is None and test_per_class is None and shutil.which("tar"):
        os.makedirs(folder, exist_ok=True)
        subprocess.run(["tar", "-xzf", archive, "-C", folder], check=True)  # 3x Python's speed
        return {
            split: sum(len(os.listdir(c.path)) for c in os.scandir(os.path.join(folder, split)))
            for split in sorted(os.listdir(folder))
        }
    limits = {"train": train_per_class, "test": test_per_class}
    per_class, per_split = collections.Counter(), collections.Counter()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits:
                continue
            limit = limits[parts[0]]
            if limit is None or per_class[parts[0], parts[1]] < limit:
                per_class[parts[0], parts[1]] += 1
                per_split[parts[0]] += 1
                tar.extract(member, folder, filter="data")
    return dict(per_split)


def read_split_sizes(dataset_info: str) -> dict[str, int]:
    """{'num_<split>': examples} from a TFDS dataset_info.json."""
    with open(dataset_info) as f:
        splits = json.load(f).get("splits", [])
    return {f"num_{s['name']}": sum(int(n) for n in s.get("shardLengths", [])) for s in splits}


def pack_folder(
    folder: str, target: str, max_mb: float, keep: Callable[[str], bool] | None = None
) -> None:
    """A tar.gz of ``folder``'s files (those ``keep`` accepts), largest left out first when
    the files together exceed ``max_mb`` (listed in SKIPPED.txt inside the archive)."""
    walked = (os.path.join(base, name) for base, _, names in os.walk(folder) for name in names)
    files = sorted((p for p in walked if keep is None or keep(p)), key=os.path.getsize)
    chosen, skipped, total = [], [], 0
    for path in files:
        size = os.path.getsize(path)
        if total + size > max_mb * 2**20:
            skipped.append(f"{os.path.relpath(path, folder)} ({size} bytes)")
            continue
        chosen.append(path)
        total += size
    with tarfile.open(target, "w:gz") as tar:
        for path in chosen:
            tar.add(path, arcname=os.path.relpath(path, folder))
        if skipped:
            note = os.path.join(os.path.dirname(target), "SKIPPED.txt")
            with open(note, "w") as f:
                f.write("left out (size limit):\n" + "\n".join(skipped) + "\n")
            tar.add(note, arcname="SKIPPED.txt")
            os.remove(note)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "/tmp/lbq_suite_out"),
        help="output folder (default $OUT, the device call's; else /tmp/lbq_suite_out)",
    )
    parser.add_argument("--tiny", action="store_true", help="toy sizes for a CPU, ~2 minutes")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole suite (480; tiny 300)"
    )
    parser.add_argument("--plan_only", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (setup always runs)",
    )
    parser.add_argument("--scratch", default=None, help="work folder (default /tmp/lbq_suite)")
    parser.add_argument("--archive", default=None, help="CIFAR-10 JPEG archive (.tar.gz)")
    parser.add_argument("--python", default=None, help="interpreter of the JAX workers")
    parser.add_argument("--torch_python", default=None, help="interpreter with PyTorch")
    parser.add_argument("--no_wheels", action="store_true", help="ignore .whl/")
    parser.add_argument("--max_pack_mb", type=float, default=15.0, help="per packed archive")
    args = parser.parse_args(argv)
    # Tiny parts finish well inside their budgets on an idle 2-core CPU; the margin is for a
    # loaded one. 480 s on a device leaves a 15-minute lease the time to rerun one part at once.
    args.budget = args.budget or (300.0 if args.tiny else 480.0)
    args.scratch = args.scratch or ("/tmp/lbq_suite_tiny" if args.tiny else "/tmp/lbq_suite")
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: {unknown} not among {PARTS}")
    args.parts = ["setup", *[p for p in parts if p != "setup"]]  # the others need setup
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = Suite(args, TINY if args.tiny else DEVICE)
    return suite.main()


if __name__ == "__main__":
    sys.exit(main())
