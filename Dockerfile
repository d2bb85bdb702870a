# GPU JupyterLab for the Airbus ship pipeline: JupyterLab on 8888 (entrypoint), TensorBoard on
# 6006 serving runs/. Build and start with `docker compose up --build` (see docker-compose.yml).
#
# Base image: plain python:3.11-slim, not nvidia/cuda. PyPI's torch wheels for Linux x86_64 carry
# the CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so the same pinned requirements.txt that
# runs on CPU here brings CUDA inside the image; the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit (docker-compose.yml reserves the GPU). That keeps one set of pins for
# laptop, CI and container, and saves the ~3 GB of a cudnn-devel base that nothing here compiles
# against (detectron2 is installed without its C++/CUDA extension, see tools/install_detectron2.py).
#
# BASE_IMAGE: the official python:3.11-slim-bookworm. `make docker-test` passes a stand-in built
# from Debian 12's own packages (python3.11 3.11.2), where the official image cannot be pulled.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# UID of the non-root user; match your own (`--build-arg UID=$(id -u)`) so files written into the
# bind-mounted runs/ belong to you.
ARG UID=1000

# NUMBA_CACHE_DIR: where numba keeps the compiled RLE loops (module_rle_kernels), writable by the
# user whatever the bind-mounted code folder allows.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NUMBA_CACHE_DIR=/opt/venv/numba-cache

RUN groupadd --gid "${UID}" airbus \
    && useradd --create-home --uid "${UID}" --gid "${UID}" --shell /bin/bash airbus \
    && mkdir -p /opt/venv /workspace \
    && chown airbus:airbus /opt/venv /workspace

USER ${UID}:${UID}
WORKDIR /workspace

# The same pinned requirements and the same detectron2 installer as `make setup`. Nothing of the
# install stays behind in this layer: no pip cache, no sdist. playwright goes (its Node driver is
# 165 MB): it drives Chromium for the browser tests, and the image has no Chromium. The bytecode
# (~350 MB) stays: without it every kernel would compile its imports again, ~10 s each start.
COPY --chown=airbus:airbus requirements.txt /workspace/requirements.txt
COPY --chown=airbus:airbus tools/install_detectron2.py /workspace/tools/install_detectron2.py
RUN python -m venv /opt/venv \
    && python -m pip install --no-cache-dir pip==25.3 \
    && python -m pip install --no-cache-dir -r requirements.txt \
    && python tools/install_detectron2.py --cache-dir /tmp/detectron2-sdist \
    && python -m pip uninstall --yes playwright \
    && rm -rf /tmp/detectron2-sdist

# JupyterLab: no news/update popup (the container has no reason to phone home).
COPY --chown=airbus:airbus docker/overrides.json /opt/venv/share/jupyter/lab/settings/overrides.json

# Pretrained weights, fetched now so the container runs offline: COCO Mask R-CNN R50-FPN into
# detectron2's cache (~/.torch/iopath_cache/detectron2/COCO-InstanceSegmentation/
# mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl) and ImageNet ResNet34 into the torch hub
# cache (~/.cache/torch/hub/checkpoints/resnet34-b627a593.pth), both under the user's home.
# PREFETCH_WEIGHTS=0 builds without them (offline or air-gapped builds) but with their folders,
# the user's, so the two files can be copied or mounted in afterwards (README, Docker); until
# then the entrypoint names each missing file.
# The script reads the config through module_config, which imports sibling modules: all of them.
COPY --chown=airbus:airbus module_*.py /workspace/
COPY --chown=airbus:airbus configs /workspace/configs
COPY --chown=airbus:airbus tools/prefetch_weights.py /workspace/tools/prefetch_weights.py
ARG PREFETCH_WEIGHTS=1
RUN case "${PREFETCH_WEIGHTS}" in \
        1) python tools/prefetch_weights.py --config configs/airbus.yaml ;; \
        0) echo "PREFETCH_WEIGHTS=0: no pretrained weights in this image; they go to:" \
           && python tools/prefetch_weights.py --config configs/airbus.yaml --make-folders ;; \
        *) echo "PREFETCH_WEIGHTS must be 0 or 1, not ${PREFETCH_WEIGHTS}" >&2; exit 1 ;; \
    esac

# The code last: editing it does not invalidate the layers above. docker-compose.yml also
# bind-mounts the checkout over /workspace, so edits show up without a rebuild.
COPY --chown=airbus:airbus . /workspace
COPY docker/entrypoint.sh /usr/local/bin/airbus-entrypoint

EXPOSE 8888 6006
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/api', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/airbus-entrypoint"]
