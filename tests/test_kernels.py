"""The NumPy backend's fused Numba kernels against the array code they replace."""
import numpy as np
import pytest

import xpmlp
from xpmlp.losses import SoftmaxCrossEntropyLoss

pytest.importorskip("numba")  # the [fast] extra; CI installs it


@pytest.fixture
def kernels():
    k = xpmlp.get_backend("numpy").kernels
    assert k is not None
    return k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_equals_the_formula_bit_for_bit(kernels, dtype):
    rng = np.random.default_rng(0)
    p, g, v = (rng.normal(size=100_003).astype(dtype) for _ in range(3))
    lr, m, wd = dtype(0.01), dtype(0.9), dtype(5e-4)
    want_v = m * v + (g + wd * p)
    want_p = p - lr * want_v
    kernels.sgd_step(p, g, v, 0.01, 0.9, 5e-4)
    np.testing.assert_array_equal(v, want_v)
    np.testing.assert_array_equal(p, want_p)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_softmax_xent_matches_the_array_loss(kernels, dtype, rtol):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(64, 10)) * 30).astype(dtype)  # large logits: stability
    labels = rng.integers(0, 10, 64)
    plain = SoftmaxCrossEntropyLoss(xpmlp.get_backend("numpy"), dtype, fast=False)
    want_loss = plain.forward(logits, labels)
    want_grad = plain.backward()
    grad = np.empty_like(logits)
    loss = kernels.softmax_xent(logits, labels, grad)
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol / 64)
