#!/usr/bin/env bash
# The tests whose code paths change with the device, as one prepared script for a lent GPU machine:
# the classifier, detector, training, inference, submission, tuning and scene-detection tests
# (the notebooks' tests, `-k "not notebook"`, need papermill, which the image lacks; the
# container's and the install's need buildah or a registry). Python and packages as in bench/device_check.sh (bench/device_env.sh; carry
# .device-wheels/). Arguments replace the test list; TESTS_TIMEOUT (s, default 300) bounds the run.
# Example, on the device machine:
#   bash bench/device_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DETECT=1
source bench/device_env.sh
if [ $# -eq 0 ]; then
    set -- tests/test_classifier.py tests/test_train.py tests/test_inference.py tests/test_detect.py \
        tests/test_submit.py tests/test_submit_models.py tests/test_tuning.py tests/test_budget.py \
        -k "not notebook"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec timeout "${TESTS_TIMEOUT:-300}" "$PY" -m pytest -p no:cacheprovider -q -rfE --durations=10 "$@"
