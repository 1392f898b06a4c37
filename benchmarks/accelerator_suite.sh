#!/usr/bin/env bash
# The accelerator suite's entry point on a device machine (docs/accelerator.md has the call).
#
#   bash benchmarks/accelerator_suite.sh [--budget SECONDS] [--parts ...] [--tiny]
#
# Writes its files into $OUT (the device tool's output folder; /tmp/lbq_suite_out elsewhere).
# Carried wheels (.whl/) and the CIFAR-10 archive (DATA/) are prepared beforehand with
# `python benchmarks/prepare_device_data.py`; the suite installs and builds from them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lbq_suite_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/accelerator_suite.py --out "$OUT" "$@"
