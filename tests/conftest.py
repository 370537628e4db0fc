"""Shared fixtures: every available backend, and the plain/fast paths of each."""
import os

# The tests multiply tiny matrices: one BLAS thread is fastest, and otherwise OpenBLAS's
# and torch's thread pools fight over the cores (20x slower seen on a 2-core machine).
# Set before NumPy is imported; an explicit setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from helpers import backend_or_reason  # noqa: E402

BACKEND_NAMES = ("numpy", "array-api-strict", "cupy")


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.gpu) if n == "cupy" else n
                        for n in BACKEND_NAMES])
def backend(request):
    """Each backend in turn; one that cannot run here is skipped with the reason it gave."""
    found = backend_or_reason(request.param)
    if isinstance(found, str):
        pytest.skip(f"{request.param}: {found}")
    return found


@pytest.fixture(params=["plain", "fast", "fast-xp"])
def fast(request, backend):
    """The plain path everywhere; the fast path only where the backend supports it.

    "fast" uses the backend's fused kernels where it has them (``backend.kernels``, e.g.
    Numba on NumPy); "fast-xp" switches them off to run the fast path's array code.
    """
    if request.param == "plain":
        yield False
        return
    if not backend.fast:
        pytest.skip(f"{backend.name} has no fast path")
    if request.param == "fast":
        yield True
        return
    kernels = getattr(backend, "kernels", None)
    if kernels is None:
        pytest.skip(f"{backend.name} has no fused kernels: 'fast' already runs the array code")
    backend.kernels = None
    try:
        yield True
    finally:
        backend.kernels = kernels


def pytest_collection_modifyitems(config, items):
    """Drop combinations that cannot exist (array-api-strict has only the plain path)
    instead of reporting them as skipped tests."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") == "array-api-strict" and params.get("fast", "plain") != "plain":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
