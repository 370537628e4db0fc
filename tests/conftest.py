"""Shared fixtures: every available backend, and the ops (plain, buffered, fused) of each."""
import os
import sys

# The tests multiply tiny matrices: one BLAS thread is fastest, and otherwise OpenBLAS's
# and torch's thread pools fight over the cores (20x slower seen on a 2-core machine).
# Set before NumPy is imported; an explicit setting in the environment wins.
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_unset = [var for var in _THREAD_VARS if var not in os.environ]
for _var in _THREAD_VARS:
    os.environ.setdefault(_var, "1")


def _limit_threads_already_started():
    """A pytest plugin loaded before this file (jaxtyping's, on the GPU image) may have
    imported NumPy or torch already, and their pools read the variables only at import:
    limit them now.  Returns why that could not be done, or None."""
    if not _unset:
        return None  # the caller chose the counts
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if "numpy" not in sys.modules:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return ("NumPy was imported before tests/conftest.py and threadpoolctl is not installed: "
                "BLAS runs on every core; set OPENBLAS_NUM_THREADS=1")
    threadpool_limits(1)  # lasts for the process: the object is never used to restore
    return None


_THREADS_PROBLEM = _limit_threads_already_started()

import pytest  # noqa: E402
from helpers import backend_or_reason  # noqa: E402

from xpmlp.core.ops import KINDS, ops_for  # noqa: E402

BACKEND_NAMES = ("numpy", "array-api-strict", "cupy", "torch", "torch:cuda", "torch:mps")
CUDA_NAMES = ("cupy", "torch:cuda")  # marked gpu: `make gpu-check` runs them
# Backends with only the plain ops (no out= buffers, no kernels).
PLAIN_ONLY = ("array-api-strict", "torch", "torch:cuda", "torch:mps")


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.gpu) if n in CUDA_NAMES else n
                        for n in BACKEND_NAMES])
def backend(request):
    """Each backend in turn; one that cannot run here is skipped with the reason it gave."""
    found = backend_or_reason(request.param)
    if isinstance(found, str):
        pytest.skip(f"{request.param}: {found}")
    return found


@pytest.fixture(params=KINDS)
def ops(request, backend):
    """Each way of computing the backend has, picked explicitly at build time (``ops=``):
    "plain" (the Array API reference) everywhere, "buffered" (out= buffers) where the
    backend supports it, and "fused" where the backend has kernels (Numba, CUDA)."""
    try:
        ops_for(backend, request.param)
    except ValueError as exc:
        pytest.skip(str(exc))
    return request.param


def pytest_configure(config):
    if _THREADS_PROBLEM:
        config.issue_config_time_warning(pytest.PytestConfigWarning(_THREADS_PROBLEM), stacklevel=2)


def pytest_collection_modifyitems(config, items):
    """Drop combinations that cannot exist (array-api-strict and torch have only the plain
    path) instead of reporting them as skipped tests."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") in PLAIN_ONLY and params.get("ops", "plain") != "plain":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
