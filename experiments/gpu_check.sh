#!/usr/bin/env bash
# `make gpu-check`: the one-shot check of the CuPy path on a machine with one CUDA GPU and no
# package index (CuPy, PyTorch, pytest, NumPy and setuptools preinstalled).  Installs xpmlp
# without dependencies when it is not importable yet, then runs experiments/gpu_check.py
# (preflight, CuPy tests, GPU bench, one JSON record: see that file).  MNIST is not needed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null || PYTHON=python
PY=("$PYTHON")
# Installed already, from this checkout (not a stale copy elsewhere)?
repo=$PWD
if ! (cd / && "$PYTHON" -c "import sys, xpmlp.backends; sys.exit(not xpmlp.__file__.startswith('$repo/'))") 2>/dev/null; then
  # --no-index: the lent machine has no package index, and pip would spend seconds looking for one.
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . ; then
    # An old setuptools without 'wheel' cannot build an editable install: stage the
    # package as installed (backends/ inside xpmlp/) and import it from there instead.
    echo "pip install -e . failed; importing a staged copy instead"
    stage=$(mktemp -d)
    cp -r xpmlp "$stage/xpmlp" && cp -r backends "$stage/xpmlp/backends" || exit 1
    export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
    PY=("$PYTHON" -P)  # keep the source folder xpmlp/ (without backends/) off sys.path
  fi
fi
exec "${PY[@]}" experiments/gpu_check.py "$@"
