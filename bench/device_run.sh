#!/usr/bin/env bash
# Copy what scene detection's benches need of a run (its config, the classifier export, the best
# detector weights, the tuned thresholds; 28 MB for the demo's) into runs/device/, to carry to a
# lent GPU machine (the device tool's `carry`, 64 MiB in all: .device-wheels/ is 42 MB, so carry
# the two in separate calls while the machine stays warm). On the device machine, every scene bench
# in one call: bash bench/device_scene.sh "$OUT"
# Usage: bash bench/device_run.sh [runs/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
OUT=runs/device
NEEDED="config.yaml classifier/export.pkl detector/model_best.pth submission/thresholds.yaml"
OPTIONAL="classifier/export.json classifier/config.yaml detector/model_best.json detector/config.yaml"
for f in $NEEDED; do
    [ -f "$RUN/$f" ] || { echo "device_run: $RUN/$f is missing (a finished run: make demo)" >&2; exit 2; }
done
rm -rf "$OUT"
for f in $NEEDED $OPTIONAL; do
    if [ -f "$RUN/$f" ]; then
        mkdir -p "$(dirname "$OUT/$f")"
        cp "$RUN/$f" "$OUT/$f"
    fi
done
du -sh "$OUT"
