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
def test_softmax_xent_matches_the_array_loss_and_accuracy(kernels, dtype, rtol):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(64, 10)) * 30).astype(dtype)  # large logits: stability
    labels = rng.integers(0, 10, 64)
    labels[:20] = np.argmax(logits[:20], axis=1)  # some hits for certain, the rest by chance
    plain = SoftmaxCrossEntropyLoss(xpmlp.get_backend("numpy"), dtype, fast=False)
    want_loss = plain.forward(logits, labels)
    want_grad = plain.backward()
    grad = np.empty_like(logits)
    loss, acc = kernels.softmax_xent(logits, labels, grad)
    assert loss.dtype == dtype and acc.dtype == dtype
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol / 64)
    assert acc == xpmlp.accuracy(np, logits, labels)
    assert 20 / 64 <= acc < 1


def test_softmax_xent_accuracy_follows_argmax_on_ties_and_nans(kernels):
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[1, [3, 7]] = 5.0                # a tie: the first maximum wins
    logits[2, [2, 6]] = np.nan, 9.0        # a NaN wins over any number
    logits[3, :] = np.nan                  # all NaN: index 0, as a diverged network predicts
    for labels in ([0, 3, 2, 0], [1, 7, 6, 5]):
        labels = np.array(labels)
        _, acc = kernels.softmax_xent(logits, labels, np.empty_like(logits))
        assert acc == xpmlp.accuracy(np, logits, labels), labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_passes_the_gradient_where_the_output_is_positive(kernels, dtype):
    rng = np.random.default_rng(2)
    y = np.maximum(rng.normal(size=(50, 33)), 0).astype(dtype)
    y[0, :5] = 0.0
    grad_y = rng.normal(size=y.shape).astype(dtype)
    grad_x = np.full_like(y, np.nan)
    assert kernels.relu_backward(y, grad_y, grad_x) is grad_x
    np.testing.assert_array_equal(grad_x, np.where(y > 0, grad_y, 0))
    # strided views take the array route and give the same answer
    strided = np.full((50, 66), np.nan, dtype=dtype)[:, ::2]
    kernels.relu_backward(y, grad_y, strided)
    np.testing.assert_array_equal(strided, grad_x)
