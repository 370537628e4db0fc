# Every target creates the environment it needs on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests and CI read the real MNIST from here; users' runs download it.
XPMLP_DATA_DIR ?= $(abspath ../shared/data/mnist)
export XPMLP_DATA_DIR

.PHONY: test train bench reproduce gpu-check clean venv

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet 'torch==2.13.0' || echo "note: torch (test oracle) not installed; oracle tests will skip"
	$(PY) -m pip install --quiet cupy-cuda12x || echo "note: cupy not installed; CuPy error-path tests will skip"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(VENV)/bin/xpmlp train --model mlp2-relu-sce --epochs 100 --device auto

bench: $(STAMP)
	$(VENV)/bin/xpmlp bench

reproduce: $(STAMP)
	$(VENV)/bin/xpmlp sweep experiments/reproduce.toml --jobs 2 --device cpu
	$(VENV)/bin/xpmlp report --sweep experiments/reproduce.toml --out experiments/results

gpu-check:
	bash experiments/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
