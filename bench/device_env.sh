# Sourced by bench/device_check.sh and bench/device_tests.sh: sets PY to the Python to run and, on
# a lent GPU machine (no .venv, no registry access), installs what the image lacks from the
# .device-wheels/ that `bash bench/device_wheels.sh` fills where PyPI is reachable (carry it along:
# the device tool's `carry`). DEVICE_DETECT=1 adds scene detection's packages (rasterio, shapely,
# SAHI) from .device-wheels/detect/, resolved against the image's own packages.
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    if ! "$PY" -c "import detectron2, fastai, pycocotools, simplejpeg" 2>/dev/null; then
        if [ ! -d .device-wheels ]; then
            echo "device: no .venv and no .device-wheels/ (run bench/device_wheels.sh where PyPI is reachable)" >&2
            exit 2
        fi
        # wheels and the few sdists (fvcore, iopath, yacs), built with the image's setuptools
        "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation .device-wheels/*.whl .device-wheels/*.tar.gz
    fi
    if [ "${DEVICE_DETECT:-0}" = 1 ] && ! "$PY" -c "import rasterio, shapely, sahi" 2>/dev/null; then
        "$PY" -m pip install --quiet --no-index --find-links .device-wheels/detect \
            rasterio shapely affine cligj click-plugins fire
        "$PY" -m pip install --quiet --no-index --no-deps .device-wheels/detect/sahi-*.whl
    fi
fi
export PYTHONUNBUFFERED=1
