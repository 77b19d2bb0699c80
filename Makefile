# The README's two commands, `make bench` and `make test`, do all set-up on a fresh machine:
# a virtual env (seeing the system's packages, so a GPU machine's own torch is used), torch if
# none is importable, the project's dependencies, and the extension (rebuilt only on change).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
EXT_SRCS := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
PY_SRCS := fastdl kernels bench tests setup.py
CXX_SRCS = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: all build test bench lint format clean info gpu-check

all: build

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install setuptools wheel ninja
	FASTDL_NO_EXT=1 $(PIP) install --no-build-isolation -e ".[test,bench,dev]"
	touch $@

$(VENV)/.ext: $(VENV)/.deps $(EXT_SRCS)
	mkdir -p build && MAX_JOBS=$${MAX_JOBS:-$$(nproc)} flock build/.lock $(PY) setup.py -q build_ext --inplace
	touch $@

build: $(VENV)/.ext

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) -m bench $(BENCH_ARGS)

# On a lent GPU machine with its own torch and no package registry (no venv, no installs): the
# extension in place (sm_90a unless FASTDL_CUDA_ARCHS says otherwise), the test cases matching
# GPU_TESTS, then each family's CUDA benchmarks against torch eager, merged into
# bench/results/<gpu>.json; each phase under a time limit (seconds), logs in GPU_OUT.
GPU_OUT ?= gpu-out
GPU_TESTS ?= cuda
GPU_TEST_S ?= 240
GPU_FAMILIES ?= norm attention conv int8 graph rnn patch models
GPU_BENCH_S ?= 90
gpu-check:
	mkdir -p $(GPU_OUT)
	FASTDL_NO_EXT=1 $(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	FASTDL_CUDA_ARCHS=$${FASTDL_CUDA_ARCHS:-90a} MAX_JOBS=$$(nproc) \
	  $(PYTHON) setup.py -q build_ext --inplace >$(GPU_OUT)/build.log 2>&1
	-timeout -s INT -k 15 $(GPU_TEST_S) $(PYTHON) -m pytest -q -k "$(GPU_TESTS)" \
	  --ignore=tests/test_gpu_build.py -p no:cacheprovider --tb=short -rfE \
	  $$($(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 14") \
	  --junitxml=$(GPU_OUT)/junit.xml >$(GPU_OUT)/test.log 2>&1
	-for f in $(GPU_FAMILIES); do \
	  timeout -s INT -k 10 $(GPU_BENCH_S) $(PYTHON) -m bench --family $$f --device cuda \
	    --no-compile >>$(GPU_OUT)/bench.log 2>&1; echo "bench $$f: exit $$?" >>$(GPU_OUT)/bench.log; \
	done

info: build
	$(PY) -m fastdl info

lint: $(VENV)/.deps
	$(PY) -m ruff check $(PY_SRCS)
	$(PY) -m ruff format --check $(PY_SRCS)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SRCS)

format: $(VENV)/.deps
	$(PY) -m ruff check --fix $(PY_SRCS)
	$(PY) -m ruff format $(PY_SRCS)
	$(VENV)/bin/clang-format -i $(CXX_SRCS)

clean:
	rm -rf build fastdl/*.so $(VENV)/.ext
