"""The fused kernels (Numba on NumPy, CUDA on CuPy) against the array code they replace,
and the fused ops that call them.

Each test body runs once per backend with kernels; one that cannot run here is skipped
with its reason (CuPy needs a GPU).  The models' use of the kernels is covered by the
cross-backend tests, which run every backend's plain, buffered and fused ops.
"""
import shutil
import subprocess

import numpy as np
import pytest
from helpers import backend_or_reason, sgd_by_layer_reference

import xpmlp
from xpmlp.core.layers import Sigmoid
from xpmlp.core.losses import EuclideanLoss, SoftmaxCrossEntropyLoss
from xpmlp.core.ops import BufferedOps, CudaOps, NumbaOps, PlainOps, Scratch, ops_for


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
    # The same operations in the same order, each rounded: the same bits.  On CUDA this holds
    # because the kernel is compiled without FMA contraction (cupy_kernels.ELEMENTWISE_OPTIONS);
    # there are no subnormals here for CuPy's -ftz to flush.
    np.testing.assert_array_equal(backend.to_numpy(v_dev), want_v)
    np.testing.assert_array_equal(backend.to_numpy(p_dev), want_p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_step_by_layer_gives_each_model_its_own_step(backend, dtype):
    """K = 3 models' buffers laid out parameter by parameter (sizes 7 and 5 a model), each
    value updated with its own model's hyperparameters, model 1 frozen: the same bits as the
    formula (one launch on CUDA, without FMA contraction)."""
    if not hasattr(backend.kernels, "sgd_step_by_layer"):
        pytest.skip(f"{backend.name}: the CPU keeps stacked buffers a row a model (no such kernel)")
    rng = np.random.default_rng(8)
    sizes = np.array([7, 5])
    starts = np.array([0, 21, 36])  # 3 models' 7 values, then their 5: 36 in all
    p, g, v = (rng.normal(size=36).astype(dtype) for _ in range(3))
    lr, m, wd = (np.array(h, dtype=dtype) for h in ([0.1, 0.2, 0.3], [0.9, 0.5, 0.0], [5e-4, 0.0, 1e-3]))
    active = np.array([True, False, True])
    want_p, want_v = p.copy(), v.copy()
    sgd_by_layer_reference(want_p, g, want_v, lr, m, wd, active, starts, sizes)
    p_dev, v_dev = backend.asarray(p), backend.asarray(v)
    backend.kernels.sgd_step_by_layer(p_dev, backend.asarray(g), v_dev, *(backend.asarray(a) for a in
                                                                            (lr, m, wd, active, starts, sizes)))
    np.testing.assert_array_equal(backend.to_numpy(p_dev), want_p)
    np.testing.assert_array_equal(backend.to_numpy(v_dev), want_v)
    assert not np.array_equal(want_p, p) and np.array_equal(want_p[7:14], p[7:14]), "model 1 frozen, others moved"


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
    plain = loss_class(xpmlp.get_backend("numpy"), dtype, ops="plain")
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


@LOSSES
def test_fused_loss_gives_a_label_out_of_range_no_target_and_writes_nothing_outside(backend, kernel,
                                                                                    loss_class, scale):
    """A label outside [0, classes) must not be used as an index (the kernels do not check
    bounds): its row gets no target, a row of zeros as the array code's one_hot gives it."""
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(5, 10)) * scale).astype(np.float32)
    labels = np.array([3, -1, 10, 1 << 40, 10])  # the last row's label points past the buffer
    plain = loss_class(xpmlp.get_backend("numpy"), np.float32, ops="plain")
    want_loss, want_grad = plain.forward(logits, labels), plain.backward()
    buffer = backend.asarray(np.full((7, 10), 7.0, dtype=np.float32))  # rows 5 and 6: sentinels
    grad = buffer[:5]
    loss, acc = getattr(backend.kernels, kernel)(backend.asarray(logits), backend.asarray(labels), grad)
    np.testing.assert_allclose(backend.to_numpy(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(grad), want_grad, rtol=1e-6, atol=1e-7)
    assert backend.to_numpy(acc) == xpmlp.accuracy(np, logits, labels)
    np.testing.assert_array_equal(backend.to_numpy(buffer[5:]), 7.0)


@LOSSES
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared_labels", [True, False], ids=["shared-labels", "own-labels"])
def test_stacked_fused_loss_gives_each_model_its_own_bits(backend, kernel, loss_class, scale, dtype, shared_labels):
    """K stacked models' loss (one launch on CUDA, a block a model) writes each model's loss
    and accuracy into its slot of a step's record row, and its gradient, exactly as that
    model's own one-model launch does."""
    models, rows = 3, 300  # more rows than CUDA threads in a block
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(models, rows, 10)) * scale).astype(dtype)
    labels = rng.integers(0, 10, rows if shared_labels else (models, rows))
    fused = ops_for(backend, "fused")
    records = backend.xp.zeros((2, 4, models), dtype=dtype)  # losses, accuracies: 4 steps of K models
    out = (records[0, 2:3], records[1, 2:3])  # step 2's row
    loss, acc, grad = getattr(fused, kernel)(backend.asarray(logits), backend.asarray(labels),
                                             Scratch(backend.xp, dtype), out)
    assert loss is out[0] and acc is out[1]
    got_records, got_grad = backend.to_numpy(records), backend.to_numpy(grad)
    assert not got_records[:, [0, 1, 3]].any(), "written outside step 2's row"
    for k in range(models):
        alone = getattr(fused, kernel)(backend.asarray(logits[k]), backend.asarray(labels if shared_labels
                                                                                   else labels[k]),
                                       Scratch(backend.xp, dtype))
        want_loss, want_acc, want_grad = (backend.to_numpy(a) for a in alone)
        np.testing.assert_array_equal(got_records[:, 2, k], [want_loss, want_acc])
        np.testing.assert_array_equal(got_grad[k], want_grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_passes_the_gradient_where_the_output_is_positive(backend, dtype):
    rng = np.random.default_rng(2)
    y = np.maximum(rng.normal(size=(50, 33)), 0).astype(dtype)
    y[0, :5] = 0.0
    grad_y = rng.normal(size=y.shape).astype(dtype)
    want = np.where(y > 0, grad_y, 0)
    y_dev, grad_y_dev = backend.asarray(y), backend.asarray(grad_y)
    grad_x = backend.asarray(np.full_like(y, np.nan))
    backend.kernels.relu_backward(y_dev, grad_y_dev, grad_x)
    np.testing.assert_array_equal(backend.to_numpy(grad_x), want)
    # a strided input: the fused ops give the same answer (by the parent's code on NumPy)
    strided = backend.asarray(np.repeat(y, 2, axis=1))[:, ::2]
    got = ops_for(backend, "fused").relu_backward(strided, grad_y_dev, Scratch(backend.xp, dtype))
    np.testing.assert_array_equal(backend.to_numpy(got), want)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5), (np.float64, 1e-14)])
def test_fast_sigmoid_layer_matches_the_plain_one(backend, dtype, rtol):
    """Forward by the backend's kernel where it has one (CuPy), else by the layer's
    select-free array code (NumPy); backward by the kernel on both.  ``atol`` is the dtype's
    smallest normal number: CuPy compiles with -ftz=true, so where the CPU gives a subnormal
    (the sigmoid of -100 is 3.8e-44 in float32) the GPU gives 0."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(40, 30)) * 5).astype(dtype)
    x[0, :4] = [-1000, -100, 100, 1000]  # e^-x would overflow here; e^-|x| does not
    plain = Sigmoid(xpmlp.get_backend("numpy"), dtype, ops="plain")
    want_y = plain.forward(x)
    grad_y = rng.normal(size=x.shape).astype(dtype)
    fast = Sigmoid(backend, dtype, ops="fused")
    atol = np.finfo(dtype).smallest_normal
    with np.errstate(over="raise", invalid="raise"):  # underflow to 0 is the right answer
        y = fast.forward(backend.asarray(x))
    np.testing.assert_allclose(backend.to_numpy(y), want_y, rtol=rtol, atol=atol)
    # The backward from the backend's own y: CUDA's exp may differ from the CPU's by 1-3 ulp
    # (x ~ 4.9 in float32), which 1 - y, where y is near 1, magnifies beyond rtol.
    own_y = backend.to_numpy(y).copy()
    want_grad_x = plain.ops.sigmoid_backward(own_y, grad_y, None)
    grad_x = backend.xp.empty(x.shape, dtype=dtype)
    backend.kernels.sigmoid_backward(y, backend.asarray(grad_y), grad_x)
    np.testing.assert_allclose(backend.to_numpy(grad_x), want_grad_x, rtol=rtol, atol=atol)
    # a strided input: the fused ops give the same answer (by the parent's code on NumPy)
    strided = backend.asarray(np.repeat(own_y, 2, axis=1))[:, ::2]
    got = fast.ops.sigmoid_backward(strided, backend.asarray(grad_y), Scratch(backend.xp, dtype))
    np.testing.assert_allclose(backend.to_numpy(got), want_grad_x, rtol=rtol, atol=atol)


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
    numba_kernels.bias_add(y, b)
    np.testing.assert_array_equal(y, want)
    grad_b = np.full(37, np.nan, dtype=dtype)
    numba_kernels.bias_grad(y, grad_b)
    np.testing.assert_array_equal(grad_b, y.sum(axis=0))
    strided = np.repeat(y, 2, axis=1)[:, ::2]  # any layout
    numba_kernels.bias_grad(strided, grad_b)
    np.testing.assert_array_equal(grad_b, y.sum(axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_forward_is_np_maximum_nans_included(numba_kernels, dtype):
    x = np.random.default_rng(5).normal(size=(20, 30)).astype(dtype)
    x[0, :4] = [np.nan, -np.inf, np.inf, 0.0]
    y = np.empty_like(x)
    numba_kernels.relu_forward(x, y)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert np.isnan(y[0, 0])


def test_ops_are_picked_by_name_and_say_what_they_are():
    numpy_backend = xpmlp.get_backend("numpy")
    assert type(ops_for(numpy_backend, "plain")) is PlainOps
    assert type(ops_for(numpy_backend, "buffered")) is BufferedOps
    assert type(ops_for(numpy_backend, None)) is type(ops_for(numpy_backend, "fused")) is NumbaOps
    assert xpmlp.build_model("mlp1-relu-sce", backend=numpy_backend, ops="plain").ops.name == "plain"
    assert CudaOps.name == NumbaOps.name == "fused"
    strict = backend_or_reason("array-api-strict")
    if not isinstance(strict, str):
        assert type(ops_for(strict, None)) is PlainOps
        with pytest.raises(ValueError, match="only the plain ops"):
            ops_for(strict, "buffered")
    with pytest.raises(ValueError, match="unknown ops"):
        ops_for(numpy_backend, "fast")


class _NoKernels:
    def __getattr__(self, name):
        raise AssertionError(f"kernel {name} called where it cannot run")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_ops_use_the_buffered_code_where_a_kernel_cannot_run(numba_kernels, dtype):
    """Non-contiguous input: the fused ops give what the buffered ops give, without calling a
    kernel that would misread the memory.  A stacked leading axis: each model's slice goes
    through the one-model kernel, exactly as that model alone."""
    backend = xpmlp.get_backend("numpy")
    fused, buffered = NumbaOps(backend), BufferedOps(backend)
    fused.kernels = _NoKernels()
    rng = np.random.default_rng(6)
    strided = np.repeat(rng.normal(size=(20, 30)).astype(dtype), 2, axis=1)[:, ::2]
    stacked = rng.normal(size=(2, 20, 10)).astype(dtype)
    labels = rng.integers(0, 10, (2, 20))
    b, grad_b = rng.normal(size=(2, 1, 10)).astype(dtype), np.empty((2, 1, 10), dtype=dtype)
    for name, args in [("relu", (strided,)), ("relu_backward", (strided, strided)),
                       ("sigmoid_backward", (strided, strided))]:
        got = getattr(fused, name)(*args, Scratch(np, dtype))
        want = getattr(buffered, name)(*args, Scratch(np, dtype))
        for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want)), strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)
    fused = NumbaOps(backend)
    for name in ("euclidean", "softmax_xent"):
        got = getattr(fused, name)(stacked, labels, Scratch(np, dtype))
        for k in range(2):
            alone = getattr(fused, name)(stacked[k], labels[k], Scratch(np, dtype))
            for g, w in zip(got, alone, strict=True):
                np.testing.assert_array_equal(g[k], w, err_msg=name)
    np.testing.assert_array_equal(fused.bias_add(stacked.copy(), b), stacked + b)
    np.testing.assert_allclose(fused.bias_grad(stacked, grad_b), stacked.sum(axis=-2, keepdims=True), rtol=1e-6)


def cuda_units():
    """All of the CuPy backend's CUDA code as .cu files for nvcc, each with the NVRTC options
    CuPy gets for it: the loss module with its templates instantiated, and each
    ElementwiseKernel body in a kernel, its parameters declared as CuPy declares them, once
    per dtype, one file per set of options.  Returns {name: (source, options)}: "losses",
    then the name of each elementwise kernel with options of its own, then "elementwise"."""
    from xpmlp.backends.cupy_kernels import (CTYPES, ELEMENTWISE, ELEMENTWISE_OPTIONS, LOSS_KERNELS,
                                             LOSS_OPTIONS, LOSS_PARAMS, LOSS_SOURCE)
    loss = [LOSS_SOURCE] + [f"template __global__ void {name}<{t}>({', '.join(LOSS_PARAMS).format(t=t)});"
                            for name in LOSS_KERNELS for t in CTYPES.values()]
    units, plain = {"losses": ("\n".join(loss), LOSS_OPTIONS)}, []
    for name, (inputs, outputs, body) in ELEMENTWISE.items():
        ins = [p.split() for p in inputs.split(",")]
        outs = [p.split() for p in outputs.split(",")]
        kernels = []
        for t in CTYPES.values():
            # "raw TYPE name": a pointer the body indexes itself; "TYPE name": element i
            ctype = {"T": t, "bool": "bool", "int64": "long long"}
            params = ", ".join([f"const {ctype[p[1]]}* {p[2]}" for p in ins if p[0] == "raw"] +
                               [f"const {ctype[p[0]]}* _in_{p[1]}" for p in ins if p[0] != "raw"] +
                               [f"{t}* _out_{n}" for _, n in outs])
            loads = " ".join([f"const {ctype[p[0]]} {p[1]} = _in_{p[1]}[i];" for p in ins if p[0] != "raw"] +
                             [f"T& {n} = _out_{n}[i];" for _, n in outs])
            kernels.append(f'extern "C" __global__ void {name}_{t}({params}, const long long size) {{\n'
                           f"  typedef {t} T;\n"
                           f"  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"
                           f"  if (i >= size) return;\n  {loads}\n  {body}\n}}")
        if name in ELEMENTWISE_OPTIONS:
            units[name] = ("\n".join(kernels), ELEMENTWISE_OPTIONS[name])
        else:
            plain += kernels
    units["elementwise"] = ("\n".join(plain), ())
    return units


def nvcc_problem(tmp_path):
    """Why nvcc cannot compile any CUDA here (not installed, or no host compiler it accepts),
    or None.  Asked only when a compile failed, so that a missing tool is a skip, not a failure."""
    if shutil.which("nvcc") is None:
        return "nvcc (CUDA toolkit) is not installed"
    source = tmp_path / "empty.cu"
    source.write_text("__global__ void empty_kernel() {}\n")
    result = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", str(source), "-o", str(tmp_path / "empty.cubin")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return f"nvcc cannot compile even an empty kernel here ({lines[-1] if lines else 'no message'})"
    return None


def nvcc(tmp_path, name, source, options, output):
    """Compile ``source`` for sm_90 as CuPy has NVRTC do it (-ftz=true added to the options);
    returns the output file.  Skips the test where nvcc cannot compile anything here."""
    path, target = tmp_path / f"{name}.cu", tmp_path / f"{name}.{output.lstrip('-')}"
    path.write_text(source + "\n")
    command = ["nvcc", "-std=c++14", "-arch=sm_90", "-ftz=true", *options, output, str(path), "-o", str(target)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        result = None
    if result is None or result.returncode != 0:
        problem = nvcc_problem(tmp_path)
        if problem:
            pytest.skip(problem)
    assert result.returncode == 0, result.stderr + source
    return target


def test_cuda_sources_compile_for_hopper(tmp_path):
    """Where no GPU is lent, at least the CUDA C must compile: nvcc checks the code NVRTC
    gets on a GPU machine, for both dtypes, with each kernel's own options."""
    for name, (source, options) in cuda_units().items():
        assert nvcc(tmp_path, name, source, options, "-cubin").stat().st_size > 0, name


def test_sgd_kernel_is_compiled_without_fused_multiply_adds(tmp_path):
    """The SGD step's bits equal NumPy's only if no multiply and add are contracted into an
    FMA; the PTX shows it.  Without the option nvcc does contract them (the check can fail)."""
    for name in ("xpmlp_sgd_step_stacked", "xpmlp_sgd_step_by_layer"):
        source, options = cuda_units()[name]
        assert "fma." not in nvcc(tmp_path, name, source, options, "-ptx").read_text(), name
    source, options = cuda_units()["xpmlp_sgd_step"]
    assert "--fmad=false" in options
    ptx = nvcc(tmp_path, "sgd", source, options, "-ptx").read_text()
    assert "mul.rn.ftz.f32" in ptx and "mul.rn.f64" in ptx
    assert "fma." not in ptx
    contracted = nvcc(tmp_path, "sgd_fmad", source, (), "-ptx").read_text()
    assert "fma.rn.ftz.f32" in contracted and "fma.rn.f64" in contracted


def test_nvcc_without_a_host_compiler_skips_with_the_reason(tmp_path, monkeypatch):
    """nvcc needs a host compiler even for device code; where it has none, the compile tests
    skip and say so instead of failing."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (CUDA toolkit) is not installed")
    lonely = tmp_path / "bin"
    lonely.mkdir()
    (lonely / "nvcc").symlink_to(shutil.which("nvcc"))
    monkeypatch.setenv("PATH", str(lonely))  # nvcc, and no gcc, g++ or cc
    with pytest.raises(pytest.skip.Exception, match="nvcc cannot compile even an empty kernel here"):
        nvcc(tmp_path, "sgd", *cuda_units()["xpmlp_sgd_step"], "-ptx")


def test_cuda_kernels_are_built_with_their_options_and_looked_up_once_per_dtype():
    """Without a GPU, a stand-in ``cupy`` records what CupyKernels asks of it: the SGD kernel
    gets --fmad=false, and each loss function is fetched from the module once per dtype,
    not on every step."""
    import types

    from xpmlp.backends.cupy_kernels import CupyKernels
    built, fetched, modules = {}, [], []

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            modules.append(options)

        def get_function(self, name):
            fetched.append(name)
            return lambda grid, block, args, shared_mem: None

    def elementwise(inputs, outputs, body, name, options=()):
        built[name] = options
        return lambda *args: None

    fake = types.SimpleNamespace(ElementwiseKernel=elementwise, RawModule=FakeModule, int64=np.int64,
                                 ascontiguousarray=lambda a, dtype=None: np.ascontiguousarray(a, dtype=dtype),
                                 empty=np.empty)
    kernels = CupyKernels(fake)
    assert built["xpmlp_sgd_step"] == built["xpmlp_sgd_step_stacked"] == built["xpmlp_sgd_step_by_layer"] == \
        ("--fmad=false",)
    assert all(options == () for name, options in built.items() if not name.startswith("xpmlp_sgd_step"))
    for _ in range(3):
        for dtype in (np.float32, np.float64):
            logits = np.zeros((4, 3), dtype=dtype)
            kernels.softmax_xent(logits, np.zeros(4, dtype=np.int64), np.empty_like(logits))
            kernels.euclidean(logits, np.zeros(4, dtype=np.int64), np.empty_like(logits))
    assert len(modules) == 1
    assert sorted(fetched) == sorted(f"{k}<{t}>" for k in ("xpmlp_softmax_xent", "xpmlp_euclidean")
                                     for t in ("float", "double"))
