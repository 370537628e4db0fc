# Every target creates the environment it needs on a fresh clone.
VENV   ?= .venv
# Windows (GNU make from Git for Windows or MSYS2): a venv keeps its programs in Scripts,
# and Python is `python`; elsewhere in bin, and `python3`.
ifeq ($(OS),Windows_NT)
  PYTHON ?= python
  BIN    := $(VENV)/Scripts
else
  PYTHON ?= python3
  BIN    := $(VENV)/bin
endif
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
# Development and CI read the real MNIST from ../shared/data/mnist when it exists;
# elsewhere the data lives in the per-user cache (~/.cache/xpmlp/mnist), downloaded
# and verified on first use.  An XPMLP_DATA_DIR set by the caller wins.
ifeq ($(origin XPMLP_DATA_DIR),undefined)
  ifneq ($(wildcard ../shared/data/mnist/SHA256SUMS.uncompressed),)
    export XPMLP_DATA_DIR := $(abspath ../shared/data/mnist)
  endif
endif

.PHONY: test train bench reproduce report gpu-check clean venv

# Extras: test = pytest + array-api-strict; oracle = CPU PyTorch; cuda12 = real CuPy, so
# the "CuPy present, no GPU" error path is tested even on machines without one (Linux and
# Windows only: pyproject.toml's markers make it nothing on macOS);
# fast = Numba's fused CPU kernels; ray = Ray, so the sweep's Ray executor is tested on a real
# local Ray instance (tests/test_sweep_ray.py); torch = array-api-compat, so the torch backend's
# cases (the cross-backend fixture's torch, tests/test_torch_backend.py) run on CPU torch.
venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[fast,test,oracle,cuda12,ray,torch]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/xpmlp data  # the tests train on the real MNIST: find or download it, verify it
	$(PY) -m pytest -q

train: $(STAMP)
	$(BIN)/xpmlp train --model mlp2-relu-sce --epochs 100 --device auto

bench: $(STAMP)
	$(BIN)/xpmlp bench

# The whole reproduction: restartable (rerun it after an interruption: finished runs are
# skipped, interrupted ones resume), then the records and tables under experiments/results.
REFERENCE := experiments/published.toml
reproduce: $(STAMP)
	$(BIN)/xpmlp sweep experiments/table11_models.toml experiments/table12_learning_rate.toml \
	    experiments/table13_momentum.toml experiments/table14_batch_size.toml --jobs 2 --device cpu
	$(BIN)/xpmlp report --runs-under runs/reproduce --published $(REFERENCE) --out experiments/results --copy-runs
	$(PY) experiments/confusion_table11.py runs/reproduce experiments/results/fig_confusion_table11.png

# Tables and figures again from the committed records alone: no training, no data.
report: $(STAMP)
	$(BIN)/xpmlp report --runs-under experiments/results/runs --published $(REFERENCE) --out experiments/results

gpu-check:
	PYTHON=$(PYTHON) bash experiments/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
