"""Run one computation on NumPy and on another backend and compare (after the pattern of
``cupy.testing.numpy_cupy_allclose``).  A computation is ``fn(backend)`` returning host
NumPy arrays (via ``backend.to_numpy``), possibly nested in lists, tuples and dicts."""
import numpy as np

import xpmlp


def host(backend, a):
    """A float64 (or integer) host copy of ``a``: fast-path results live in reused buffers."""
    a = np.array(backend.to_numpy(a), copy=True)
    return a.astype(np.float64) if a.dtype.kind == "f" else a


_found = {}


def backend_or_reason(name):
    """The Backend called ``name``, or the reason it is unavailable here (a str); cached."""
    if not _found:
        _found.update(xpmlp.available_backends())
    return _found[name]


def run_on(backend, fn):
    """``fn(backend)`` with ``backend`` given as a Backend or a name."""
    return fn(xpmlp.get_backend(backend))


def _leaves(tree, path="result"):
    if isinstance(tree, dict):
        for key in tree:
            yield from _leaves(tree[key], f"{path}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            yield from _leaves(item, f"{path}[{i}]")
    else:
        yield path, np.asarray(tree)


def assert_tree_allclose(actual, expected, *, rtol, atol):
    """Compare nested results leaf by leaf; ``atol`` is relative to each leaf's largest |value|."""
    got, want = list(_leaves(actual)), list(_leaves(expected))
    assert [p for p, _ in got] == [p for p, _ in want], "results differ in structure"
    for (path, a), (_, b) in zip(got, want):
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert np.all(np.isfinite(a)), f"{path}: non-finite values"
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * (scale or 1.0), err_msg=path)


def assert_backend_matches_numpy(fn, backend, *, rtol, atol, reference=None):
    """Run ``fn`` on ``backend`` and ``reference`` (default ``fn``) on NumPy, then compare.

    ``reference`` lets the NumPy side differ in settings, e.g. float64 plain while
    ``fn`` runs float32 on the fast path.  Returns the backend's result.
    """
    expected = run_on("numpy", reference or fn)
    actual = run_on(backend, fn)
    assert_tree_allclose(actual, expected, rtol=rtol, atol=atol)
    return actual


def sgd_by_layer_reference(p, g, v, lr, momentum, weight_decay, active, starts, sizes):
    """The CUDA kernel xpmlp_sgd_step_by_layer's contract, in NumPy (host arrays): element
    i's model from its parameter block, then that model's SGD step, unless frozen."""
    i = np.arange(p.size)
    block = np.searchsorted(starts, i, side="right") - 1
    model = (i - starts[block]) // sizes[block]
    new_v = momentum[model] * v + (g + weight_decay[model] * p)
    on = active[model]
    p[...] = np.where(on, p - lr[model] * new_v, p)
    v[...] = np.where(on, new_v, v)


def real_mnist_dir():
    """The real MNIST for the tests: $XPMLP_DATA_DIR, else the development copy in
    ../shared/data/mnist, else the per-user cache that `make test` fills on first use."""
    import os
    from pathlib import Path

    import pytest

    from xpmlp.data import default_cache_dir

    candidates = [os.environ.get("XPMLP_DATA_DIR"),
                  Path(__file__).resolve().parents[2] / "shared/data/mnist", default_cache_dir()]
    for path in (Path(c) for c in candidates if c):
        if path.is_dir() and any(path.glob("train-images-idx3-ubyte*")):
            return path.resolve()
    pytest.fail("real MNIST not found: set XPMLP_DATA_DIR, or run `make test`, which downloads it")
