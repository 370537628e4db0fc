"""The fused kernels (Numba on NumPy, CUDA on CuPy) against the array code they replace.

Each test body runs once per backend with kernels; one that cannot run here is skipped
with its reason (CuPy needs a GPU).  The layers' use of the kernels is covered by the
cross-backend tests, which run the fast path with kernels on and off.
"""
import shutil
import subprocess

import numpy as np
import pytest

import xpmlp
from helpers import backend_or_reason
from xpmlp.losses import SoftmaxCrossEntropyLoss


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def backend(request):
    if request.param == "numpy":
        pytest.importorskip("numba")  # the [fast] extra; CI installs it
    found = backend_or_reason(request.param)
    if isinstance(found, str):
        pytest.skip(f"{request.param}: {found}")
    assert found.kernels is not None
    return found


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_equals_the_formula(backend, dtype):
    rng = np.random.default_rng(0)
    p, g, v = (rng.normal(size=100_003).astype(dtype) for _ in range(3))
    lr, m, wd = dtype(0.01), dtype(0.9), dtype(5e-4)
    want_v = m * v + (g + wd * p)
    want_p = p - lr * want_v
    p_dev, g_dev, v_dev = (backend.asarray(a) for a in (p, g, v))
    backend.kernels.sgd_step(p_dev, g_dev, v_dev, 0.01, 0.9, 5e-4)
    if backend.name == "numpy":  # the same operations in the same order: the same bits
        np.testing.assert_array_equal(v_dev, want_v)
        np.testing.assert_array_equal(p_dev, want_p)
    else:  # nvcc may contract a multiply and an add into one FMA
        np.testing.assert_allclose(backend.to_numpy(v_dev), want_v, rtol=1e-6)
        np.testing.assert_allclose(backend.to_numpy(p_dev), want_p, rtol=1e-6)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("rows", [64, 1000])  # 1000: more rows than CUDA threads in the block
def test_softmax_xent_matches_the_array_loss_and_accuracy(backend, dtype, rtol, rows):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(rows, 10)) * 30).astype(dtype)  # large logits: stability
    labels = rng.integers(0, 10, rows)
    labels[:20] = np.argmax(logits[:20], axis=1)  # some hits for certain, the rest by chance
    plain = SoftmaxCrossEntropyLoss(xpmlp.get_backend("numpy"), dtype, fast=False)
    want_loss = plain.forward(logits, labels)
    want_grad = plain.backward()
    grad = backend.xp.empty(logits.shape, dtype=dtype)
    loss, acc = backend.kernels.softmax_xent(backend.asarray(logits), backend.asarray(labels), grad)
    loss, acc, grad = (backend.to_numpy(a) for a in (loss, acc, grad))
    assert loss.dtype == dtype and acc.dtype == dtype and loss.shape == acc.shape == ()
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol / rows)
    assert acc == xpmlp.accuracy(np, logits, labels)
    assert 20 / rows <= acc < 1


def test_softmax_xent_writes_into_the_given_slots(backend):
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    records = backend.xp.zeros((2, 4), dtype=backend.xp.float32)  # losses, accuracies
    out = (records[0, 1:2], records[1, 1:2])
    grad = backend.xp.empty(logits.shape, dtype=backend.xp.float32)
    returned = backend.kernels.softmax_xent(backend.asarray(logits), backend.asarray(np.array([1, 2])), grad, out)
    assert returned[0] is out[0] and returned[1] is out[1]
    got = backend.to_numpy(records)
    want_loss = np.mean([np.log(np.exp(row).sum()) - row[label] for row, label in zip(logits, [1, 2])])
    np.testing.assert_allclose(got[0], [0, want_loss, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0, 0.5, 0, 0])


def test_softmax_xent_accuracy_follows_argmax_on_ties_and_nans(backend):
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[1, [3, 7]] = 5.0                # a tie: the first maximum wins
    logits[2, [2, 6]] = np.nan, 9.0        # a NaN wins over any number
    logits[3, :] = np.nan                  # all NaN: index 0, as a diverged network predicts
    for labels in ([0, 3, 2, 0], [1, 7, 6, 5]):
        labels = np.array(labels)
        grad = backend.xp.empty(logits.shape, dtype=backend.xp.float32)
        _, acc = backend.kernels.softmax_xent(backend.asarray(logits), backend.asarray(labels), grad)
        assert backend.to_numpy(acc) == xpmlp.accuracy(np, logits, labels), labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_passes_the_gradient_where_the_output_is_positive(backend, dtype):
    rng = np.random.default_rng(2)
    y = np.maximum(rng.normal(size=(50, 33)), 0).astype(dtype)
    y[0, :5] = 0.0
    grad_y = rng.normal(size=y.shape).astype(dtype)
    want = np.where(y > 0, grad_y, 0)
    y_dev, grad_y_dev = backend.asarray(y), backend.asarray(grad_y)
    grad_x = backend.asarray(np.full_like(y, np.nan))
    assert backend.kernels.relu_backward(y_dev, grad_y_dev, grad_x) is grad_x
    np.testing.assert_array_equal(backend.to_numpy(grad_x), want)
    # a strided output view gives the same answer
    strided = backend.asarray(np.full((50, 66), np.nan, dtype=dtype))[:, ::2]
    backend.kernels.relu_backward(y_dev, grad_y_dev, strided)
    np.testing.assert_array_equal(backend.to_numpy(strided), want)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_softmax_xent_source_compiles_for_hopper(tmp_path):
    """Where no GPU is lent, at least the CUDA C of the fused loss must compile: nvcc checks
    the same source NVRTC gets on a GPU machine, for both dtypes."""
    from xpmlp.backends.cupy_kernels import CTYPES, SOFTMAX_XENT_SOURCE
    instances = "".join(
        f"template __global__ void xpmlp_softmax_xent<{t}>(const {t}*, const long long*, {t}*, {t}*, {t}*, "
        "const int, const int);\n" for t in CTYPES.values())
    source = tmp_path / "softmax_xent.cu"
    source.write_text(SOFTMAX_XENT_SOURCE + instances)
    result = subprocess.run(["nvcc", "-std=c++14", "-arch=sm_90", "-c", str(source), "-o",
                             str(tmp_path / "softmax_xent.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
