"""Float64 central finite-difference checks of every hand-written backward pass.

Layers run on the backend under test (each of its ops: plain, buffered, fused); the finite-difference
arithmetic runs on the host in NumPy float64.
"""
import warnings

import numpy as np
import pytest
from helpers import host

from xpmlp import (
    EuclideanLoss,
    Linear,
    ReLU,
    Sigmoid,
    SoftmaxCrossEntropyLoss,
    build_model,
)

# Central differences: truncation error ~ EPS^2, rounding noise ~ |L| * 1e-16 / EPS.
EPS = 1e-5
STACKS = pytest.mark.parametrize("stack", [(), (2,)], ids=["single", "stacked"])


def central_difference(f, x, eps=EPS, indices=None):
    """d f / d x[i] for each index (default: every entry of the host array ``x``)."""
    grad = {}
    for idx in (np.ndindex(x.shape) if indices is None else indices):
        old = x[idx]
        x[idx] = old + eps
        f_plus = f(x)
        x[idx] = old - eps
        f_minus = f(x)
        x[idx] = old
        grad[idx] = (f_plus - f_minus) / (2 * eps)
    if indices is None:
        out = np.empty(x.shape)
        for idx, g in grad.items():
            out[idx] = g
        return out
    return np.array([grad[idx] for idx in indices])


def assert_grad_close(analytic, numeric, what):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=what)


@STACKS
def test_linear(backend, ops, stack):
    rng = np.random.default_rng(1)
    n, n_in, n_out = 3, 5, 4
    f64 = backend.dtype("float64")
    layer = Linear(n_in, n_out, backend, f64, init_std=0.5, rng=rng, stack=stack, ops=ops)
    x = rng.normal(size=stack + (n, n_in))
    W = host(backend, layer.W)
    b = rng.normal(size=tuple(layer.b.shape))
    g = rng.normal(size=stack + (n, n_out))   # upstream gradient: L = sum(y * g)

    def loss(x, W, b):
        layer.W, layer.b = backend.asarray(W, dtype=f64), backend.asarray(b, dtype=f64)
        return float(np.sum(host(backend, layer.forward(backend.asarray(x, dtype=f64))) * g))

    loss(x, W, b)
    dx = host(backend, layer.backward(backend.asarray(g, dtype=f64)))
    grad_W, grad_b = host(backend, layer.grad_W), host(backend, layer.grad_b)
    assert grad_W.shape == W.shape and grad_b.shape == b.shape and dx.shape == x.shape

    assert_grad_close(dx, central_difference(lambda v: loss(v, W, b), x), "dx")
    assert_grad_close(grad_W, central_difference(lambda v: loss(x, v, b), W), "grad_W")
    assert_grad_close(grad_b, central_difference(lambda v: loss(x, W, v), b), "grad_b")

    # Without the input gradient the parameter gradients are still filled in.
    loss(x, W, b)
    assert layer.backward(backend.asarray(2 * g, dtype=f64), need_input_grad=False) is None
    np.testing.assert_allclose(host(backend, layer.grad_W), 2 * grad_W, rtol=1e-12)
    np.testing.assert_allclose(host(backend, layer.grad_b), 2 * grad_b, rtol=1e-12)


@pytest.mark.parametrize("cls", [ReLU, Sigmoid])
@STACKS
def test_activation(backend, ops, cls, stack):
    rng = np.random.default_rng(2)
    f64 = backend.dtype("float64")
    layer = cls(backend, f64, ops=ops)
    # Keep ReLU inputs away from its kink at 0, where the derivative is undefined.
    x = rng.choice([-1.0, 1.0], size=stack + (4, 6)) * rng.uniform(0.1, 3.0, size=stack + (4, 6))
    g = rng.normal(size=x.shape)

    def loss(x):
        return float(np.sum(host(backend, layer.forward(backend.asarray(x, dtype=f64))) * g))

    loss(x)
    dx = host(backend, layer.backward(backend.asarray(g, dtype=f64)))
    assert_grad_close(dx, central_difference(loss, x), f"{cls.__name__} dx")


@pytest.mark.parametrize("cls", [EuclideanLoss, SoftmaxCrossEntropyLoss])
@STACKS
def test_loss(backend, ops, cls, stack):
    rng = np.random.default_rng(3)
    f64 = backend.dtype("float64")
    loss_fn = cls(backend, f64, ops=ops)
    n, classes = 5, 10
    output = rng.uniform(0.05, 0.95, size=stack + (n, classes)) if cls is EuclideanLoss \
        else rng.normal(scale=3.0, size=stack + (n, classes))
    labels_host = rng.integers(0, classes, size=stack + (n,))
    labels = backend.asarray(labels_host)

    def loss(out):
        value = host(backend, loss_fn.forward(backend.asarray(out, dtype=f64), labels))
        assert value.shape == stack
        return float(np.sum(value))   # each stacked model's loss depends only on its own slice

    value = loss(output)
    dx = host(backend, loss_fn.backward())
    assert_grad_close(dx, central_difference(loss, output), f"{cls.__name__} dx")

    # And the value itself, against a direct host computation.
    onehot = np.eye(classes)[labels_host]
    if cls is EuclideanLoss:
        expected = np.sum((output - onehot) ** 2, axis=(-2, -1)) / (2 * n)
    else:
        shifted = output - output.max(axis=-1, keepdims=True)
        log_prob = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        expected = -np.sum(onehot * log_prob, axis=(-2, -1)) / n
    np.testing.assert_allclose(value, np.sum(expected), rtol=1e-12)


@pytest.mark.parametrize("name", ["mlp0-sce", "mlp1-sigmoid-mse", "mlp2-relu-sce"])
def test_network(backend, ops, name):
    """Whole-network check on a sample of entries of every parameter and of the input."""
    rng = np.random.default_rng(4)
    model = build_model(name, backend=backend, dtype="float64", init_std=0.1, seed=5, ops=ops)
    f64 = backend.dtype("float64")
    x_host = rng.uniform(0.0, 1.0, size=(4, 784))
    labels = backend.asarray(rng.integers(0, 10, size=4))
    params = [np.array(a, copy=True) for a in model.state_arrays()]

    def loss(x_host=x_host):
        out = model.forward(backend.asarray(x_host, dtype=f64))
        return float(host(backend, model.loss.forward(out, labels)))

    loss()
    dx = host(backend, model.backward(model.loss.backward(), need_input_grad=True))
    grads = [host(backend, getattr(layer, "grad_" + attr)) for layer, attr in model.parameters()]

    def sample(shape, k=12):
        flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
        return [np.unravel_index(i, shape) for i in flat]

    for i, (p, g) in enumerate(zip(params, grads)):
        assert g.shape == p.shape

        def loss_at(value, i=i):
            model.load_state_arrays(params[:i] + [value] + params[i + 1:])
            return loss()

        idx = sample(p.shape)
        # A smaller step here: a ReLU pre-activation must not cross 0 within it.
        numeric = central_difference(loss_at, p, eps=1e-6, indices=idx)
        assert_grad_close(np.array([g[j] for j in idx]), numeric, f"parameter {i}")
        model.load_state_arrays(params)

    idx = sample(x_host.shape)
    numeric = central_difference(lambda v: loss(v), x_host.copy(), eps=1e-6, indices=idx)
    assert_grad_close(np.array([dx[j] for j in idx]), numeric, "input")


# --- numerical safety at extreme inputs --------------------------------------------------

EXTREMES = np.array([-1e4, -1e3, -100.0, -50.0, -20.0, -1.0, 0.0, 1.0, 20.0, 50.0, 100.0, 1e3, 1e4])


def strict_float_errors():
    """Overflow, invalid and divide-by-zero raise.  Underflow is allowed: e^-|x| -> 0 is
    the exact limit sigmoid and softmax need for |x| large."""
    return np.errstate(over="raise", invalid="raise", divide="raise", under="ignore")


def test_naive_sigmoid_would_be_caught():
    """The guard below is real: the textbook formula overflows for x = -1e4 in float32."""
    with strict_float_errors(), pytest.raises(FloatingPointError):
        1 / (1 + np.exp(-np.float32(-1e4)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_extremes_finite(backend, ops, dtype):
    layer = Sigmoid(backend, backend.dtype(dtype), ops=ops)
    with warnings.catch_warnings(), strict_float_errors():
        warnings.simplefilter("error")
        x = backend.asarray(EXTREMES, dtype=backend.dtype(dtype))
        y = host(backend, layer.forward(x))
        dx = host(backend, layer.backward(backend.asarray(np.ones_like(EXTREMES), dtype=backend.dtype(dtype))))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert np.all((y >= 0) & (y <= 1))
    assert np.all(np.diff(y) >= 0)
    with np.errstate(all="ignore"):
        expected = 1 / (1 + np.exp(-EXTREMES))
    tol = 1e-6 if dtype == "float32" else 1e-15
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)
    assert y[0] == 0.0 and y[-1] == 1.0 and y[EXTREMES == 0][0] == 0.5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_huge_logits_finite(backend, ops, dtype):
    dt = backend.dtype(dtype)
    logits = np.zeros((4, 10))
    logits[0, 0] = 1e4      # label 0 has the huge logit: loss 0
    logits[1, 3] = 1e4      # label 5 has logit 0 against 1e4: loss 1e4
    logits[2, 2] = -1e4     # label 2 has logit -1e4, nine others 0: loss 1e4 + log 9
    logits[3] = -1e4        # all equal: loss log 10
    labels = np.array([0, 5, 2, 7])
    loss_fn = SoftmaxCrossEntropyLoss(backend, dt, ops=ops)
    with warnings.catch_warnings(), strict_float_errors():
        warnings.simplefilter("error")
        value = float(host(backend, loss_fn.forward(backend.asarray(logits, dtype=dt),
                                                     backend.asarray(labels))))
        grad = host(backend, loss_fn.backward())
    expected = (0.0 + 1e4 + (1e4 + np.log(9)) + np.log(10)) / 4
    np.testing.assert_allclose(value, expected, rtol=1e-6 if dtype == "float32" else 1e-12)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-6)    # softmax - one-hot sums to 0
    np.testing.assert_allclose(grad[1, 5], -1 / 4, rtol=1e-6)
    np.testing.assert_allclose(grad[1, 3], 1 / 4, rtol=1e-6)
