"""The fused kernels (Numba on NumPy, CUDA on CuPy) against the array code they replace.

Each test body runs once per backend with kernels; one that cannot run here is skipped
with its reason (CuPy needs a GPU).  The layers' use of the kernels is covered by the
cross-backend tests, which run the fast path with kernels on and off.
"""
import shutil
import subprocess

import numpy as np
import pytest
from helpers import backend_or_reason

import xpmlp
from xpmlp.layers import Sigmoid
from xpmlp.losses import EuclideanLoss, SoftmaxCrossEntropyLoss


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


LOSSES = pytest.mark.parametrize("kernel,loss_class,scale", [
    ("softmax_xent", SoftmaxCrossEntropyLoss, 30),  # large logits: stability
    ("euclidean", EuclideanLoss, 1)])


@LOSSES
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("rows", [64, 1000])  # 1000: more rows than CUDA threads in the block
def test_fused_loss_matches_the_array_loss_and_accuracy(backend, kernel, loss_class, scale, dtype, rtol, rows):
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(rows, 10)) * scale).astype(dtype)
    labels = rng.integers(0, 10, rows)
    labels[:20] = np.argmax(logits[:20], axis=1)  # some hits for certain, the rest by chance
    plain = loss_class(xpmlp.get_backend("numpy"), dtype, fast=False)
    want_loss = plain.forward(logits, labels)
    want_grad = plain.backward()
    grad = backend.xp.empty(logits.shape, dtype=dtype)
    loss, acc = getattr(backend.kernels, kernel)(backend.asarray(logits), backend.asarray(labels), grad)
    loss, acc, grad = (backend.to_numpy(a) for a in (loss, acc, grad))
    assert loss.dtype == dtype and acc.dtype == dtype and loss.shape == acc.shape == ()
    np.testing.assert_allclose(loss, want_loss, rtol=rtol)
    np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=rtol / rows)
    assert acc == xpmlp.accuracy(np, logits, labels)
    assert 20 / rows <= acc < 1


@pytest.mark.parametrize("kernel", ["softmax_xent", "euclidean"])
def test_fused_loss_writes_into_the_given_slots(backend, kernel):
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], dtype=np.float32)
    records = backend.xp.zeros((2, 4), dtype=backend.xp.float32)  # losses, accuracies
    out = (records[0, 1:2], records[1, 1:2])
    grad = backend.xp.empty(logits.shape, dtype=backend.xp.float32)
    returned = getattr(backend.kernels, kernel)(backend.asarray(logits), backend.asarray(np.array([1, 2])),
                                                grad, out)
    assert returned[0] is out[0] and returned[1] is out[1]
    got = backend.to_numpy(records)
    if kernel == "softmax_xent":
        want_loss = np.mean([np.log(np.exp(row).sum()) - row[label] for row, label in zip(logits, [1, 2])])
    else:
        want_loss = np.sum((logits - np.eye(3)[[1, 2]]) ** 2) / (2 * 2)
    np.testing.assert_allclose(got[0], [0, want_loss, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], [0, 0.5, 0, 0])


@pytest.mark.parametrize("kernel", ["softmax_xent", "euclidean"])
def test_fused_accuracy_follows_argmax_on_ties_and_nans(backend, kernel):
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[1, [3, 7]] = 5.0                # a tie: the first maximum wins
    logits[2, [2, 6]] = np.nan, 9.0        # a NaN wins over any number
    logits[3, :] = np.nan                  # all NaN: index 0, as a diverged network predicts
    for labels in ([0, 3, 2, 0], [1, 7, 6, 5]):
        labels = np.array(labels)
        grad = backend.xp.empty(logits.shape, dtype=backend.xp.float32)
        _, acc = getattr(backend.kernels, kernel)(backend.asarray(logits), backend.asarray(labels), grad)
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


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-14)])
def test_fast_sigmoid_layer_matches_the_plain_one(backend, dtype, rtol):
    """Forward by the backend's kernel where it has one (CuPy), else by the layer's
    select-free array code (NumPy); backward by the kernel on both."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 30)) * 5).astype(dtype)
    x[0, :4] = [-1000, -100, 100, 1000]  # e^-x would overflow here; e^-|x| does not
    plain = Sigmoid(xpmlp.get_backend("numpy"), dtype, fast=False)
    want_y = plain.forward(x)
    grad_y = rng.normal(size=x.shape).astype(dtype)
    want_grad_x = plain.backward(grad_y)
    fast = Sigmoid(backend, dtype, fast=True)
    with np.errstate(over="raise", invalid="raise"):  # underflow to 0 is the right answer
        y = fast.forward(backend.asarray(x))
    np.testing.assert_allclose(backend.to_numpy(y), want_y, rtol=rtol, atol=0)
    grad_x = backend.xp.empty(x.shape, dtype=dtype)
    assert backend.kernels.sigmoid_backward(y, backend.asarray(grad_y), grad_x) is grad_x
    np.testing.assert_allclose(backend.to_numpy(grad_x), want_grad_x, rtol=rtol, atol=0)
    # a strided, aliased output takes another route and gives the same answer
    out = backend.asarray(np.repeat(want_y, 2, axis=1))[:, ::2]
    backend.kernels.sigmoid_backward(out, backend.asarray(grad_y), out)
    np.testing.assert_allclose(backend.to_numpy(out), want_grad_x, rtol=rtol, atol=0)


@pytest.fixture
def numba_kernels():
    """The kernels only the NumPy backend has: on CuPy each of these passes is one launch anyway."""
    pytest.importorskip("numba")
    return xpmlp.get_backend("numpy").kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_kernels_equal_numpy_bit_for_bit(numba_kernels, dtype):
    rng = np.random.default_rng(4)
    y, b = rng.normal(size=(100, 37)).astype(dtype), rng.normal(size=37).astype(dtype)
    want = y + b
    assert numba_kernels.bias_add(y, b) is y
    np.testing.assert_array_equal(y, want)
    grad_b = np.full(37, np.nan, dtype=dtype)
    assert numba_kernels.bias_grad(y, grad_b) is grad_b
    np.testing.assert_array_equal(grad_b, y.sum(axis=0))
    strided = np.repeat(y, 2, axis=1)[:, ::2]  # any layout
    numba_kernels.bias_grad(strided, grad_b)
    np.testing.assert_array_equal(grad_b, y.sum(axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_forward_is_np_maximum_nans_included(numba_kernels, dtype):
    x = np.random.default_rng(5).normal(size=(20, 30)).astype(dtype)
    x[0, :4] = [np.nan, -np.inf, np.inf, 0.0]
    y = np.empty_like(x)
    assert numba_kernels.relu_forward(x, y) is y
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert np.isnan(y[0, 0])
    strided = np.empty((20, 60), dtype=dtype)[:, ::2]
    numba_kernels.relu_forward(x, strided)
    np.testing.assert_array_equal(strided, np.maximum(x, 0))


def cuda_translation_unit():
    """All of the CuPy backend's CUDA code as one .cu file for nvcc: the loss kernels with
    their templates instantiated, and each ElementwiseKernel body inside a device function
    with its parameters declared as CuPy declares them."""
    from xpmlp.backends.cupy_kernels import CTYPES, ELEMENTWISE, LOSS_KERNELS, LOSS_SOURCE
    parts = [LOSS_SOURCE]
    for name in LOSS_KERNELS:
        for t in CTYPES.values():
            parts.append(f"template __global__ void {name}<{t}>(const {t}*, const long long*, {t}*, "
                         f"{t}*, {t}*, const int, const int);")
    for name, (inputs, outputs, body) in ELEMENTWISE.items():
        params = [f"const {p.strip()}" for p in inputs.split(",")] + \
                 [p.strip().replace(" ", "& ", 1) for p in outputs.split(",")]
        parts.append(f"template <typename T> __device__ void {name}({', '.join(params)}) {{ {body} }}")
        for t in CTYPES.values():
            parts.append(f"template __device__ void {name}<{t}>({', '.join(p.replace('T', t, 1) for p in params)});")
    return "\n".join(parts) + "\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_sources_compile_for_hopper(tmp_path):
    """Where no GPU is lent, at least the CUDA C must compile: nvcc checks the code NVRTC
    gets on a GPU machine, for both dtypes."""
    source = tmp_path / "xpmlp_kernels.cu"
    source.write_text(cuda_translation_unit())
    result = subprocess.run(["nvcc", "-std=c++14", "-arch=sm_90", "-c", str(source), "-o",
                             str(tmp_path / "xpmlp_kernels.o")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr + source.read_text()
