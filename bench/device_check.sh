#!/usr/bin/env bash
# The GPU check, as one prepared script for a lent device machine (<= 8 minutes on one GPU):
#   detector training s/iter at 768 px, AMP off and on, against detectron2's DefaultTrainer;
#   detector inference images/s at 768 px; classifier images/s; the peak GPU memory of each.
# Arguments go to bench/device_check.py (--tiny: the same code at 64 px on a CPU, as the tests run it;
# --json FILE: the figures as JSON). The figures go into BENCHMARKS.md.
#
# Python: the project's .venv when it is there (here, CI); otherwise the machine's python3 (the
# lent GPU machine has PyTorch but no registry access), with the packages it lacks installed from
# .device-wheels/, which `bash bench/device_wheels.sh` fills on a machine with PyPI access; carry
# that folder along (the device tool's `carry`). Example, on the device machine:
#   bash bench/device_check.sh --json "$OUT/device_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/device_env.sh
exec timeout 480 "$PY" bench/device_check.py "$@"
