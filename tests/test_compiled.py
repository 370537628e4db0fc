"""The compiled training step (Numba + NumPy's BLAS) against the array fast path it replaces.

Both take the same steps from the same weights on the same batches.  With ReLU hidden
layers and softmax cross-entropy the compiled step does the same arithmetic in the same
order (the same BLAS calls, the same fused loss and SGD loops), so everything must match
bit for bit.  A Sigmoid (the output's: Numba's scalar exp; a hidden layer's: the step's
own vectorised exp) differs from NumPy's exp in the last bits, so a float tolerance there.
"""
import ctypes
import os
import queue

import numpy as np
import pytest

import xpmlp
from xpmlp.backends import numpy_step
from xpmlp.backends.numpy_step import MLPSteps
from xpmlp.core.optim import SGD
from xpmlp.training.compiled import (
    BLOCK_BYTES,
    COLUMNS_MIN_BYTES,
    PROBE_MAX_S,
    PROBE_MIN_S,
    PROBE_S,
    PROBE_STEPS,
    SMALL_BATCH,
    Chooser,
    CompiledStepper,
    StackedCompiledStepper,
    compiled_steps,
)
from xpmlp.training.train import Stepper, make_stepper

pytestmark = pytest.mark.skipif(xpmlp.get_backend("numpy").kernels is None,
                                reason="needs Numba (the [fast] extra; CI installs it)")
# The array path the compiled step replaces: the fused ops (Numba kernels), step by step.

BATCH, STEPS = 50, 6


def _data(dtype, n=BATCH * STEPS):
    rng = np.random.default_rng(3)
    return (rng.random((n, 784)) - 0.5).astype(dtype), rng.integers(0, 10, n), rng.permutation(n)


def _build(name, dtype, **kwargs):
    """One of the report's networks by name, or (hidden, activation, loss) for any other."""
    if isinstance(name, tuple):
        return xpmlp.build_mlp(*name, backend="numpy", dtype=dtype, seed=1, init_std=0.1, ops="fused", **kwargs)
    return xpmlp.build_model(name, backend="numpy", dtype=dtype, seed=1, init_std=0.1, ops="fused", **kwargs)


def _train(name, dtype, compiled, steps_per_call=1, batch=BATCH):
    """(stepper, model, optimizer, losses, accuracies) after STEPS steps, on one thread."""
    model = _build(name, dtype)
    optimizer = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stepper = make_stepper(model, optimizer, compiled, threads=1)
    x, y, perm = _data(dtype, batch * STEPS)
    losses, accs = np.zeros(STEPS, dtype=dtype), np.zeros(STEPS, dtype=dtype)
    if steps_per_call == 1:
        for i in range(STEPS):
            stepper.step(x, y, perm[i * batch:(i + 1) * batch], losses, accs, i)
    else:
        for i in range(0, STEPS, steps_per_call):
            stepper.steps(x, y, perm[i * batch:(i + steps_per_call) * batch],
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


@pytest.mark.parametrize("name,batch,dtype", [("mlp2-relu-sce", 10, np.float32), ("mlp2-relu-sce", 10, np.float64),
                                              ("mlp1-relu-sce", 16, np.float32),
                                              (((300, 70), "relu", "sce"), 7, np.float32)], ids=str)
def test_a_small_batchs_weight_rows_in_blocks_train_as_the_array_path_bit_for_bit(name, batch, dtype):
    """At most SMALL_BATCH rows, a large layer's weight gradient and update are taken in
    blocks of at most BLOCK_BYTES (more parts than threads), cut where the products keep
    their bits; a smaller layer's later parts are empty.  The training is the array path's."""
    stepper, model, opt, losses, accs = _train(name, dtype, compiled=True, batch=batch)
    features, columns = stepper._batch[-2][1:3]
    itemsize, first = np.dtype(dtype).itemsize, model.layers[0].W.shape
    blocks = -(-first[0] * first[1] * itemsize // BLOCK_BYTES)
    assert features.shape[1] - 1 == blocks > 1 and columns.shape == features.shape  # (OpenBLAS cuts these)
    for bounds, layer in zip(features, [layer for layer in model.layers if hasattr(layer, "W")]):
        assert bounds[0] == 0 and bounds[-1] == layer.W.shape[0] and (np.diff(bounds) >= 0).all()
        assert np.count_nonzero(np.diff(bounds)) == max(1, -(-layer.W.size * itemsize // BLOCK_BYTES))
    _, want_model, want_opt, want_losses, want_accs = _train(name, dtype, compiled=False, batch=batch)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(accs, want_accs)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, opt)[key], want, err_msg=key)


def test_weight_rows_without_exact_blocks_take_fewer(monkeypatch):
    """Where a layer's blocks have no exact cuts (here: none in more than 3 parts, as a BLAS
    might), it takes half as many, and so on down to a part a thread; still the array
    path's training, bit for bit."""
    bounds = MLPSteps.bounds
    monkeypatch.setattr(MLPSteps, "bounds", lambda self, size, products, parts:
                        None if size == 784 and parts > 3 else bounds(self, size, products, parts))
    stepper, model, opt, losses, _ = _train("mlp2-relu-sce", np.float32, compiled=True, batch=10)
    assert [np.count_nonzero(np.diff(b)) for b in stepper._batch[-2][1]] == [3, 1, 1]
    _, want_model, want_opt, want_losses, _ = _train("mlp2-relu-sce", np.float32, compiled=False, batch=10)
    np.testing.assert_array_equal(losses, want_losses)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, opt)[key], want, err_msg=key)


def test_a_batch_past_small_batch_updates_each_layer_in_one_part():
    stepper, *_ = _train("mlp2-relu-sce", np.float32, compiled=True, batch=SMALL_BATCH + 1)
    features = stepper._batch[-2][1]
    assert features.tolist() == [[0, 784], [0, 256], [0, 128]]


# Odd widths (no vector-width multiple) and an odd batch, every activation and loss.
ODD = [((37, 19), act, loss) for act in ("relu", "sigmoid") for loss in ("sce", "mse")]


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("name,batch", [("mlp0-mse", BATCH), ("mlp1-relu-mse", BATCH), ("mlp2-relu-mse", BATCH),
                                        ("mlp1-sigmoid-sce", BATCH), ("mlp2-sigmoid-sce", BATCH),
                                        ("mlp1-sigmoid-mse", BATCH), ("mlp2-sigmoid-mse", BATCH),
                                        ("mlp2-sigmoid-mse", 10)]
                         + [(net, 23) for net in ODD], ids=str)
def test_compiled_step_with_a_sigmoid_matches_the_array_path(name, batch, dtype, rtol):
    """Every network with a Sigmoid anywhere, and odd shapes of every kind: the losses, the
    weights, the gradients and the momenta agree to float tolerance, the accuracies exactly."""
    stepper, model, opt, losses, accs = _train(name, dtype, compiled=True, batch=batch)
    assert isinstance(stepper, CompiledStepper)
    _, want_model, want_opt, want_losses, want_accs = _train(name, dtype, compiled=False, batch=batch)
    np.testing.assert_allclose(losses, want_losses, rtol=rtol)
    np.testing.assert_array_equal(accs, want_accs)
    for key, want in _state(want_model, want_opt).items():
        scale = np.abs(want).max()
        np.testing.assert_allclose(_state(model, opt)[key], want, rtol=rtol, atol=rtol * scale, err_msg=key)
    assert np.isfinite(losses).all() and not np.array_equal(model.flat.params, _build(name, dtype).flat.params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_vectorised_sigmoid_is_numpys_to_a_few_ulps_and_keeps_nan(dtype):
    from xpmlp.backends.numpy_step import sigmoid_vectorised

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(997) * 10, np.linspace(-800, 800, 1001),
                        [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf, np.nan]]).astype(dtype).reshape(-1, 1)
    x = np.tile(x, (1, 3))[:, :-1]  # two columns, the rows a stride of three apart: any layout of a row slice
    got = x.copy()
    sigmoid_vectorised(got)
    e = np.exp(-np.abs(x.astype(np.float64)))
    want = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(dtype)
    finite = ~np.isnan(x)
    assert np.isnan(got[~finite]).all()
    ulps = np.abs(got[finite] - want[finite]) / np.spacing(np.maximum(want[finite], np.finfo(dtype).tiny))
    assert ulps.max() <= 4


def test_a_long_wait_gives_the_core_away_and_a_short_one_does_not():
    """A thread that waits for a task longer than any task takes (SPINS_BEFORE_PAUSE looks)
    calls the OS's pause at each further look, until the task is done; a wait that ends at
    once never calls it."""
    from xpmlp.backends.numpy_step import DONE, SPINS_BEFORE_PAUSE, _wait_done

    sync, calls = np.zeros(2, dtype=np.int64), []

    @ctypes.CFUNCTYPE(ctypes.c_int)
    def pause():  # the third pause sees the task done
        calls.append(1)
        if len(calls) == 3:
            sync[DONE] = 1
        return 0

    address = ctypes.cast(pause, ctypes.c_void_p).value
    _wait_done(sync, 1, address)
    assert len(calls) == 3 and SPINS_BEFORE_PAUSE > 10_000  # ~0.1 ms at least: longer than a task's wait
    _wait_done(sync, 1, address)  # done already
    assert len(calls) == 3


def test_the_pause_is_the_oss_and_none_where_it_has_none(monkeypatch):
    from xpmlp.backends import numpy_step

    pause = ctypes.WinDLL("kernel32").SwitchToThread if os.name == "nt" else ctypes.CDLL(None).sched_yield
    assert numpy_step.pause_address() == ctypes.cast(pause, ctypes.c_void_p).value != 0

    def no_library(*args, **kwargs):
        raise OSError("no such library")

    with monkeypatch.context() as patch:
        patch.setattr(numpy_step.ctypes, "CDLL", no_library)
        assert numpy_step.pause_address() == 0
    monkeypatch.setattr(numpy_step, "pause_address", lambda: 0)  # the step then waits as it always did: spinning
    stepper, model, _, losses, _ = _two_threads("mlp1-relu-sce", np.float32)
    assert stepper.kernel.pause == 0 and stepper._helper is not None
    _, want_model, _, want_losses, _ = _train("mlp1-relu-sce", np.float32, compiled=False)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(model.flat.params, want_model.flat.params)


@pytest.mark.parametrize("source", [np.uint8, np.float64, np.float32])
def test_the_gathers_row_copy_casts_as_numpy_does(source):
    """copy_row, the gather's loop: the row in the batch's dtype, as NumPy's assignment gives it."""
    from xpmlp.backends.numpy_step import copy_row

    rng = np.random.default_rng(0)
    src = (rng.random(37) * 300).astype(source)
    for dtype in (np.float32, np.float64):
        dst = np.full(37, np.nan, dtype=dtype)
        copy_row(src, dst)
        want = np.empty(37, dtype=dtype)
        want[:] = src
        np.testing.assert_array_equal(dst, want)


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


MODELS = 3


def _train_stacked(name, dtype, compiled, shuffle, frozen=None, steps_per_call=1):
    """(stepper, model, optimizer, losses, accuracies) of MODELS stacked models with their own
    seeds, init stds and SGD settings after STEPS steps; model ``frozen`` frozen first."""
    model = xpmlp.build_model(name, backend="numpy", dtype=dtype, seed=[1, 4, 7], init_std=[0.1, 0.05, 0.1],
                              stack=(MODELS,), ops="fused")
    optimizer = SGD(model, lr=[0.05, 0.1, 0.01], momentum=[0.9, 0.0, 0.5], weight_decay=[5e-4, 0.0, 1e-3])
    if frozen is not None:
        optimizer.freeze(frozen)
    stepper = make_stepper(model, optimizer, compiled)
    x, y, perm = _data(dtype)
    if shuffle == "own":
        perm = np.stack([np.random.default_rng(k).permutation(len(perm)) for k in range(MODELS)])
    losses, accs = np.zeros((STEPS, MODELS), dtype=dtype), np.zeros((STEPS, MODELS), dtype=dtype)
    for i in range(0, STEPS, steps_per_call):
        if steps_per_call == 1:
            stepper.step(x, y, perm[..., i * BATCH:(i + 1) * BATCH], losses, accs, i)
        else:
            stepper.steps(x, y, perm[..., i * BATCH:(i + steps_per_call) * BATCH],
                          losses[i:i + steps_per_call], accs[i:i + steps_per_call])
    return stepper, model, optimizer, losses, accs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shuffle", ["shared", "own"])
@pytest.mark.parametrize("name,frozen,per_call", [("mlp0-sce", None, 1), ("mlp2-relu-sce", None, 1),
                                                   ("mlp2-relu-sce", 1, 1), ("mlp2-relu-sce", 0, 3)])
def test_compiled_step_of_stacked_models_equals_their_array_path_bit_for_bit(name, frozen, per_call, shuffle,
                                                                             dtype):
    """Each stacked model's compiled step is the one-model compiled step (same BLAS calls on
    its slices), so it matches the stacked array path bit for bit, one step a call or
    several; a frozen model is not stepped, and its weights stay as they were on both paths."""
    stepper, model, opt, losses, accs = _train_stacked(name, dtype, True, shuffle, frozen, per_call)
    assert isinstance(stepper, StackedCompiledStepper)
    _, want_model, want_opt, want_losses, want_accs = _train_stacked(name, dtype, False, shuffle, frozen)
    active = [k for k in range(MODELS) if k != frozen]
    np.testing.assert_array_equal(losses[:, active], want_losses[:, active])
    np.testing.assert_array_equal(accs[:, active], want_accs[:, active])
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, opt)[key][active], want[active], err_msg=key)
    start = xpmlp.build_model(name, backend="numpy", dtype=dtype, seed=[1, 4, 7], init_std=[0.1, 0.05, 0.1],
                              stack=(MODELS,), ops="fused")
    for k in range(MODELS):
        moved = not np.array_equal(model.flat.params[k], start.flat.params[k])
        assert moved == (k != frozen) and np.array_equal(want_model.flat.params[k], start.flat.params[k]) != moved


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_stacked_sigmoid_models_match_their_array_path(dtype, rtol):
    stepper, model, opt, losses, accs = _train_stacked("mlp1-sigmoid-mse", dtype, True, "own", frozen=2)
    assert isinstance(stepper, StackedCompiledStepper)
    _, want_model, want_opt, want_losses, want_accs = _train_stacked("mlp1-sigmoid-mse", dtype, False, "own", 2)
    np.testing.assert_allclose(losses[:, :2], want_losses[:, :2], rtol=rtol)
    np.testing.assert_array_equal(accs[:, :2], want_accs[:, :2])
    np.testing.assert_allclose(model.flat.params, want_model.flat.params, rtol=rtol,
                               atol=rtol * np.abs(want_model.flat.params).max())


def _stacked_on(threads, shuffle, frozen=None, steps_per_call=3, helper=True):
    """(stepper, model, losses, accs) of MODELS stacked mlp2-relu-sce models after STEPS steps
    with ``threads`` threads (not adaptive); ``helper=False``: the helper never runs."""
    model = xpmlp.build_model("mlp2-relu-sce", backend="numpy", dtype=np.float32, seed=[1, 4, 7],
                              init_std=[0.1, 0.05, 0.1], stack=(MODELS,), ops="fused")
    optimizer = SGD(model, lr=[0.05, 0.1, 0.01], momentum=[0.9, 0.0, 0.5], weight_decay=[5e-4, 0.0, 1e-3])
    if frozen is not None:
        optimizer.freeze(frozen)
    stepper = StackedCompiledStepper(model, optimizer, threads=threads, adaptive=False)
    if not helper:
        stepper._two_threads()
        stepper._helper.jobs = queue.SimpleQueue()  # jobs handed to nobody
    x, y, perm = _data(np.float32)
    if shuffle == "own":
        perm = np.stack([np.random.default_rng(k).permutation(len(perm)) for k in range(MODELS)])
    losses, accs = np.zeros((STEPS, MODELS), dtype=np.float32), np.zeros((STEPS, MODELS), dtype=np.float32)
    for i in range(0, STEPS, steps_per_call):
        stepper.steps(x, y, perm[..., i * BATCH:(i + steps_per_call) * BATCH],
                      losses[i:i + steps_per_call], accs[i:i + steps_per_call])
    return stepper, model, losses, accs


@pytest.mark.parametrize("shuffle,frozen,helper", [("shared", None, True), ("own", None, True),
                                                   ("shared", 1, True), ("own", None, False)])
def test_stacked_models_on_two_threads_train_as_on_one_bit_for_bit(shuffle, frozen, helper):
    """Two threads take whole models, each on work arrays of its own: the same bits as one
    thread, whoever takes which model, and the calling thread takes them all if no helper
    comes."""
    stepper, model, losses, accs = _stacked_on(2, shuffle, frozen, helper=helper)
    _, want_model, want_losses, want_accs = _stacked_on(1, shuffle, frozen)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(accs, want_accs)
    np.testing.assert_array_equal(model.flat.params, want_model.flat.params)
    assert (stepper._helper.tasks[0] == 0) if not helper else stepper._lanes[0] is not None


def test_the_helper_takes_stacked_models():
    stepper, *_ = _stacked_on(2, "shared", steps_per_call=1)
    x, y, perm = _data(np.float32)
    losses, accs = np.zeros((1, MODELS), dtype=np.float32), np.zeros((1, MODELS), dtype=np.float32)
    for _ in range(500):  # on a loaded machine the helper may be late for the first calls
        if stepper._helper.tasks[0] > 0:
            break
        stepper.steps(x, y, perm[:BATCH], losses, accs)
    assert stepper._helper.tasks[0] > 0 and stepper._lanes[1] is not None


def test_a_stacked_step_the_helper_fails_is_raised_on_the_calling_thread(monkeypatch):
    stepper, *_ = _stacked_on(2, "shared", steps_per_call=1)
    x, y, perm = _data(np.float32)
    losses, accs = np.zeros((1, MODELS), dtype=np.float32), np.zeros((1, MODELS), dtype=np.float32)
    real = stepper._step_model

    def broken(lane, *args):
        if lane == 1:
            raise RuntimeError("the helper's step failed")
        real(lane, *args)

    monkeypatch.setattr(stepper, "_step_model", broken)
    with pytest.raises(RuntimeError, match="the helper's step failed"):
        for _ in range(500):  # until the helper takes a model
            stepper.steps(x, y, perm[:BATCH], losses, accs)


@pytest.mark.parametrize("stacked", [False, True], ids=["one-model", "stacked"])
def test_a_stepper_no_longer_used_is_collected_and_its_helper_thread_ends(stacked):
    """The helper holds neither its stepper nor a finished call (a stacked call's function
    holds the stepper), so a trainer's helper thread ends with it: a sweep's process trains
    group after group."""
    import gc
    import threading
    import time
    import weakref

    def helpers():
        return sum(t.name == "xpmlp-step" for t in threading.enumerate())

    gc.collect()  # earlier tests' steppers: their helpers end now, not during this test
    time.sleep(0.2)
    before = helpers()
    stepper = _stacked_on(2, "shared")[0] if stacked else _two_threads("mlp1-relu-sce", np.float32)[0]
    assert stepper._helper is not None and helpers() == before + 1
    gone = weakref.ref(stepper)
    del stepper
    gc.collect()
    assert gone() is None, "something still holds the stepper"
    deadline = time.monotonic() + 10
    while helpers() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert helpers() == before


@pytest.mark.parametrize("name,kwargs", [
    ("mlp2-relu-sce", {"ops": "plain"}),  # the plain path stays plain
    ("mlp2-relu-sce", {"ops": "buffered"}),  # the buffered ops: the array code, no kernels
    ("mlp2-relu-sce", {"stack": (2, 3)}),  # models stacked over two axes
])
def test_networks_it_does_not_compile_keep_the_array_step(name, kwargs):
    model = xpmlp.build_model(name, backend="numpy", **kwargs)
    assert compiled_steps(model) is None
    assert type(make_stepper(model, SGD(model))) is Stepper


def test_mixed_hidden_activations_keep_the_array_step():
    from xpmlp.core.layers import Sigmoid

    model = xpmlp.build_model("mlp2-relu-sce", backend="numpy")
    model.layers[3] = Sigmoid(model.backend, model.dtype, ops=model.ops)  # ReLU then Sigmoid
    assert compiled_steps(model) is None
    model.layers[1] = Sigmoid(model.backend, model.dtype, ops=model.ops)  # Sigmoid throughout
    assert compiled_steps(model) is not None


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


# ---------------------------------------------------------------- two threads

def _assert_trains_as_one_thread(name, dtype, model, optimizer, losses, accs):
    """The losses, accuracies, weights, gradients and momenta of STEPS steps are those of
    the compiled step on one thread, three steps a call, bit for bit."""
    _, want_model, want_opt, want_losses, want_accs = _train(name, dtype, compiled=True, steps_per_call=3)
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(accs, want_accs)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, optimizer)[key], want, err_msg=key)


def _two_threads(name, dtype, batch=BATCH, steps_per_call=3, threads=2):
    """(stepper, model, optimizer, losses, accuracies) after STEPS steps, every call split
    between the calling thread and the helper (or ``threads`` - 1 helpers)."""
    model = _build(name, dtype)
    optimizer = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stepper = CompiledStepper(model, optimizer, threads=threads, adaptive=False)
    x, y, perm = _data(dtype, batch * STEPS)
    losses, accs = np.zeros(STEPS, dtype=dtype), np.zeros(STEPS, dtype=dtype)
    for i in range(0, STEPS, steps_per_call):
        stepper.steps(x, y, perm[i * batch:(i + steps_per_call) * batch],
                      losses[i:i + steps_per_call], accs[i:i + steps_per_call])
    return stepper, model, optimizer, losses, accs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["mlp0-sce", "mlp2-relu-sce", "mlp1-relu-mse", "mlp2-relu-mse",
                                  "mlp1-sigmoid-sce", "mlp2-sigmoid-sce", "mlp2-sigmoid-mse"])
def test_two_threads_train_as_one_bit_for_bit(name, dtype):
    """The halves are cut where the products return the bits of whole ones, so splitting a
    step between two threads changes nothing (and with softmax cross-entropy, the compiled
    step on one thread equals the fused ops: above)."""
    stepper, model, opt, losses, accs = _two_threads(name, dtype)
    assert stepper._batch[-1] is not None, "no exact cut found: nothing split"
    _assert_trains_as_one_thread(name, dtype, model, opt, losses, accs)


def test_the_cuts_split_numpys_products_exactly():
    """exact_cut's answer checked against NumPy's own matmul: each half's product has the
    bits of the rows of the whole one."""
    model = xpmlp.build_model("mlp2-relu-sce", backend="numpy", seed=1)
    kernel = compiled_steps(model)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((100, 784)).astype(np.float32), rng.standard_normal((784, 256)).astype(np.float32)
    cut = kernel.cut(100, [(784, 256, False, False)])
    assert cut is not None and 25 <= cut <= 75
    np.testing.assert_array_equal(np.vstack([a[:cut] @ b, a[cut:] @ b]), a @ b)
    cut = kernel.cut(784, [(100, 256, True, False)])  # a weight gradient: a^T g, split by rows of W
    g = rng.standard_normal((100, 256)).astype(np.float32)
    np.testing.assert_array_equal(np.vstack([a[:, :cut].T @ g, a[:, cut:].T @ g]), a.T @ g)


def test_the_helper_takes_part():
    stepper, *_ = _two_threads("mlp2-relu-sce", np.float32)
    x, y, perm = _data(np.float32)
    losses, accs = np.zeros(STEPS, dtype=np.float32), np.zeros(STEPS, dtype=np.float32)
    for _ in range(500):  # on a loaded machine the helper may be late for the first calls
        if stepper._helper.tasks[0] > 0:
            break
        stepper.steps(x, y, perm, losses, accs)
    assert stepper._helper.tasks[0] > 0


def test_the_calling_thread_takes_every_task_if_no_helper_comes():
    """Tasks are claimed, not assigned: a helper that never runs holds nothing back."""
    stepper, model, opt, losses, accs = _two_threads("mlp2-relu-sce", np.float32, steps_per_call=1)
    _, want_model, *_ = _two_threads("mlp2-relu-sce", np.float32)
    stepper2, model2, *_ = _two_threads("mlp2-relu-sce", np.float32, steps_per_call=STEPS)
    stepper2._helper.jobs = queue.SimpleQueue()  # jobs handed to nobody
    x, y, perm = _data(np.float32)
    for _ in range(2):
        for s in (stepper, stepper2):
            s.steps(x, y, perm, losses, accs)
    np.testing.assert_array_equal(model2.flat.params, model.flat.params)


def test_a_late_helper_of_an_earlier_call_takes_nothing():
    stepper, model, *_ = _two_threads("mlp1-relu-sce", np.float32)
    x, y, perm = _data(np.float32)
    losses, accs = np.zeros(STEPS, dtype=np.float32), np.zeros(STEPS, dtype=np.float32)
    jobs = queue.SimpleQueue()
    stepper._helper.jobs = jobs  # keep the call's job instead of running it
    stepper.steps(x, y, perm, losses, accs)
    kernel, stale_args = jobs.get()
    stepper.steps(x, y, perm, losses, accs)  # the next call: a new generation
    params = model.flat.params.copy()
    assert kernel(*stale_args) == 0  # no task claimed
    np.testing.assert_array_equal(model.flat.params, params)


def test_a_batch_too_small_to_split_runs_on_one_thread():
    stepper, model, opt, losses, accs = _two_threads("mlp1-relu-sce", np.float32, batch=6)
    assert stepper._batch[-1] is None and stepper._helper is None
    _, want_model, *_ = _train("mlp1-relu-sce", np.float32, compiled=False, batch=6)
    np.testing.assert_array_equal(model.flat.params, want_model.flat.params)


def test_the_chooser_tries_both_then_keeps_the_faster_and_probes_the_other():
    """On a clock that advances by the steps' time: probes by the clock, rarer while the
    other way loses, down to one every PROBE_MAX_S; the end of a busy spell seen within
    PROBE_MAX_S."""
    now = [0.0]
    chooser, per_step = Chooser(clock=lambda: now[0]), {1: 0.0008, 2: 0.0004}

    def call(steps=25):
        plan = []
        for threads, count in chooser.plan(steps):  # each part decided after the last one's record
            now[0] += count * per_step[threads]
            chooser.record(threads, count, count * per_step[threads])
            plan.append((threads, count))
        return plan, now[0]

    probe_one = [(1, PROBE_STEPS), (2, 25 - PROBE_STEPS)]
    assert [call()[0], call()[0]] == [[(2, 25)], [(1, 25)]]  # each tried once, two threads first
    calls = [call() for _ in range(int(2 / 0.01))]  # two seconds of two-thread calls (10 ms each)
    probes = [t for p, t in calls if p == probe_one]
    assert all(p == [(2, 25)] for p, _ in calls if p != probe_one)
    gaps = np.diff(probes)
    assert gaps[0] < 2 * PROBE_MIN_S + 0.02 and PROBE_MAX_S <= gaps[-1] < PROBE_MAX_S + 0.02
    assert all(gaps[1:] >= gaps[:-1] - 0.011)  # rarer (to a call's time)
    per_step[2] = 0.004  # the machine gets busy: a step waits for a descheduled helper
    calls = [call() for _ in range(200)]
    start = calls[0][1]
    assert calls[1][0] == [(1, 25)] and calls[-1][0] == [(1, 25)]  # one slow call, then one thread
    probes = [t for p, t in calls if [threads for threads, _ in p] == [2, 1]]  # lost: the call goes on with one
    # as long as ever, though the split way's latest steps were slow: by the running way's
    assert {p[0][1] for p, _ in calls if [threads for threads, _ in p] == [2, 1]} == {PROBE_STEPS}
    assert probes and np.diff([start] + probes).max() < PROBE_MAX_S + 0.1
    assert sum(p != [(1, 25)] for p, _ in calls) == len(probes) + 1  # the first call, then probes
    busy = sum(count for p, _ in calls for threads, count in p if threads == 2)
    assert busy <= 25 + PROBE_STEPS * (1 + (calls[-1][1] - start) / PROBE_MAX_S) + 4 * PROBE_STEPS
    per_step[2] = 0.0004  # quiet again: the next probe sees it
    quiet = now[0]
    calls = [call() for _ in range(100)]
    back = next(t for p, t in calls if [threads for threads, _ in p] == [2, 2])  # won: the call goes on split
    assert back - quiet < PROBE_MAX_S + 0.03 and calls[-1][0] == [(2, 25)]
    assert call(3)[0] in ([(2, 3)], [(1, 3)])  # a call shorter than a probe is one way
    assert chooser.steps_run[1] + chooser.steps_run[2] == (2 + 200 + 200 + 100) * 25 + 3


def test_one_slow_call_changes_the_way_and_the_other_is_tried_again_soon():
    """A hiccup (a slow two-thread call on a quiet machine) hands the steps to one thread
    only until the next probe, PROBE_MIN_S later."""
    now = [0.0]
    chooser, per_step = Chooser(clock=lambda: now[0]), {1: 0.0008, 2: 0.0004}

    def call(slow=1.0):
        plan = []
        for threads, count in chooser.plan(25):
            now[0] += count * per_step[threads] * slow
            chooser.record(threads, count, count * per_step[threads] * slow)
            plan.append((threads, count))
        return plan

    for _ in range(300):
        call()
    assert chooser.interval == PROBE_MAX_S
    call(slow=5.0)  # two threads' call, five times slower
    hiccup = now[0]
    assert chooser.best() == 1
    for _ in range(100):
        if [threads for threads, _ in call()] == [2, 2]:  # the probe won, and its call went on split
            break
    assert now[0] - hiccup < PROBE_MIN_S + 0.03 and call() == [(2, 25)]


def test_probes_of_long_steps_are_short():
    """A wide network's steps take ~10-20 ms: a probe is as many as take PROBE_S (one at
    least), not PROBE_STEPS, so probes stay a small share of the steps."""
    now = [0.0]
    chooser, per_step = Chooser(clock=lambda: now[0]), {1: 0.012, 2: 0.007}
    probes = []
    while now[0] < 60:
        for threads, count in chooser.plan(25):
            now[0] += count * per_step[threads]
            if threads == chooser.probing:
                probes.append(count)
            chooser.record(threads, count, count * per_step[threads])
    assert set(probes) == {max(1, int(PROBE_S / per_step[2]))} == {1}  # by the running way's steps
    assert chooser.steps_run[1] <= 0.05 * chooser.steps_run[2]


def test_a_lucky_probe_on_a_busy_machine_does_not_bring_probes_sooner():
    """On a busy machine a short probe of two threads can win by luck (the neighbour was
    off its core for those steps): the rest of its call then runs split, loses, and the way
    goes back to one thread; that counts as a probe that lost, so probes still become
    rarer, down to one every PROBE_MAX_S, and a lucky probe costs one call's steps."""
    now = [0.0]
    chooser = Chooser(clock=lambda: now[0])

    def per_step(threads, count, probe):
        if threads == 1:
            return 0.0011
        return 0.0008 if probe else 0.0015  # every probe lucky, every longer run slow

    calls = []
    for _ in range(1500):
        plan = []
        for threads, count in chooser.plan(25):
            seconds = count * per_step(threads, count, probe=threads == chooser.probing)
            now[0] += seconds
            chooser.record(threads, count, seconds)
            plan.append((threads, count))
        calls.append((plan, now[0]))
    split = [(p, t) for p, t in calls if any(threads == 2 for threads, _ in p)]
    assert [threads for threads, _ in split[-1][0]] == [2, 2]  # still lucky, still tried
    gaps = np.diff([t for _, t in split])
    assert PROBE_MAX_S <= gaps[-1] < PROBE_MAX_S + 0.1  # as rare as a probe that loses
    assert sum(gaps < PROBE_MAX_S) <= 4  # reached after a few doublings
    assert chooser.steps_run[2] <= 25 * len(split) and calls[-1][0] == [(1, 25)]


@pytest.mark.parametrize("threads,batch,parts", [(3, 50, 3), (4, 100, 4), (8, 50, 3), (4, 23, 2), (3, 16, 2)])
def test_more_threads_train_as_one_bit_for_bit(threads, batch, parts):
    """P threads split a step in up to P parts (one per ROWS_PER_PART batch rows, two at
    least), each cut where the products keep their bits: the same training as one thread.
    (Claimed, not assigned: it holds on two cores too, only slower.)"""
    model = _build("mlp2-relu-sce", np.float32)
    optimizer = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stepper = CompiledStepper(model, optimizer, threads=threads, adaptive=False)
    x, y, perm = _data(np.float32, batch * STEPS)
    losses, accs = np.zeros(STEPS, dtype=np.float32), np.zeros(STEPS, dtype=np.float32)
    stepper.steps(x, y, perm, losses, accs)
    assert stepper.parts_for(batch) == parts and len(stepper._batch[-1][0]) == parts + 1, stepper._batch[-1]
    assert len(stepper._helpers) == parts - 1
    if batch <= SMALL_BATCH:  # the weight rows in more parts than the threads: blocks (below)
        assert stepper._batch[-1][1].shape[1] - 1 > parts
    _, want_model, want_opt, want_losses, want_accs = _train("mlp2-relu-sce", np.float32, compiled=True,
                                                             batch=batch)
    np.testing.assert_array_equal(losses, want_losses)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, optimizer)[key], want, err_msg=key)


@pytest.mark.parametrize("act,threads,dtype", [("relu", 2, np.float32), ("relu", 3, np.float64),
                                               ("sigmoid", 2, np.float32)])
def test_wide_layers_split_by_columns_train_as_one_thread_bit_for_bit(act, threads, dtype):
    """Layers whose W takes COLUMNS_MIN_BYTES or more (here 784 x 1024 and 1024 x 640) go by
    their outputs' columns, a phase each forward and backward, cut where the products keep
    their bits; the rest by rows.  The same training as one thread, bit for bit."""
    name = ((1024, 640), act, "sce")
    stepper, model, optimizer, losses, accs = _two_threads(name, dtype, threads=threads)
    forward_columns, backward_columns = stepper._batch[-1][5:]
    assert forward_columns.shape == (2, threads + 1) and backward_columns.shape == (1, threads + 1)
    assert forward_columns[:, -1].tolist() == [1024, 640] and backward_columns[:, -1].tolist() == [1024]
    assert np.diff(forward_columns).min() > 0 and np.diff(backward_columns).min() > 0
    _assert_trains_as_one_thread(name, dtype, model, optimizer, losses, accs)


def test_narrow_layers_go_by_rows():
    stepper, *_ = _two_threads(((100, 50), "relu", "sce"), np.float32)
    forward_columns, backward_columns = stepper._batch[-1][5:]
    assert forward_columns.shape[0] == 0 and backward_columns.shape[0] == 0
    assert 784 * 100 * 4 < COLUMNS_MIN_BYTES
    stepper, *_ = _two_threads("mlp2-relu-sce", np.float32)  # 784 x 256: by columns, the next 256 x 128 not
    forward_columns, backward_columns = stepper._batch[-1][5:]
    assert forward_columns.shape == (1, 3) and backward_columns.shape == (0, 3)


def test_a_steps_phases_in_order():
    kinds, layers, starts = numpy_step._phases(2, 3, 2, 2)  # rows in 2, features in 3, 2 layers by 2 columns
    S = numpy_step
    assert kinds.tolist() == [S.GATHER, S.FORWARD, S.FORWARD, S.ROWS, S.BACKWARD, S.FEATURES]
    assert layers.tolist()[1:5] == [0, 1, 2, 1] and starts.tolist() == [0, 2, 4, 6, 8, 10, 13]
    kinds, layers, starts = numpy_step._phases(2, 2, 0, 1)
    assert kinds.tolist() == [S.ROWS, S.FEATURES] and starts.tolist() == [0, 2, 4]


def test_stacked_models_on_more_threads_train_as_on_one_bit_for_bit():
    model = xpmlp.build_model("mlp1-relu-sce", backend="numpy", dtype=np.float32, seed=[1, 4, 7, 9],
                              stack=(4,), ops="fused")
    optimizer = SGD(model, lr=[0.05, 0.1, 0.01, 0.02], momentum=0.9, weight_decay=5e-4)
    stepper = StackedCompiledStepper(model, optimizer, threads=3, adaptive=False)
    want = xpmlp.build_model("mlp1-relu-sce", backend="numpy", dtype=np.float32, seed=[1, 4, 7, 9],
                             stack=(4,), ops="fused")
    want_stepper = StackedCompiledStepper(want, SGD(want, lr=[0.05, 0.1, 0.01, 0.02], momentum=0.9,
                                                    weight_decay=5e-4), threads=1)
    x, y, perm = _data(np.float32)
    losses, accs = np.zeros((STEPS, 4), dtype=np.float32), np.zeros((STEPS, 4), dtype=np.float32)
    want_losses = losses.copy()
    stepper.steps(x, y, perm, losses, accs)
    want_stepper.steps(x, y, perm, want_losses, accs.copy())
    assert len(stepper._helpers) == 2
    np.testing.assert_array_equal(losses, want_losses)
    np.testing.assert_array_equal(model.flat.params, want.flat.params)


def test_a_last_product_without_an_exact_cut_is_computed_whole_by_each_part():
    """Hidden width 1024 to 10 classes: OpenBLAS gives the halves of that product another
    kernel (no cut keeps its bits), so each part computes it whole; two threads still train
    as one, bit for bit, and the other products are still split."""
    stepper, model, opt, losses, accs = _two_threads(((1024,), "relu", "sce"), np.float32, batch=100,
                                                     steps_per_call=STEPS)
    row_bounds, _, _, whole_ins, whole_outs, *_ = stepper._batch[-1]
    assert len(row_bounds) == 3 and whole_ins.shape == (2, 100, 1024) and whole_outs.shape == (2, 100, 10)
    _, want_model, want_opt, want_losses, _ = _train(((1024,), "relu", "sce"), np.float32, compiled=True,
                                                     batch=100)
    np.testing.assert_array_equal(losses, want_losses)
    for key, want in _state(want_model, want_opt).items():
        np.testing.assert_array_equal(_state(model, opt)[key], want, err_msg=key)
