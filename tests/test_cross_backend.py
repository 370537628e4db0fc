"""Every backend and path computes what NumPy float64 on the plain path computes.

For each of the ten networks: the forward output, the loss, every gradient (and the
input gradient) of the first step, the loss and accuracy of each of 5 SGD steps and the
weights after them.  Also dtypes, stacked models against one model per slice, and the
class probabilities that `eval --plots` and `predict` read.
"""
import numpy as np
import pytest
from helpers import assert_backend_matches_numpy, assert_tree_allclose, host, run_on

from xpmlp import MODELS, SGD, build_mlp, build_model
from xpmlp.inspect import class_probabilities

N, STEPS = 16, 5
NAMES = pytest.mark.parametrize("name", list(MODELS))
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}


def make_batches(stack=(), seed=10):
    """STEPS + 1 batches of MNIST-like inputs in [0, 1] (mostly dark) and labels."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS + 1):
        shape = stack + (N, 784)
        x = np.where(rng.random(shape) < 0.25, rng.random(shape), 0.0)
        batches.append((x, rng.integers(0, 10, size=stack + (N,))))
    return batches


BATCHES = make_batches()


def trajectory(name, dtype, ops, batches=BATCHES, stack=(), init=None):
    """``fn(backend)``: train ``name`` for STEPS SGD steps and record everything on the host."""
    def fn(backend):
        model = build_model(name, backend=backend, dtype=dtype, seed=0, ops=ops, stack=stack)
        if init is not None:
            model.load_state_arrays(init)
        opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
        dt = backend.dtype(dtype)
        result = {"losses": [], "accuracies": []}
        for step, (x, labels) in enumerate(batches):
            out = model.forward(backend.asarray(x, dtype=dt))
            loss, acc = model.loss.forward_with_accuracy(out, backend.asarray(labels))
            result["losses"].append(host(backend, loss))
            result["accuracies"].append(host(backend, acc))
            if step == STEPS:
                break
            if step == 0:
                result["output"] = host(backend, out)
            dx = model.backward(model.loss.backward(), need_input_grad=step == 0)
            if step == 0:
                result["dx"] = host(backend, dx)
                result["grads"] = [host(backend, getattr(layer, "grad_" + attr))
                                   for layer, attr in model.parameters()]
            opt.step()
        result["params"] = [host(backend, a) for a in model.state_arrays()]
        return result
    return fn


@NAMES
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_numpy_float64_plain(backend, ops, name, dtype):
    result = assert_backend_matches_numpy(trajectory(name, dtype, ops), backend,
                                          reference=trajectory(name, "float64", "plain"), **TOL[dtype])
    assert len(result["losses"]) == STEPS + 1


@NAMES
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["buffered", "fused"])
def test_fast_ops_equal_the_plain_ops_on_numpy(name, dtype, kind):
    if kind == "fused":
        pytest.importorskip("numba")  # the [fast] extra; CI installs it
    fast = run_on("numpy", trajectory(name, dtype, kind))
    plain = run_on("numpy", trajectory(name, dtype, "plain"))
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    assert_tree_allclose(fast, plain, **tol)


@NAMES
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_is_kept(backend, ops, name, dtype):
    model = build_model(name, backend=backend, dtype=dtype, ops=ops)
    want = backend.dtype(dtype)
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, labels = BATCHES[0]
    out = model.forward(backend.asarray(x, dtype=want))
    loss = model.loss.forward(out, backend.asarray(labels))
    model.backward(model.loss.backward())
    opt.step()
    arrays = {"output": out, "loss": loss}
    for i, (layer, attr) in enumerate(model.parameters()):
        arrays[f"{attr}{i}"] = getattr(layer, attr)
        arrays[f"grad_{attr}{i}"] = getattr(layer, "grad_" + attr)
    arrays.update({f"velocity{i}": v for i, v in enumerate(opt.state())})
    for key, a in arrays.items():
        assert a.dtype == want, f"{key} is {a.dtype}, not {dtype}"
    for a in model.state_arrays():
        assert a.dtype == np.dtype(dtype)


@NAMES
def test_stacked_model_slices_equal_single_models(backend, ops, name):
    """Slice s of a stack=(2,) model trains exactly like one model given slice s's weights."""
    stacked_batches = make_batches(stack=(2,), seed=11)
    stacked = run_on(backend, trajectory(name, "float64", ops, stacked_batches, stack=(2,)))
    assert np.shape(stacked["losses"][0]) == (2,)
    single_shapes = [a.shape for a in build_model(name, backend="numpy").state_arrays()]
    # The stacked model's initial weights (trajectory builds it with seed 0 too).
    stacked_init = build_model(name, backend="numpy", dtype="float64", seed=0, stack=(2,)).state_arrays()
    assert [a.shape[0] for a in stacked_init] == [2] * len(single_shapes)
    for s in range(2):
        weights = [a[s].reshape(shape) for a, shape in zip(stacked_init, single_shapes)]
        batches = [(x[s], labels[s]) for x, labels in stacked_batches]
        single = run_on(backend, trajectory(name, "float64", ops, batches, init=weights))
        sliced = {
            "losses": [v[s] for v in stacked["losses"]],
            "accuracies": [v[s] for v in stacked["accuracies"]],
            "output": stacked["output"][s],
            "dx": stacked["dx"][s],
            "grads": [g[s].reshape(shape) for g, shape in zip(stacked["grads"], single_shapes)],
            "params": [p[s].reshape(shape) for p, shape in zip(stacked["params"], single_shapes)],
        }
        assert_tree_allclose(sliced, single, **TOL["float64"])


# ---------------------------------------------------------------- what eval --plots reads

@pytest.mark.parametrize("loss", ["sce", "mse"])
def test_class_probabilities_agree_across_backends(backend, ops, loss):
    """Softmax of the outputs (SCE) or the normalised sigmoid outputs (MSE), on every
    backend and path; the arg-max is the model's own prediction."""
    x = np.random.default_rng(2).normal(size=(2500, 784)).astype(np.float32)

    def probabilities(be):
        model = build_mlp((32,), "relu", loss, backend=be, dtype="float64", init_std=0.1, ops=ops)
        probs = class_probabilities(model, be.asarray(x, dtype=model.dtype), chunk=1000)
        predicted = be.to_numpy(model.predict(be.asarray(x, dtype=model.dtype)))
        return probs, np.asarray(predicted)

    probs, predicted = assert_backend_matches_numpy(probabilities, backend, rtol=1e-9, atol=1e-12)
    assert probs.shape == (2500, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-12)
    assert np.array_equal(probs.argmax(axis=1), predicted)
