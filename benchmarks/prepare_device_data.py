"""Prepares, on this machine, what an accelerator call of the suite carries: data and wheels.

A device machine starts bare and reaches no network (docs/accelerator.md, "Before the call",
lists what this does). Run from the repository root before the call:

    python benchmarks/prepare_device_data.py            # then: see docs/accelerator.md
    python benchmarks/prepare_device_data.py --check    # only print what the call carries

The pinned versions are the ones this repository's CI environment tests.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lbq.io import sha256  # noqa: E402

ARCHIVE = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg.tar.gz")
ARCHIVE_SHA256 = "097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297"
CARRY = ("DATA", ".whl")
CARRY_LIMIT_BYTES = 64 * 2**20
# Missing on the device: lbq's own needs (requirements.txt) and their dependencies that the
# device image lacks (absl-py, etils, numpy, protobuf, psutil, pyarrow, requests, tqdm, wrapt,
# pyyaml, six, attrs, typing-extensions are there). protobuf is carried as well: the suite
# installs it only if the TFDS imports fail with the device's own.
WHEELS = (
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "tensorboardX==2.6.5",
    "array-record==0.8.6",
    "dm-tree==0.1.10",
    "simple-parsing==0.1.9",
    "tensorflow-metadata==1.21.0",
    "immutabledict==4.3.1",
    "googleapis-common-protos==1.76.0",
    "docstring-parser==0.18.0",
    "termcolor==3.3.0",
    "toml==0.10.2",
    "protobuf==7.36.2",
)
# Published only as source archives: built into wheels here (pure Python).
SOURCE_ONLY = ("promise==2.3",)
PLATFORMS = [f"manylinux_2_{v}_x86_64" for v in (28, 27, 24, 17)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]


def copy_archive(source: str) -> str:
    """Copies the archive into DATA/ after checking its sha256; returns the target path."""
    if not os.path.exists(source):
        raise SystemExit(f"prepare_device_data: error: archive {source} not found (--archive)")
    found = sha256(source)
    if found != ARCHIVE_SHA256:
        raise SystemExit(
            f"prepare_device_data: error: {source} has sha256 {found}, not {ARCHIVE_SHA256}"
        )
    target = os.path.join(ROOT, "DATA", "cifar10-jpeg.tar.gz")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.exists(target) or sha256(target) != ARCHIVE_SHA256:
        shutil.copyfile(source, target)
    return target


def record_commit() -> str:
    from lbq.bench import git_commit

    commit = git_commit(ROOT) or ""
    with open(os.path.join(ROOT, "DATA", "source_commit.txt"), "w") as f:
        f.write(commit + "\n")
    return commit


def download_wheels(folder: str) -> list[str]:
    """The wheels of `WHEELS` and `SOURCE_ONLY` for CPython 3.12 manylinux x86-64."""
    os.makedirs(folder, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", folder]
    cmd += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(cmd + list(WHEELS), check=True)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder]
    subprocess.run(build + list(SOURCE_ONLY), check=True)
    # One version of each, no strays: 'array-record==0.8.6' is array_record-0.8.6-*.whl.
    wanted = {spec.replace("-", "_").lower().replace("==", "-") for spec in WHEELS + SOURCE_ONLY}
    for path in glob.glob(os.path.join(folder, "*.whl")):
        name, version = os.path.basename(path).split("-")[:2]
        if f"{name.lower()}-{version}" not in wanted:
            os.remove(path)
    return sorted(os.listdir(folder))


def exclude(pattern: str) -> None:
    """Adds ``pattern`` to .git/info/exclude (git-ignored here, not in the shared .gitignore)."""
    path = os.path.join(ROOT, ".git", "info", "exclude")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    if pattern not in lines:
        with open(path, "a") as f:
            f.write(pattern + "\n")


def carry_sizes() -> dict[str, int]:
    """Bytes that a call carries: the travelling tree and each carried path."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.check_output(cmd, cwd=ROOT, text=True, stderr=subprocess.DEVNULL)
    paths = [os.path.join(ROOT, rel) for rel in listed.split("\0") if rel]
    files = [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]
    sizes = {"working tree": sum(map(os.path.getsize, files))}
    for name in CARRY:
        walked = os.walk(os.path.join(ROOT, name))
        sizes[name] = sum(os.path.getsize(os.path.join(b, f)) for b, _, fs in walked for f in fs)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default=ARCHIVE, help="the CIFAR-10 JPEG archive")
    parser.add_argument("--check", action="store_true", help="only report the carry size")
    args = parser.parse_args(argv)
    if not args.check:
        target = copy_archive(args.archive)
        print(f"archive: {os.path.relpath(target, ROOT)} (sha256 ok)")
        print(f"commit: {record_commit()}")
        exclude("/.whl/")
        exclude("/DATA/")
        wheels = download_wheels(os.path.join(ROOT, ".whl"))
        print(f"wheels ({len(wheels)}): {', '.join(wheels)}")
    sizes = carry_sizes()
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"  {name:<14}{size / 2**20:8.1f} MiB")
    verdict = "fits" if total <= CARRY_LIMIT_BYTES else "DOES NOT FIT"
    print(f"  {'total':<14}{total / 2**20:8.1f} MiB of 64 MiB: {verdict}")
    return 0 if total <= CARRY_LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
