"""Records the reference trajectories that `tests/test_golden.py` compares against.

The trainer redesign had to leave every computed number unchanged. This script ran on the code
before it (commit 607cde2) and wrote `trajectories.json` and `resume_run/`; the test reruns the
same configs and resumes the committed run with the current code. Rerun it only when a change
is meant to alter the numbers, and say so in the commit.

Re-recorded since: the ``cifar100_w2a2_tiny`` trajectory, when the quantizers began to pass
the gradient at the clip bounds (torch.clamp's convention, where jnp.clip gave 1/2) and to pick
the level that exact arithmetic gives (from step 6 on, the losses differ in the 7th digit). The
redesign itself reproduced the whole original record bit for bit; ``resume_run/`` is still the
checkpoint written by the code before the redesign.

Then every trajectory, with XLA's CPU code pinned (``GOLDEN_XLA_FLAGS``): unpinned, the numbers
depend on the CPU, not only on its model name. Two 2-core VMs that both report "AMD EPYC" gave
2.39780 and 2.40055 for the default run's first loss (the second has AVX-512). XLA:CPU hands
some convolutions and dots to YNNPACK, a kernel library that picks its kernels at run time for
the CPU it finds (on the second VM, switching its fusions off moves that loss to 2.41774), and
XLA generates its own code for the CPU's instruction set (capping it at AVX moves the second
loss); 2-bit quantizers turn such last-bit differences into other codes. The golden runs
therefore switch the YNNPACK fusions off and cap XLA's code generation at AVX2, which every
x86-64 CPU of this kind has; each runs in a fresh process, since XLA reads its flags once.
``resume_of_committed`` is what resuming the committed ``resume_run/`` gives under those flags.

    python tests/golden/record.py                   # trajectories.json (keeps resume_run/)
    python tests/golden/record.py --new_resume_run  # also writes resume_run/ anew
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
RESUME_RUN = os.path.join(HERE, "resume_run")

# XLA:CPU flags of every golden run (see the docstring). Available values of xla_cpu_max_isa
# (jaxlib's own flag help): SSE4_2, AVX, AVX2, AVX512, AVX512_VNNI, AVX512_BF16, AMX, AMX_FP16.
# An empty xla_cpu_experimental_ynn_fusion_type turns every YNNPACK fusion off.
GOLDEN_XLA_FLAGS = "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type="
GOLDEN_ISA = "avx2"  # the /proc/cpuinfo flag the pinned code needs


def pinned_isa_available() -> bool:
    """Whether this CPU can run the code that GOLDEN_XLA_FLAGS pins (x86-64 with AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and GOLDEN_ISA in line.split() for line in f)
    except OSError:
        return False


def golden_configs():
    """{name: config}: the default run and the CIFAR-100 flagship's tiny variant, 20 steps each,
    every step logged."""
    from lbq.configs import cifar100_w2a2, default

    base = default.get_config()
    base.stages = [default.stage("main", steps=20)]
    base.log_every_steps = 1
    base.checkpoint_every_steps = 1000
    base.eval_every_epochs = 0.0
    base.progress = False

    flagship = cifar100_w2a2.get_config("tiny")
    for entry, steps in zip(flagship.stages, (7, 7, 6), strict=True):
        entry.steps = steps
    flagship.log_every_steps = 1
    flagship.checkpoint_every_steps = 1000
    return {"default": base, "cifar100_w2a2_tiny": flagship}


def resume_config():
    """The run whose first half is committed in resume_run/ (stopped after step 3 of 6)."""
    from lbq.configs import default

    c = default.get_config("tiny")
    c.stages = [default.stage("main", steps=6)]
    c.log_every_steps = 1
    return c


def trajectory(workdir: str) -> dict:
    """Per-step train metrics and the final evaluation from a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    drop = ("images_per_second", "time", "wall_time")
    train = [{k: v for k, v in r.items() if k not in drop} for r in records if r["kind"] == "train"]
    evals = [{k: v for k, v in r.items() if k not in drop} for r in records if r["kind"] == "eval"]
    return {"train": train, "eval": evals}


def run_pinned(name: str, workdir: str, stop_at_step: int | None = None) -> None:
    """Runs golden run ``name`` ('default', 'cifar100_w2a2_tiny' or 'resume') into
    ``workdir`` in a fresh Python process whose XLA uses GOLDEN_XLA_FLAGS only.

    Raises:
      subprocess.CalledProcessError: when the run fails (its output is in the exception).
    """
    env = {**os.environ, "XLA_FLAGS": GOLDEN_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, os.path.abspath(__file__), "--run", name, workdir]
    if stop_at_step is not None:
        command.append(str(stop_at_step))
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)


def _run_here(name: str, workdir: str, stop_at_step: int | None) -> None:
    from lbq.train import train_and_evaluate

    config = resume_config() if name == "resume" else golden_configs()[name]
    train_and_evaluate(config, workdir, stop_at_step=stop_at_step)


def resume_committed(workdir: str) -> dict:
    """The trajectory of resuming a copy of the committed resume_run/ in ``workdir``."""
    shutil.copytree(RESUME_RUN, workdir)
    run_pinned("resume", workdir)
    return trajectory(workdir)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--run"]:
        _run_here(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None)
        return
    if not pinned_isa_available():
        raise SystemExit(f"the golden runs need an x86-64 CPU with {GOLDEN_ISA.upper()}")
    record = {"xla_flags": GOLDEN_XLA_FLAGS, "runs": {}}
    for name in golden_configs():
        with tempfile.TemporaryDirectory() as workdir:
            run_pinned(name, workdir)
            record["runs"][name] = trajectory(workdir)
    if "--new_resume_run" in argv:
        shutil.rmtree(RESUME_RUN, ignore_errors=True)
        run_pinned("resume", RESUME_RUN, stop_at_step=3)
        shutil.rmtree(os.path.join(RESUME_RUN, "tensorboard"), ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        record["runs"]["resume_of_committed"] = resume_committed(os.path.join(tmp, "run"))
    with open(os.path.join(HERE, "trajectories.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
