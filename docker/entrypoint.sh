#!/bin/sh
# Container entrypoint: TensorBoard on 6006 serving runs/ in the background, JupyterLab on 8888
# in the foreground (PID 1's child under `init: true`, so `docker compose stop` ends both).
# The Jupyter token comes from $JUPYTER_TOKEN (jupyter_server reads it); there is no default.
#
# A command instead of options runs that command, not the Lab:
#   docker run --rm -v "$PWD:/workspace" IMAGE python run_notebook.py --config configs/tiny.yaml
set -eu
case "${1:-}" in
    "" | -*) ;;
    *) exec "$@" ;;
esac
: "${JUPYTER_TOKEN:?set JUPYTER_TOKEN (e.g. export JUPYTER_TOKEN=\$(openssl rand -hex 16))}"
mkdir -p "${RUNS_DIR:-/workspace/runs}"
tensorboard --logdir "${RUNS_DIR:-/workspace/runs}" --host 0.0.0.0 --port 6006 &
# An image built with PREFETCH_WEIGHTS=0 has no pretrained weights: name each missing file and
# where it goes, then start the Lab anyway (configs without pretrained weights need none).
python /workspace/tools/prefetch_weights.py --check --config /workspace/configs/airbus.yaml || true
exec jupyter lab --ip=0.0.0.0 --port=8888 --no-browser \
    --ServerApp.root_dir=/workspace "$@"
