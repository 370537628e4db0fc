"""How many launches a stacked training step makes on the array path, counted on the CPU.

On a GPU a step of these small models costs launches, not arithmetic, so stacking K models
pays only if a step launches as often for K models as for one.  No GPU is needed to count:
the CUDA ops run here on NumPy arrays of a subclass that logs every ufunc, array function
and item assignment (each a launch on CuPy), with CupyKernels built on a stand-in ``cupy``
whose kernels log their launch and do their work in NumPy (the raw loss kernel block by
block, at the offsets and strides it is given, as the CUDA code reads them).
"""
import types

import numpy as np
import pytest
from helpers import sgd_by_layer_reference

import xpmlp
from xpmlp.backends.base import Backend
from xpmlp.backends.cupy_kernels import CupyKernels
from xpmlp.core.ops import BufferedOps, CudaOps, PlainOps, Scratch
from xpmlp.core.optim import SGD
from xpmlp.training.loop import Stepper

LOG = []  # what the step did, in order; filled only while ``counting`` is on
counting = types.SimpleNamespace(on=False)
VIEWS = {"reshape", "expand_dims", "swapaxes", "matrix_transpose"}  # no launch on CuPy either


def _log(what):
    if counting.on and what not in VIEWS:
        LOG.append(what)


def _plain(tree):
    """``tree`` with every Counted array as a plain ndarray view (lists, tuples, dicts too)."""
    if isinstance(tree, Counted):
        return tree.view(np.ndarray)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_plain(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _counted(result):
    if isinstance(result, np.ndarray) and not isinstance(result, Counted):
        return result.view(Counted)
    if isinstance(result, tuple):
        return tuple(_counted(r) for r in result)
    return result


class Counted(np.ndarray):
    """An ndarray that logs each operation that would be a launch on CuPy; views are free."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _log(f"{ufunc.__name__}.{method}")
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _counted(result)

    def __array_function__(self, func, types_, args, kwargs):
        _log(func.__name__)
        result = func(*_plain(args), **_plain(kwargs))
        return kwargs["out"] if kwargs.get("out") is not None else _counted(result)

    def __setitem__(self, key, value):
        _log("setitem")
        self.view(np.ndarray)[key] = _plain(value)


class CountingNumpy:
    """NumPy as an array namespace whose functions return Counted arrays."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, (types.FunctionType, types.BuiltinFunctionType, np.ufunc)):
            return lambda *args, **kwargs: _counted(attr(*args, **kwargs))
        return attr


# ---------------------------------------------------------------- a stand-in cupy for CupyKernels

def _elementwise_sgd(g, lr, momentum, weight_decay, p, v, active=True):
    vi = momentum * v + (g + weight_decay * p)
    v[...] = np.where(active, vi, v)
    p[...] = np.where(active, p - lr * vi, p)


ELEMENTWISE_WORK = {  # name -> what the CUDA body does, in NumPy, into the output arguments
    "xpmlp_sgd_step": _elementwise_sgd,
    "xpmlp_sgd_step_stacked": lambda g, lr, m, wd, active, p, v: _elementwise_sgd(g, lr, m, wd, p, v, active),
    "xpmlp_sgd_step_by_layer": lambda g, lr, m, wd, active, starts, sizes, p, v:
        sgd_by_layer_reference(p, g, v, lr, m, wd, active, starts, sizes),
    "xpmlp_relu_backward": lambda y, grad_y, grad_x: np.copyto(grad_x, np.where(y > 0, grad_y, 0)),
    "xpmlp_sigmoid_forward": lambda x, y: np.copyto(y, PlainOps(xpmlp.get_backend("numpy")).sigmoid(x, None)),
    "xpmlp_sigmoid_backward": lambda y, grad_y, grad_x: np.copyto(grad_x, grad_y * y * (1 - y)),
}


def _raw_loss_kernel(name):
    """The raw loss kernel of ``name``, block by block: block m at the offsets the CUDA code
    computes from blockIdx.x, its math by the reference ops."""
    reference = getattr(PlainOps(xpmlp.get_backend("numpy")), name.removeprefix("xpmlp_"))

    def launch(grid, block, args, shared_mem):
        _log(f"launch {name} grid={grid}")
        output, labels, grad, loss, acc, n, k, labels_stride, out_stride = _plain(args)
        assert output.flags.c_contiguous and grad.flags.c_contiguous and labels.dtype == np.int64
        n, k = int(n), int(k)
        flat_grad = grad.reshape(-1)  # a view: grad is contiguous
        slots = [np.lib.stride_tricks.as_strided(a, shape=grid, strides=(int(out_stride) * a.itemsize,))
                 for a in (loss, acc)]
        for m in range(grid[0]):
            rows = output.reshape(-1)[m * n * k:(m + 1) * n * k].reshape(n, k)
            model_labels = labels.reshape(-1)[m * int(labels_stride):m * int(labels_stride) + n]
            model_loss, model_acc, model_grad = reference(rows, model_labels, None)
            flat_grad[m * n * k:(m + 1) * n * k] = model_grad.reshape(-1)
            slots[0][m], slots[1][m] = model_loss, model_acc
    return launch


def fake_cupy():
    def elementwise(inputs, outputs, body, name, options=()):
        def launch(*args):
            _log(f"launch {name}")
            ELEMENTWISE_WORK[name](*_plain(args))
        return launch

    class RawModule:
        def __init__(self, code, options, name_expressions):
            pass

        def get_function(self, name):
            return _raw_loss_kernel(name.split("<")[0])

    def ascontiguousarray(a, dtype=None):
        if a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a  # CuPy returns the array itself: no launch
        _log("copy")
        return _counted(np.ascontiguousarray(_plain(a), dtype=dtype))

    return types.SimpleNamespace(ElementwiseKernel=elementwise, RawModule=RawModule, int64=np.int64,
                                 ascontiguousarray=ascontiguousarray,
                                 empty=lambda shape, dtype: _counted(np.empty(shape, dtype)))


class CountedCudaBackend(Backend):
    """The CuPy backend's interface on Counted NumPy arrays, with CupyKernels on fake_cupy."""

    name = "cupy"
    fast = True

    def __init__(self):
        super().__init__(CountingNumpy(), "cuda:0 (counted on the CPU)")
        self.kernels = CupyKernels(fake_cupy())

    def to_numpy(self, a):
        return np.array(_plain(a))


class CudaOpsModelMajor(CudaOps):
    """The CUDA ops with the stacked buffers as on the CPU: (K, P), a row a model."""

    stack_by_layer = False


OPS = {"cuda-fused": CudaOps, "buffered": BufferedOps, "cuda-fused-model-major": CudaOpsModelMajor}


def stacked_model(model_name, models, ops_name):
    backend = CountedCudaBackend()
    model = xpmlp.build_model(model_name, backend=backend, dtype="float32", seed=list(range(models)),
                              init_std=0.1, stack=(models,), ops=OPS[ops_name](backend))
    optimizer = SGD(model, lr=[0.1 + 0.1 * k for k in range(models)], momentum=[0.9] * models,
                    weight_decay=[5e-4 * k for k in range(models)])
    return backend, model, optimizer


def step_log(model_name, models, ops_name, steps=2, freeze=None):
    """What the last of ``steps`` stacked SGD steps of ``models`` models did (the first ones
    make the buffers), each model's losses of the last step, and the model and optimizer.
    ``freeze``: a model to freeze after the first step."""
    backend, model, optimizer = stacked_model(model_name, models, ops_name)
    stepper = Stepper(model, optimizer)
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.random((64, 784)), dtype=np.float32)
    y = backend.asarray(rng.integers(0, 10, 64))
    losses, accs = (backend.xp.zeros((steps, models), dtype=np.float32) for _ in range(2))
    LOG.clear()
    for i in range(steps):
        if i == 1 and freeze is not None:
            optimizer.freeze(freeze)
        counting.on = i == steps - 1
        try:
            stepper.step(x, y, backend.asarray(rng.permutation(64)[:16]), losses, accs, i)
        finally:
            counting.on = False
    return list(LOG), backend.to_numpy(losses)[-1], (model, optimizer)


@pytest.mark.parametrize("ops_name", ["cuda-fused", "buffered"])
@pytest.mark.parametrize("model_name", ["mlp2-relu-sce", "mlp1-sigmoid-mse"])
def test_a_stacked_step_launches_as_often_for_many_models_as_for_two(model_name, ops_name):
    """The same launches, in the same order, for K = 2 and K = 7: O(1) in K.  With the CUDA
    ops the loss is one launch over a grid of K blocks, and nothing refills the all-active
    SGD mask (no item assignment at all in a step)."""
    two, _, _ = step_log(model_name, 2, ops_name)
    seven, _, _ = step_log(model_name, 7, ops_name)
    assert [entry.replace("(2,)", "(K,)") for entry in two] == [entry.replace("(7,)", "(K,)") for entry in seven], \
        f"K = 2: {len(two)} launches, K = 7: {len(seven)}"
    if ops_name == "cuda-fused":
        assert "setitem" not in seven, seven
        loss = "xpmlp_softmax_xent" if model_name.endswith("sce") else "xpmlp_euclidean"
        assert [e for e in seven if e.startswith("launch xpmlp_") and "sgd" not in e and "sigmoid" not in e
                and "relu" not in e] == [f"launch {loss} grid=(7,)"]
        linears, activations = (3, 4) if model_name == "mlp2-relu-sce" else (2, 4)
        # the SGD step: one launch over the whole buffers, laid out by layer
        assert seven.count("launch xpmlp_sgd_step_by_layer") == 1
        # Each Linear: GEMM and bias forward, weight-gradient GEMM and bias sum backward, and
        # the input-gradient GEMM but for the first; each activation one launch each way;
        # then the two gathers, the loss and the SGD step.
        assert len(seven) == 5 * linears - 1 + activations + 4, seven


@pytest.mark.parametrize("model_name", ["mlp2-relu-sce", "mlp1-sigmoid-mse"])
def test_the_counted_cuda_step_gives_each_model_the_loss_of_the_buffered_step(model_name):
    """The counting stand-in computes: its stacked CUDA step's losses (the one-launch loss
    kernel, block by block at its offsets) equal the buffered array code's."""
    _, cuda, _ = step_log(model_name, 3, "cuda-fused")
    _, buffered, _ = step_log(model_name, 3, "buffered")
    np.testing.assert_allclose(cuda, buffered, rtol=1e-6)
    assert len(set(cuda.tolist())) == 3, "three models, three losses"


@pytest.mark.parametrize("name", ["softmax_xent", "euclidean"])
@pytest.mark.parametrize("shared_labels", [True, False], ids=["shared-labels", "own-labels"])
def test_the_stacked_loss_launch_reads_and_writes_each_models_own_memory(name, shared_labels):
    """CupyKernels' stacked loss: one launch, grid (K,), and with the offsets and strides it
    passes, block m reads model m's rows and labels and writes model m's gradient and its
    slots in a record row, as the model alone gives them."""
    kernels = CountedCudaBackend().kernels
    models, rows = 4, 9
    rng = np.random.default_rng(1)
    output = rng.normal(size=(models, rows, 10)).astype(np.float32)
    labels = rng.integers(0, 10, rows if shared_labels else (models, rows))
    records = np.zeros((2, 3, models), dtype=np.float32)
    grad = np.empty_like(output)
    LOG.clear()
    counting.on = True
    try:
        getattr(kernels, name + "_stacked")(output, labels, grad, (records[0, 1:2], records[1, 1:2]))
    finally:
        counting.on = False
    assert LOG == [f"launch xpmlp_{name} grid=({models},)"]
    reference = getattr(PlainOps(xpmlp.get_backend("numpy")), name)
    for m in range(models):
        loss, acc, want_grad = reference(output[m], labels if shared_labels else labels[m], None)
        np.testing.assert_array_equal(records[:, 1, m], [loss, acc])
        np.testing.assert_array_equal(grad[m], want_grad)
    assert not records[:, [0, 2]].any()
    with pytest.raises(ValueError, match="do not match"):  # a slot row of the wrong width
        getattr(kernels, name + "_stacked")(output, labels, grad, (records[0, 1:2, :2], records[1, 1:2, :2]))


def test_the_all_active_mask_is_filled_once():
    """A scratch constant is made once: the SGD step does not refill it (one launch a step on
    a GPU)."""
    scratch = Scratch(CountingNumpy(), np.float32)
    first = scratch.constant("mask", (3, 1), True, dtype=bool)
    LOG.clear()
    counting.on = True
    try:
        again = scratch.constant("mask", (3, 1), True, dtype=bool)
    finally:
        counting.on = False
    assert again is first and LOG == [] and first.all()


# ---------------------------------------------------------------- the buffers by layer (CUDA)

def test_on_cuda_each_stacked_weight_is_one_contiguous_block_and_on_the_cpu_a_model_is_one_row():
    """CuPy's matmul copies a non-contiguous stacked operand on every call: on CUDA the
    buffers are laid out by parameter.  The CPU's compiled step runs each model on its own
    contiguous row, so there the buffers stay (K, P)."""
    _, model, optimizer = stacked_model("mlp2-relu-sce", 3, "cuda-fused")
    for layer, name in model.parameters():
        for array in (getattr(layer, name), getattr(layer, "grad_" + name)):
            assert array.flags.c_contiguous and array.shape[0] == 3, (layer, name)
    assert [v.flags.c_contiguous for v in optimizer.state()] == [True] * 6
    cpu = xpmlp.build_model("mlp2-relu-sce", backend="numpy", seed=[0, 1, 2], stack=(3,), ops="buffered")
    assert cpu.flat.params.shape == (3, sum(cpu.flat.sizes)) and not cpu.layers[0].W.flags.c_contiguous


@pytest.mark.parametrize("model_name", ["mlp2-relu-sce", "mlp1-sigmoid-mse"])
def test_the_buffers_by_layer_train_the_same_bits_as_a_row_a_model(model_name):
    """The layout changes where the numbers live, not what they are: the same losses, weights
    and velocities (as the checkpoints see them) after steps with a frozen model."""
    _, by_layer, (model, optimizer) = step_log(model_name, 3, "cuda-fused", steps=3, freeze=1)
    _, by_row, (want_model, want_optimizer) = step_log(model_name, 3, "cuda-fused-model-major", steps=3, freeze=1)
    np.testing.assert_array_equal(by_layer, by_row)
    for got, want in [(model.state_arrays(), want_model.state_arrays()), (optimizer.state(), want_optimizer.state())]:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(_plain(g), _plain(w))
    # a checkpoint of one layout loads into the other
    _, fresh, fresh_optimizer = stacked_model(model_name, 3, "cuda-fused")
    fresh.load_state_arrays(want_model.state_arrays())
    fresh_optimizer.load_state(want_optimizer.state())
    for g, w in zip(fresh.state_arrays() + fresh_optimizer.state(), want_model.state_arrays() + want_optimizer.state()):
        np.testing.assert_array_equal(_plain(g), _plain(w))
