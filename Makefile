# One entry point. `make demo` runs the whole pipeline; `make test` runs the tests.
# Both set up .venv first (idempotent: quick when nothing changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/airbus.yaml
PYTEST_ARGS ?=

.PHONY: setup system-deps test docker-test docker-test-deps demo run bench clean

setup: $(STAMP)

# The requirements go in with uv (tools/install_requirements.py: under pip's own configuration,
# 4x faster than pip here; AIRBUS_INSTALLER=pip installs with pip instead).
$(STAMP): requirements.txt tools/install_requirements.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3 uv==0.13.8
	$(PY) tools/install_requirements.py requirements.txt
	$(PY) tools/install_detectron2.py
	touch $@

# Debian packages the browser tests use (Chromium). Needs root; skipped with a note otherwise.
system-deps:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: present"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && echo "chromium: installed"; \
	else echo "chromium: missing and not root; the browser tests will skip (apt-get install chromium)"; fi

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The Docker image built and run for real (tests/container/, README "Docker"): buildah and a
# Debian 12 stand-in base from debootstrap, no Docker daemon. Needs root; installs the two tools.
docker-test-deps:
	@missing=""; for tool in buildah debootstrap; do command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then echo "buildah, debootstrap: present"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null && echo "installed:$$missing"; \
	else echo "missing:$$missing (needs root: apt-get install$$missing)" >&2; exit 1; fi

docker-test: setup docker-test-deps
	AIRBUS_DOCKER_TEST=1 $(PY) -m pytest -s tests/container $(PYTEST_ARGS)

demo: setup
	$(PY) run_notebook.py --config configs/demo.yaml

run: setup
	$(PY) run_notebook.py --config $(CONFIG)

bench: setup
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf runs/demo .pytest_cache
