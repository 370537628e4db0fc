#!/usr/bin/env bash
# `make gpu-check`: on a machine with one CUDA GPU and no package index (CuPy,
# PyTorch, pytest, numpy and setuptools preinstalled), install xpmlp without
# dependencies, run the CuPy tests and the GPU benchmark, print a short summary.
# MNIST is read from data/mnist in the repo (git-ignored; copy it there and carry it).
set -uo pipefail
cd "$(dirname "$0")/.."
export XPMLP_DATA_DIR="${XPMLP_DATA_DIR:-$PWD/data/mnist}"
export CUPY_TF32=0   # TF32 GEMMs would change float32 results in cross-backend comparisons
echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PY=(python)
if ! python -m pip install --quiet --no-deps --no-build-isolation -e . ; then
  # An old setuptools without 'wheel' cannot build an editable install: stage the
  # package as installed (backends/ inside xpmlp/) and import it from there instead.
  echo "pip install -e . failed; importing a staged copy instead"
  stage=$(mktemp -d)
  cp -r xpmlp "$stage/xpmlp" && cp -r backends "$stage/xpmlp/backends" || exit 1
  export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
  PY=(python -P)  # keep the source folder xpmlp/ (without backends/) off sys.path
fi
"${PY[@]}" - <<'PYCODE'
import numpy, xpmlp
print("xpmlp from", xpmlp.__file__)
b = xpmlp.get_backend("cuda")
print("backend:", b.describe())
PYCODE
echo "== CuPy tests (cross-backend, gradients, oracle, training on the GPU)"
timeout 330 "${PY[@]}" -m pytest -q -k "cupy or cuda or gpu" tests 2>&1 | tail -n 25
tests_rc=${PIPESTATUS[0]}
echo "== GPU benchmark"
timeout 120 "${PY[@]}" -m xpmlp bench --device cuda --epochs 5 --json
bench_rc=$?
echo "== summary: tests exit $tests_rc, bench exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
