# Two commands set a fresh clone up from nothing: `make test` and `make train`.
# Every step is incremental: a second run only redoes what changed.

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
DEPS_STAMP  := $(VENV)/.deps-stamp
EXT_STAMP   := build/.ext-stamp
CSRC        := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS  ?= 2

.PHONY: all setup build test install-check train bench clean

all: build

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# pymks 0.4.1 is an sdist that imports setuptools at build time: build it without isolation,
# against the setuptools<80 pinned in requirements.txt (it needs pkg_resources).
$(DEPS_STAMP): requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps pymks==0.4.1
	$(PY) -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'pymks_vae_dev.pth'), 'w').write(os.path.abspath('.') + '\n')"
	touch $@

setup: $(DEPS_STAMP)

$(EXT_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

build: $(EXT_STAMP)

test: build
	$(PY) -m pytest -q -rfEs tests

# `pip install --no-build-isolation .` from a copy of the tree into a fresh venv that borrows this
# venv's packages, then `import pymks_vae` from elsewhere (about three minutes; see the script).
install-check: $(DEPS_STAMP)
	bash .ci/install_check.sh

train: build
	$(PY) examples/train_lines.py

bench: build
	$(PY) benchmarks/bench_two_point.py
	$(PY) benchmarks/bench_loss.py
	$(PY) benchmarks/bench_transformers.py
	$(PY) benchmarks/bench_training.py

clean:
	rm -rf build pymks_vae/_C*.so $(VENV)
