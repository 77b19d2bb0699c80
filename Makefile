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

.PHONY: all build test bench lint format clean info

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
