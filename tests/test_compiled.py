"""The compiled training step (Numba + NumPy's BLAS) against the array fast path it replaces.

Both take the same steps from the same weights on the same batches.  With softmax
cross-entropy the compiled step does the same arithmetic in the same order (the same
BLAS calls, the same fused loss and SGD loops), so everything must match bit for bit.
With a Sigmoid output it computes e^x with Numba's scalar exp instead of NumPy's
vectorised one: last-bit differences, so a float tolerance there.
"""
import numpy as np
import pytest

import xpmlp
from xpmlp.compiled import CompiledStepper, compiled_steps
from xpmlp.optim import SGD
from xpmlp.train import Stepper, make_stepper

pytestmark = pytest.mark.skipif(xpmlp.get_backend("numpy").kernels is None,
                                reason="needs Numba (the [fast] extra; CI installs it)")
# The array path the compiled step replaces: the fused ops (Numba kernels), step by step.

BATCH, STEPS = 50, 6


def _data(dtype, n=BATCH * STEPS):
    rng = np.random.default_rng(3)
    return (rng.random((n, 784)) - 0.5).astype(dtype), rng.integers(0, 10, n), rng.permutation(n)


def _train(name, dtype, compiled, steps_per_call=1):
    """(stepper, model, optimizer, losses, accuracies) after STEPS steps."""
    model = xpmlp.build_model(name, backend="numpy", dtype=dtype, seed=1, init_std=0.1, ops="fused")
    optimizer = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stepper = make_stepper(model, optimizer, compiled)
    x, y, perm = _data(dtype)
    losses, accs = np.zeros(STEPS, dtype=dtype), np.zeros(STEPS, dtype=dtype)
    if steps_per_call == 1:
        for i in range(STEPS):
            stepper.step(x, y, perm[i * BATCH:(i + 1) * BATCH], losses, accs, i)
    else:
        for i in range(0, STEPS, steps_per_call):
            stepper.steps(x, y, perm[i * BATCH:(i + steps_per_call) * BATCH],
                          losses[i:i + steps_per_call], accs[i:i + steps_per_call])
    return stepper, model, optimizer, losses, accs


def _state(model, optimizer):
    return {"params": model.flat.params, "grads": model.flat.grads, "velocity": optimizer.slots[0].velocity}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["mlp0-sce", "mlp1-relu-sce", "mlp2-relu-sce"])
def test_compiled_step_equals_the_array_path_bit_for_bit(name, dtype):
    stepper, model, opt, losses, accs = _train(name, dtype, compiled=True)
    assert isinstance(stepper, CompiledStepper)
    _, want_model, want_opt, want_losses, want_accs = _train(name, dtype, compiled=False)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(accs, want_accs)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, opt)[key], want, err_msg=key)
    assert 0 < losses[-1] < losses[0]  # it trained


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("name", ["mlp0-mse", "mlp1-relu-mse", "mlp2-relu-mse"])
def test_compiled_sigmoid_euclidean_step_matches_the_array_path(name, dtype, rtol):
    stepper, model, opt, losses, accs = _train(name, dtype, compiled=True)
    assert isinstance(stepper, CompiledStepper)
    _, want_model, want_opt, want_losses, want_accs = _train(name, dtype, compiled=False)
    np.testing.assert_allclose(losses, want_losses, rtol=rtol)
    np.testing.assert_array_equal(accs, want_accs)
    for key, want in _state(want_model, want_opt).items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(_state(model, opt)[key], want, rtol=rtol, atol=rtol * scale, err_msg=key)
    assert 0 < losses[-1] < losses[0]


def test_several_steps_in_one_call_equal_one_call_each():
    _, model, opt, losses, accs = _train("mlp2-relu-sce", np.float32, compiled=True, steps_per_call=3)
    _, want_model, want_opt, want_losses, want_accs = _train("mlp2-relu-sce", np.float32, compiled=True)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(accs, want_accs)
    np.testing.assert_array_equal(model.flat.params, want_model.flat.params)


def test_the_layers_see_the_compiled_steps_weights():
    """Evaluation runs the layers' own forward: it must see what the compiled step trained."""
    _, model, *_ = _train("mlp1-relu-sce", np.float32, compiled=True)
    _, want_model, *_ = _train("mlp1-relu-sce", np.float32, compiled=False)
    x, *_ = _data(np.float32)
    np.testing.assert_array_equal(model.forward(x[:20]).copy(), want_model.forward(x[:20]))


@pytest.mark.parametrize("name,kwargs", [
    ("mlp1-sigmoid-sce", {}),            # Sigmoid hidden layers: NumPy's vectorised exp wins
    ("mlp2-sigmoid-mse", {}),
    ("mlp2-relu-sce", {"fast": False}),  # the plain path stays plain
    ("mlp2-relu-sce", {"ops": "buffered"}),  # the buffered ops: the array code, no kernels
    ("mlp2-relu-sce", {"stack": (2,)}),  # stacked models
])
def test_networks_it_does_not_compile_keep_the_array_step(name, kwargs):
    model = xpmlp.build_model(name, backend="numpy", **kwargs)
    assert compiled_steps(model) is None
    assert type(make_stepper(model, SGD(model))) is Stepper


def test_without_kernels_there_is_no_compiled_step():
    model = xpmlp.build_model("mlp2-relu-sce", backend="numpy", ops="buffered")
    with pytest.raises(ValueError, match="no compiled step"):
        CompiledStepper(model, SGD(model))


def test_a_batch_of_another_dtype_is_converted_not_misread():
    """x in float64 for a float32 model: the step casts the batch, as the array path's
    matmul does, so its first loss is the untrained model's loss on that batch."""
    model = xpmlp.build_model("mlp2-relu-sce", backend="numpy", seed=1)
    untrained = xpmlp.build_model("mlp2-relu-sce", backend="numpy", seed=1)
    x, y, perm = _data(np.float64)
    losses, accs = np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    make_stepper(model, SGD(model, lr=0.05), True).step(x, y, perm[:BATCH], losses, accs, 0)
    rows = perm[:BATCH]
    want = untrained.loss.forward(untrained.forward(x[rows].astype(np.float32)), y[rows])
    np.testing.assert_allclose(losses[0], want, rtol=1e-6)
