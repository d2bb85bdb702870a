#!/usr/bin/env bash
# Scene detection's benches on a lent GPU, as one prepared script (device time is short): the
# scene gate split into its parts (bench/bench_gate.py), then bench/bench_detect.py on the rendered
# scene of seed 0 at 4,096 px (gated, ungated and SAHI, all on MODEL.DEVICE) and at 8,192 px (gated
# and ungated). Each bench's printout and bench_detect's summary JSON go to OUT; the scenes and
# their outputs stay in a scratch folder (50-200 MB a scene: too big to bring back).
#
# Here, before: bash bench/device_wheels.sh (carried to an earlier call, which installs them);
#               bash bench/device_run.sh runs/demo (the run's models and thresholds -> runs/device).
# On the device machine, carrying runs/device:
#   bash bench/device_scene.sh "$OUT"
# Arguments after OUT replace `--run runs/device` and go to every bench (e.g. --config
# configs/tiny.yaml --run R KEY VALUE ...); SCENE_GRIDS (default "16 32") sets the scenes' cells per
# side, the first with SAHI too; GATE_SLICES (default 320) the slices bench_gate.py times a round.
# A bench that fails is reported and the others still run; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/device_scene.sh OUT [bench arguments]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICE_DETECT=1
source bench/device_env.sh
RUN_ARGS=("$@")
[ ${#RUN_ARGS[@]} -eq 0 ] && RUN_ARGS=(--run runs/device)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
FAILED=()

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '',
      'CPU capability', torch.backends.cpu.get_cpu_capability())" | tee "$OUT/device.txt"

echo "== bench_gate.py"
"$PY" bench/bench_gate.py --n "${GATE_SLICES:-320}" "${RUN_ARGS[@]}" 2>&1 | tee "$OUT/bench_gate.log" \
    || FAILED+=(bench_gate)

methods=gated,ungated,sahi
for grid in ${SCENE_GRIDS:-16 32}; do
    echo "== bench_detect.py --grid $grid --methods $methods"
    if "$PY" bench/bench_detect.py --grid "$grid" --seed 0 --methods "$methods" --out "$SCRATCH/grid$grid" \
            "${RUN_ARGS[@]}" 2>&1 | tee "$OUT/bench_detect_grid$grid.log"; then
        cp "$SCRATCH/grid$grid/summary.json" "$OUT/bench_detect_grid$grid.json"
    else
        FAILED+=("bench_detect --grid $grid")
    fi
    rm -rf "${SCRATCH:?}/grid$grid"
    methods=gated,ungated
done

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "device_scene: failed: ${FAILED[*]}" >&2
    exit 1
fi
echo "device_scene: every bench ran; outputs in $OUT"
