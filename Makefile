# Everything runs in a virtual environment inside the checkout (.venv), created on first use.
#   make demo   set up, build, run the main job on built-in data: train LGMSNet with the fused
#               kernels on synthetic-2d, then score it on its held-out test split
#   make test   set up, build, run the test suite
#   make bench  the full benchmark suite (pytest bench), JSON in .benchmarks/
#   make gpu-report  compile every kernel for sm_80/sm_90 (no GPU needed): registers, spills
#   make gpu-check   the part of it CI runs: sm_90, the configs the models launch, every dtype
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastseg-deps

.PHONY: setup build test test-slow demo bench gpu-report gpu-check clean

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

test-slow: build
	$(PY) -m pytest tests -m slow

DEMO := runs/demo
# --resume: a second `make demo` (or one after Ctrl-C) continues from runs/demo/last.pt.
demo: build
	$(PY) -m fastseg train --model lgmsnet --data synthetic-2d --size 96 --epochs 16 --backend cpu --out $(DEMO) --resume
	$(PY) -m fastseg evaluate --checkpoint $(DEMO)/best.pt --data $(DEMO)/data/synthetic-2d --split test --backend cpu

bench: build
	mkdir -p .benchmarks
	$(PY) -m pytest bench --benchmark-json=.benchmarks/latest.json
	$(PY) bench/summary.py .benchmarks/latest.json

# Needs no GPU and no built extension: Triton and nvcc compile for the targets ahead of time.
gpu-report: setup
	$(PY) -m fastseg gpu-report

gpu-check: setup
	$(PY) -m fastseg gpu-report --arch 90

clean:
	rm -rf build fastseg/_C*.so
