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
	# test: pytest + array-api-strict; oracle: CPU PyTorch; cuda12: real CuPy, so the
	# "CuPy present, no GPU" error path is tested even on machines without one;
	# fast: Numba's fused CPU kernels.
	$(PY) -m pip install --quiet -e '.[fast,test,oracle,cuda12]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(VENV)/bin/xpmlp train --model mlp2-relu-sce --epochs 100 --device auto

bench: $(STAMP)
	$(VENV)/bin/xpmlp bench

reproduce: $(STAMP)
	$(VENV)/bin/xpmlp sweep experiments/table11_models.toml experiments/table12_learning_rate.toml \
	    experiments/table13_momentum.toml experiments/table14_batch_size.toml --jobs 2 --device cpu
	$(VENV)/bin/xpmlp report --runs-under runs/reproduce --out experiments/results --copy-runs

gpu-check:
	bash experiments/gpu_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
