# Two entry points that work on a fresh clone: `make sample` (the main job) and `make test`.
# Both create .venv, install torch and the build/test tools, and build raekern into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel unless an NVIDIA driver is present; override with `make test TORCH_SPEC=...`.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch==2.14.1 || echo torch==2.13.0)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv build test bench info sample clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q numpy pytest pytest-benchmark hypothesis safetensors matplotlib ninja cmake scikit-learn transformers
	touch $@

venv: $(VENV)/.deps

build: venv
	$(PY) -m pip install -q --no-build-isolation -e .

test: build
	$(PY) -m pytest python_tests $(PYTEST_ARGS)

bench: build
	$(VENV)/bin/raekern bench $(BENCH_ARGS)

info: build
	$(VENV)/bin/raekern info

clean:
	rm -rf build $(VENV) raekern/_C*.so raekern/_emu*.so

sample: build
	$(VENV)/bin/raekern sample $(SAMPLE_ARGS)
