"""The launch scripts: every command they would run, from their dry runs, and their input checks.

The dry runs must not run anything: a `gcloud` placed first on PATH records any call, and the
tests check that it never ran. The local tarball step is then run for real from its printed
command, and every remote shell command is checked for syntax with `bash -n`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile

import pytest
from runs import REPO

TPU = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = os.path.join(REPO, "launch", "gpu_slurm.sh")
LOCAL = os.path.join(REPO, "launch", "local.sh")

pytestmark = [
    pytest.mark.skipif(shutil.which("bash") is None, reason="the launch scripts are bash"),
    pytest.mark.slow,  # the full tier: `python -m pytest -m "not slow"` skips it
]


@pytest.fixture
def no_gcloud(tmp_path):
    """A PATH whose first `gcloud`, `srun` and `scontrol` record that they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "called"
    for tool in ("gcloud", "srun", "scontrol", "sbatch"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{marker}"\nexit 1\n')
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env, marker


def _run(script: str, args: list[str], env: dict, cwd: str | None = None):
    return subprocess.run(
        ["bash", script, *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands ('+ ' lines), split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _flag(words: list[str], name: str) -> str | None:
    for word in words:
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


TPU_ARGS = [
    "--name=lbq-pod",
    "--zone=us-west4-a",
    "--project=lbq-project",
    "--accelerator-type=v5litepod-16",
    "--config=configs/imagenet_w2a2.py",
    "--workdir=gs://lbq-bucket/runs/w2a2",
    "--dry-run",
    "--",
    "--config.batch_size=1024",
]


def test_tpu_dry_run_prints_create_install_run(no_gcloud):
    env, marker = no_gcloud
    proc = _run(TPU, TPU_ARGS, env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), f"a dry run ran: {marker.read_text()}"
    commands = _commands(proc.stdout)
    gcloud = [c for c in commands if c[0] == "gcloud"]
    verbs = [" ".join(c[1:5]) for c in gcloud]
    assert "compute tpus tpu-vm create" in verbs
    assert "compute tpus tpu-vm scp" in verbs
    for command in gcloud:  # every gcloud call names the TPU's zone and project
        assert "--zone=us-west4-a" in command and "--project=lbq-project" in command, command
        assert "lbq-pod" in command or "lbq-pod:lbq.tar.gz" in command, command
    create = next(c for c in gcloud if c[3:5] == ["tpu-vm", "create"])
    assert _flag(create, "--accelerator-type") == "v5litepod-16"
    assert _flag(create, "--version") == "v2-alpha-tpuv5-lite"
    remote = [c for c in gcloud if c[3:5] in (["tpu-vm", "ssh"], ["tpu-vm", "scp"])]
    assert remote and all("--worker=all" in c for c in remote)
    payloads = [_flag(c, "--command") for c in gcloud if _flag(c, "--command")]
    install = next(p for p in payloads if "jax[tpu]" in p)
    assert "uv venv --python 3.12" in install and "-e ~/lbq" in install
    run = next(p for p in payloads if "lbq.main" in p)
    assert "LBQ_DISTRIBUTED=1" in run and "nohup" in run and "~/lbq-run.log" in run
    assert "--config=configs/imagenet_w2a2.py" in run
    assert '--workdir="$HOME"/gcs/lbq-bucket/runs/w2a2' in run
    assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 lbq-bucket" in run
    assert run.index("--workdir") < run.index("--config.batch_size=1024")
    assert "tail -n 100 -f ~/lbq-run.log" in proc.stdout  # how to follow the logs
    # A dry run says that it only printed the commands, never that it started anything.
    assert "Started" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("# Dry run: the commands above were only")
    order = [verbs.index("compute tpus tpu-vm create"), verbs.index("compute tpus tpu-vm scp")]
    order.append(
        next(i for i, c in enumerate(gcloud) if "lbq.main" in (_flag(c, "--command") or ""))
    )
    assert order == sorted(order)  # create, then install, then run
    for payload in payloads:  # the workers' shell must accept every command
        check = subprocess.run(["bash", "-n", "-c", payload], capture_output=True, text=True)
        assert check.returncode == 0, (payload, check.stderr)


def test_tpu_local_source_tarball_holds_the_checkout(no_gcloud, tmp_path):
    if (
        shutil.which("git") is None
        or subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode
    ):
        pytest.skip("the repository is not a git checkout")
    env, _ = no_gcloud
    proc = _run(TPU, [*TPU_ARGS[:-3], "--action=install", "--dry-run"], env)
    assert proc.returncode == 0, proc.stderr
    pack = next(c for c in _commands(proc.stdout) if c[0] == "bash")
    subprocess.run(pack, check=True, timeout=60)  # the printed step, run for real
    tarball = tmp_path / "lbq-lbq-pod.tar.gz"
    unpacked = tmp_path / "worker"
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        tar.extractall(unpacked, filter="tar")  # as `tar -xzf` on a worker, links included
    for expected in ("lbq/train.py", "configs/default.py", "launch/tpu_vm.sh", "pyproject.toml"):
        assert (unpacked / expected).is_file(), expected
    assert not any(n.startswith((".git/", "DATA/")) or "__pycache__" in n for n in names)


def test_tpu_queued_resource_and_delete(no_gcloud):
    env, marker = no_gcloud
    base = ["--name=lbq-q", "--zone=us-central2-b", "--accelerator-type=v4-32", "--dry-run"]
    proc = _run(TPU, [*base, "--queued", "--spot", "--action=create"], env)
    assert proc.returncode == 0, proc.stderr
    create = next(c for c in _commands(proc.stdout) if c[3:5] == ["queued-resources", "create"])
    assert create[5] == "lbq-q" and _flag(create, "--node-id") == "lbq-q"
    assert _flag(create, "--runtime-version") == "tpu-ubuntu2204-base"
    assert "--spot" in create and "--project" not in " ".join(create)
    assert "state.state" in proc.stdout  # waits for ACTIVE
    proc = _run(TPU, [*base, "--queued", "--action=delete"], env)
    assert _commands(proc.stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "delete",
            "lbq-q",
            "--zone=us-central2-b",
            "--force",
            "--quiet",
        ]
    ]
    proc = _run(TPU, [*base, "--action", "delete"], env)
    assert _commands(proc.stdout) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "delete",
            "lbq-q",
            "--zone=us-central2-b",
            "--quiet",
        ]
    ]
    proc = _run(TPU, [*base, "--reuse", "--action=create"], env)
    assert proc.returncode == 0 and not _commands(proc.stdout)
    assert not marker.exists()


def test_tpu_git_source_and_native_gcs(no_gcloud):
    env, _ = no_gcloud
    proc = _run(
        TPU,
        [
            "--name=t1",
            "--zone=z1",
            "--source=https://github.com/OWNER/lbq@v0.1",
            "--gcs=native",
            "--config=configs/default.py",
            "--workdir=gs://lbq-bucket/x",
            "--dry-run",
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    payloads = [_flag(c, "--command") for c in _commands(proc.stdout) if _flag(c, "--command")]
    assert any(
        "git clone --depth=1 --branch=v0.1 https://github.com/OWNER/lbq ~/lbq" in p
        for p in payloads
    )
    assert not any("gcsfuse" in p for p in payloads)
    assert any("--workdir=gs://lbq-bucket/x" in p for p in payloads)
    assert not any(c[0] == "bash" for c in _commands(proc.stdout))  # no local tarball


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone=z", "--config=c", "--workdir=gs://bkt/x"], "--name is required"),
        (["--name=n", "--config=c", "--workdir=gs://bkt/x"], "--zone is required"),
        (["--name=n", "--zone=z", "--workdir=gs://bkt/x"], "--config is required"),
        (["--name=n", "--zone=z", "--config=c"], "--workdir is required"),
        (["--name=n", "--zone=z", "--action=launch"], "--action must be"),
        (["--name=n", "--zone=z", "--bogus"], "unknown argument '--bogus'"),
        (["--name"], "--name needs a value"),
    ],
)
def test_tpu_bad_input_is_a_clear_error(no_gcloud, args, message):
    env, marker = no_gcloud
    proc = _run(TPU, [*args, "--dry-run"], env)
    assert proc.returncode == 2
    assert f"tpu_vm.sh: error: {message}" in proc.stderr
    assert not _commands(proc.stdout) and not marker.exists()


def _documented_tpu_command() -> list[str]:
    """The first `launch/tpu_vm.sh` command of docs/launch.md's TPU recipe, its arguments
    split as a shell would."""
    with open(os.path.join(REPO, "docs", "launch.md")) as f:
        text = f.read()
    section = text.split("\n## Cloud TPU VM", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    line = next(ln for ln in block.splitlines() if ln.startswith("launch/tpu_vm.sh "))
    return shlex.split(line)[1:]


def test_tpu_documented_command_runs_and_placeholders_are_named(no_gcloud):
    """docs/launch.md's command, with real-looking names, passes; upper-case placeholders copied
    from an example are named in a one-line error instead of a bare rejection."""
    env, marker = no_gcloud
    words = _documented_tpu_command()
    cut = words.index("--") if "--" in words else len(words)
    documented, passthrough = [*words[:cut], "--dry-run"], words[cut:]
    flags = {w.split("=", 1)[0] for w in documented}
    required = {"--name", "--zone", "--project", "--accelerator-type", "--config", "--workdir"}
    assert required <= flags, documented
    assert any(w.startswith("--workdir=gs://") for w in documented), documented
    proc = _run(TPU, [*documented, *passthrough], env)
    assert proc.returncode == 0, proc.stderr
    assert any("lbq.main" in (_flag(c, "--command") or "") for c in _commands(proc.stdout))
    for placeholder, message in [
        ("--workdir=gs://BUCKET/run", "--workdir=gs://BUCKET/run: 'BUCKET' is a placeholder"),
        ("--zone=ZONE", "--zone=ZONE is a placeholder"),
        ("--project=PROJECT", "--project=PROJECT is a placeholder"),
        ("--name=MY_TPU", "--name=MY_TPU is a placeholder"),
    ]:
        flag = placeholder.split("=", 1)[0]
        args = [a for a in documented if not a.startswith(flag + "=")] + [placeholder]
        proc = _run(TPU, args, env)
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"tpu_vm.sh: error: {message}"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and not _commands(proc.stdout)
    assert not marker.exists()


@pytest.mark.parametrize(
    "bucket, problem",
    [
        ("My-Bucket", "has upper-case letters"),
        ("ab", "must have 3 to 63 characters"),
        ("a" * 64, "must have 3 to 63 characters"),
        ("-abc", "must start and end with a letter or digit"),
        ("abc_", "must start and end with a letter or digit"),
        ("a b", "may hold only lower-case letters"),
        ("192.168.5.4", "is an IP address"),
        ("goog-runs", "starts with 'goog' or holds 'google'"),
        ("my-google-runs", "starts with 'goog' or holds 'google'"),
        ("runs." + "a" * 64, "has a dot-separated part longer than 63 characters"),
    ],
)
def test_tpu_workdir_bucket_follows_cloud_storage_naming(no_gcloud, bucket, problem):
    env, _ = no_gcloud
    args = ["--name=t", "--zone=z", "--config=configs/default.py", "--dry-run"]
    proc = _run(TPU, [*args, f"--workdir=gs://{bucket}/x"], env)
    assert proc.returncode == 2
    assert f"tpu_vm.sh: error: --workdir=gs://{bucket}/x: bucket name '{bucket}' {problem}" in (
        proc.stderr
    )


@pytest.mark.parametrize(
    "bucket", ["abc", "my_bucket-2", "a" * 63, "runs.example.com", f"{'a' * 63}.{'b' * 63}"]
)
def test_tpu_workdir_accepts_valid_bucket_names(no_gcloud, bucket):
    env, _ = no_gcloud
    args = ["--name=t", "--zone=z", "--config=configs/default.py", "--dry-run"]
    proc = _run(TPU, [*args, f"--workdir=gs://{bucket}/x", "--gcs=native"], env)
    assert proc.returncode == 0, proc.stderr
    payloads = [_flag(c, "--command") or "" for c in _commands(proc.stdout)]
    assert any(f"--workdir=gs://{bucket}/x" in p for p in payloads)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--name=Lbq", "--name 'Lbq' must be 1-63 lower-case letters"),
        ("--name=1lbq", "--name '1lbq' must be 1-63 lower-case letters"),
        ("--zone=us west", "--zone 'us west' is not a zone name"),
        ("--project=abc", "--project 'abc' is not a project ID"),
        ("--project=My-Project", "--project 'My-Project' is not a project ID"),
        ("--accelerator-type=tpu", "--accelerator-type 'tpu' is not a TPU type"),
        ("--worker=one", "--worker must be a worker number"),
        ("--config=configs/missing.py", "--config 'configs/missing.py' is not a file"),
    ],
)
def test_tpu_bad_names_are_clear_errors(no_gcloud, arg, message):
    env, marker = no_gcloud
    base = ["--name=t", "--zone=z", "--config=configs/default.py", "--workdir=gs://abc/x"]
    flag = arg.split("=", 1)[0]
    args = [a for a in base if not a.startswith(flag + "=")] + [arg, "--dry-run"]
    proc = _run(TPU, args, env)
    assert proc.returncode == 2
    assert f"tpu_vm.sh: error: {message}" in proc.stderr
    assert not _commands(proc.stdout) and not marker.exists()


def test_slurm_dry_run_prints_environment_and_srun(no_gcloud):
    env, marker = no_gcloud
    bin_dir = env["PATH"].split(":")[0]
    os.remove(os.path.join(bin_dir, "scontrol"))  # outside SLURM the node list is parsed here
    env = {
        **env,
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "gpu[07-09],cpu1",
        "SLURM_NNODES": "3",
        "SLURM_JOB_ID": "4242",
        "PYTHON": "python3",
    }
    proc = _run(
        SLURM,
        ["--config=configs/imagenet_w2a2.py", "--workdir=/shared/runs/a b"],
        env,
        cwd=str(marker.parent),
    )
    assert proc.returncode == 0, proc.stderr
    commands = _commands(proc.stdout)
    exports = dict(c[1].split("=", 1) for c in commands if c[0] == "export")
    assert exports["LBQ_COORDINATOR_ADDRESS"] == f"gpu07:{61440 + 4242 % 4096}"
    assert exports["LBQ_NUM_PROCESSES"] == "3" and exports["LBQ_DISTRIBUTED"] == "1"
    srun = next(c for c in commands if c[0] == "srun")
    assert "--ntasks-per-node=1" in srun and "--ntasks=3" in srun
    assert "export LBQ_PROCESS_ID=$SLURM_PROCID" in " ".join(srun)
    tail = srun[srun.index("python3") :]
    assert tail == [
        "python3",
        "-m",
        "lbq.main",
        "--config=configs/imagenet_w2a2.py",
        "--workdir=/shared/runs/a b",
        "--config.distributed=True",
    ]
    assert not marker.exists()
    with open(SLURM) as f:
        header = [line for line in f if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1\n" in header


def test_slurm_task_wrapper_sets_the_process_id(tmp_path):
    """The per-task wrapper of the srun line, run as SLURM would run it on two nodes."""
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "7",
        "PATH": "/usr/bin:/bin",
    }
    proc = _run(SLURM, ["--config=c", "--workdir=w"], env, cwd=str(tmp_path))
    srun = next(c for c in _commands(proc.stdout) if c[0] == "srun")
    wrapper = srun[srun.index("bash") : srun.index("python3")]
    for task in ("0", "1"):
        out = subprocess.run(
            [*wrapper, "sh", "-c", "echo $LBQ_PROCESS_ID"],
            text=True,
            env={**env, "SLURM_PROCID": task},
            capture_output=True,
            check=True,
        )
        assert out.stdout.strip() == task


def test_slurm_outside_slurm_is_a_clear_error(no_gcloud):
    env, _ = no_gcloud
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = _run(SLURM, ["--config=c", "--workdir=w"], env)
    assert proc.returncode == 2 and "SLURM_JOB_NODELIST is not set" in proc.stderr
    assert "--dry-run" in proc.stderr  # says how to see the commands without a cluster
    proc = _run(SLURM, ["--workdir=w"], {**env, "DRY_RUN": "1"})
    assert proc.returncode == 2 and "--config=CONFIG is required" in proc.stderr
    proc = _run(SLURM, ["--dry-run", "--config=c", "--workdir=w"], {**env, "LBQ_PORT": "70000"})
    assert proc.returncode == 2 and "LBQ_PORT must be a port number" in proc.stderr


def test_slurm_dry_run_outside_slurm_prints_stand_ins(no_gcloud):
    """`--dry-run` alone, with no SLURM variables: the commands with named stand-ins."""
    env, marker = no_gcloud
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k != "LBQ_PORT"}
    proc = _run(SLURM, ["--dry-run", "--config=configs/default.py", "--workdir=/runs/x"], env)
    assert proc.returncode == 0, proc.stderr
    first, last = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
    assert first.startswith("# Dry run outside SLURM (SLURM_JOB_NODELIST SLURM_NNODES")
    assert "HEAD_NODE for the job's first node" in first and "JOB_ID for its id" in first
    assert last.startswith("# Dry run: the commands above were only printed")
    commands = _commands(proc.stdout)
    exports = dict(c[1].split("=", 1) for c in commands if c[0] == "export")
    assert exports["LBQ_COORDINATOR_ADDRESS"] == "HEAD_NODE:PORT"
    with open(SLURM) as f:  # the node count sbatch would use: the script's own header
        nodes = next(line for line in f if line.startswith("#SBATCH --nodes=")).split("=")[1]
    assert exports["LBQ_NUM_PROCESSES"] == nodes.strip()
    srun = next(c for c in commands if c[0] == "srun")
    assert f"--ntasks={nodes.strip()}" in srun and srun[-1] == "--config.distributed=True"
    assert "scontrol requeue JOB_ID" in proc.stdout
    assert not marker.exists()
    # The variables that are set are used, and only the missing ones are stood in for.
    proc = _run(SLURM, ["--dry-run", "--config=c", "--workdir=w"], {**env, "SLURM_JOB_ID": "10"})
    exports = dict(c[1].split("=", 1) for c in _commands(proc.stdout) if c[0] == "export")
    assert exports["LBQ_COORDINATOR_ADDRESS"] == f"HEAD_NODE:{61440 + 10}"
    assert "JOB_ID" not in proc.stdout.splitlines()[0]


def test_local_dry_run_one_process_and_several(no_gcloud):
    env, _ = no_gcloud
    args = ["--config=configs/default.py:tiny", "--workdir=/tmp/lbq run"]
    proc = _run(LOCAL, ["--dry-run", *args], env)
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout)[-1] == ["python3", "-m", "lbq.main", *args]
    proc = _run(
        LOCAL,
        ["--dry-run", "--processes=2", "--port=12345", *args],
        {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"},
    )
    assert proc.returncode == 0, proc.stderr
    launches = [c for c in _commands(proc.stdout) if c[0] == "env"]
    assert len(launches) == 2 and _commands(proc.stdout)[-1] == ["wait"]
    for i, command in enumerate(launches):
        assert f"LBQ_PROCESS_ID={i}" in command and "LBQ_NUM_PROCESSES=2" in command
        assert "LBQ_COORDINATOR_ADDRESS=127.0.0.1:12345" in command
        assert f"CUDA_VISIBLE_DEVICES={'0,1' if i == 0 else '2,3'}" in command
        start = command.index("python3")
        assert command[start : start + 5] == ["python3", "-m", "lbq.main", *args]
        assert command[-1] == "&"
    assert launches[1][-4:] == [">", "/tmp/lbq run/logs/process_1.log", "2>&1", "&"]
    proc = _run(
        LOCAL, ["--dry-run", "--processes=3", *args], {**env, "CUDA_VISIBLE_DEVICES": "0,1"}
    )
    assert proc.returncode == 2 and "do not divide over 3 processes" in proc.stderr
    proc = _run(LOCAL, ["--dry-run", "--processes=0", *args], env)
    assert proc.returncode == 2 and "--processes must be a positive integer" in proc.stderr
    proc = _run(LOCAL, ["--dry-run", "--processes=2", "--port=http", *args], env)
    assert proc.returncode == 2 and "--port must be a port number" in proc.stderr


def test_local_dry_run_needs_no_python_and_says_it_ran_nothing(no_gcloud):
    env, _ = no_gcloud
    env = {**env, "PYTHON": "no-such-python"}
    args = ["--config=configs/default.py:tiny", "--workdir=/tmp/lbq_run"]
    proc = _run(LOCAL, ["--dry-run", "--processes=2", *args], env)
    assert proc.returncode == 0, proc.stderr
    launches = [c for c in _commands(proc.stdout) if c[0] == "env"]
    assert all("LBQ_COORDINATOR_ADDRESS=127.0.0.1:PORT" in c for c in launches)
    assert "PORT stands for a free port" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("# Dry run: the commands above were only")
    proc = _run(LOCAL, args, env)  # a real run names the missing interpreter
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "local.sh: error: PYTHON=no-such-python is not a command; activate the environment "
        "that has lbq, or set PYTHON"
    )
