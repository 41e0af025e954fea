# Everything runs in a virtual environment inside the checkout (.venv), created on first use.
#   make demo   set up, build, run the main job on built-in data (the benchmark summary)
#   make test   set up, build, run the test suite
#   make bench  the full benchmark suite (pytest bench), JSON in .benchmarks/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastseg-deps

.PHONY: setup build test demo bench clean

# Dependencies first (torch is needed to build the extension, so it is not built in isolation);
# the package itself is installed editable without compiling, `build` compiles in place.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q "torch==2.14.1" ninja numpy
	FASTSEG_BUILD_EXT=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

setup: $(STAMP)

# Incremental (ninja): only changed C++/CUDA sources recompile. FASTSEG_CUDA=0/1 forces CUDA off/on.
build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest tests -m "not slow"

demo: build
	$(PY) -m fastseg bench

bench: build
	mkdir -p .benchmarks
	$(PY) -m pytest bench --benchmark-json=.benchmarks/latest.json
	$(PY) bench/summary.py .benchmarks/latest.json

clean:
	rm -rf build fastseg/_C*.so
