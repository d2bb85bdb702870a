#!/usr/bin/env bash
# Fill .device-wheels/ with what bench/device_check.sh needs on a GPU machine that has PyTorch,
# torchvision, numpy, pandas, OpenCV, scikit-learn, matplotlib, numba, tensorboard, portalocker
# and cloudpickle but no registry access (the lent nvidia-h200 image, Python 3.12): the pinned
# pure-Python packages, the cp312 wheels of the compiled ones, and a detectron2 wheel built from
# the patched sdist (tools/install_detectron2.py --wheel-dir). They are installed there with
# --no-deps. fastprogress imports fasthtml, which imports starlette, python-multipart and
# itsdangerous: the image has none of them. Run here (PyPI reachable), then carry .device-wheels
# (a few MB) to the device machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.device-wheels
mkdir -p "$OUT"
pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }
"$PY" -m pip download --quiet --no-deps --dest "$OUT" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "$(pin pycocotools)" "$(pin simplejpeg)" "$(pin plum-dispatch)"
"$PY" -m pip download --quiet --no-deps --dest "$OUT" \
    "$(pin fastai)" "$(pin fvcore)" "$(pin iopath)" "$(pin yacs)" "$(pin omegaconf)" \
    "$(pin hydra-core)" "$(pin termcolor)" fastcore==2.2.41 fastprogress==1.1.6 fasttransform==0.0.5 \
    fastdownload==0.0.8 beartype==0.23.1 antlr4-python3-runtime==4.9.3 \
    python-fasthtml==0.14.14 starlette==1.10.0 python-multipart==0.0.34 itsdangerous==2.2.0
"$PY" tools/install_detectron2.py --wheel-dir "$OUT"
# Scene detection (module_detect, bench/bench_detect.py) in a subfolder, installed there with pip's
# resolver against what the image has (bench/device_tests.sh): rasterio and shapely with the
# dependencies the image may lack, and SAHI (installed --no-deps: it requires opencv-python) with fire.
mkdir -p "$OUT/detect"
"$PY" -m pip download --quiet --no-deps --dest "$OUT/detect" --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "$(pin rasterio)" "$(pin shapely)" "$(pin affine)" "$(pin cligj)" "$(pin click-plugins)" \
    attrs certifi click pyparsing sahi==0.12.8 fire termcolor
ls -la "$OUT" "$OUT/detect"
du -sh "$OUT"
