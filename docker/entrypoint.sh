#!/bin/sh
# Container entrypoint: TensorBoard on 6006 serving runs/ in the background, JupyterLab on 8888
# in the foreground (PID 1's child under `init: true`, so `docker compose stop` ends both).
# The Jupyter token comes from $JUPYTER_TOKEN (jupyter_server reads it); there is no default.
set -eu
: "${JUPYTER_TOKEN:?set JUPYTER_TOKEN (e.g. export JUPYTER_TOKEN=\$(openssl rand -hex 16))}"
mkdir -p "${RUNS_DIR:-/workspace/runs}"
tensorboard --logdir "${RUNS_DIR:-/workspace/runs}" --host 0.0.0.0 --port 6006 &
exec jupyter lab --ip=0.0.0.0 --port=8888 --no-browser \
    --ServerApp.root_dir=/workspace "$@"
