"""How each operation of a step is computed: chosen once per model, by ``ops_for``.

One class per way of computing, each a complete set of operations:

- ``PlainOps``: the reference, written only against the Array API standard (it runs on
  array-api-strict).  It allocates its results and never writes into its inputs.
- ``BufferedOps`` (NumPy, CuPy): the same math written into buffers reused from step to
  step through ``out=``; an array it returns is overwritten by the next call of the same
  shape.  Parameters, gradients and velocities are updated in place.
- ``NumbaOps`` and ``CudaOps``: the fused kernels of backends/numpy_kernels.py and
  backends/cupy_kernels.py.  Each class overrides only the operations its kernels fuse, so
  it is the one place that says what that backend fuses; where a kernel cannot run (a
  stacked leading axis, non-contiguous memory) it calls the buffered method instead.

A layer's forward and backward are each one call here.  The caller passes its ``Scratch``,
the buffers it owns (``PlainOps`` never uses them), so that two layers of one shape never
share an output.  Everything works over the last two axes, so leading axes of stacked
models pass through (the fused kernels take the 2-D case only).
"""


class Scratch:
    """Reusable output arrays of one owner (a layer, a loss, the optimizer), keyed by name
    and shape; created on first use."""

    def __init__(self, xp, dtype):
        self.xp, self.dtype = xp, dtype
        self._arrays = {}

    def get(self, name, shape, dtype=None):
        key = (name, tuple(shape))
        buf = self._arrays.get(key)
        if buf is None:
            buf = self._arrays[key] = self.xp.empty(tuple(shape), dtype=dtype or self.dtype)
        return buf

    def constant(self, name, shape, value, dtype=None):
        """An array of ``value`` filled once, on first use (not on every step): read it only."""
        key = (name, tuple(shape))
        buf = self._arrays.get(key)
        if buf is None:
            buf = self._arrays[key] = self.xp.full(tuple(shape), value, dtype=dtype or self.dtype)
        return buf


def matrix_transpose(xp, a):
    # The ndarray method where there is one: NumPy's module function costs ~1 us a call in Python.
    return a.swapaxes(-1, -2) if hasattr(a, "swapaxes") else xp.matrix_transpose(a)


def _astype(xp, a, dtype):
    return xp.astype(a, dtype) if hasattr(xp, "astype") else a.astype(dtype)


def one_hot(xp, labels, num_classes, dtype):
    """t_n: one row per label with a 1 in the label's column."""
    classes = xp.arange(num_classes, dtype=labels.dtype)
    return _astype(xp, xp.expand_dims(labels, axis=-1) == classes, dtype)


def accuracy(xp, output, labels):
    """Fraction of rows whose arg-max equals the label (a device scalar; per stacked model)."""
    return xp.mean(_astype(xp, xp.argmax(output, axis=-1) == labels, output.dtype), axis=-1)


class PlainOps:
    """The reference: the Array API standard alone, fresh arrays, inputs never written."""

    name = "plain"
    in_place = False  # whether parameters can live in flat buffers updated in place

    def __init__(self, backend):
        self.backend, self.xp = backend, backend.xp

    def __repr__(self):
        return f"{type(self).__name__}({self.backend.name})"

    # -- Linear (Eqs. 4, 5)

    def linear(self, x, W, b, scratch):
        """y = xW + b.  A 2-D batch shared by stacked models gives each its output: (K, N, out)."""
        lead = x.shape[:-2] if x.ndim >= W.ndim else W.shape[:-2]
        y = self._matmul(x, W, self._out(scratch, "linear_y", lead + x.shape[-2:-1] + W.shape[-1:]))
        return self.bias_add(y, b)

    def linear_backward(self, x, W, grad_y, grad_W, grad_b, need_input_grad, scratch):
        """(dL/dW = x^T g, dL/db = sum_n g, dL/dx = g W^T or None).  ``grad_W`` and ``grad_b``
        are the current gradient arrays: written into where this class updates in place."""
        xp = self.xp
        grad_W = self._matmul(matrix_transpose(xp, x), grad_y, grad_W)
        grad_b = self.bias_grad(grad_y, grad_b)
        if not need_input_grad:  # the first layer's input is data: skip a third of the GEMM work
            return grad_W, grad_b, None
        grad_x = self._out(scratch, "linear_dx", grad_y.shape[:-1] + W.shape[-2:-1])
        return grad_W, grad_b, self._matmul(grad_y, matrix_transpose(xp, W), grad_x)

    def _out(self, scratch, name, shape):
        """Where a result goes: nowhere given on the plain ops, which allocate."""
        return None

    def _matmul(self, a, b, out):
        return self.xp.matmul(a, b)

    def bias_add(self, y, b):
        return y + b

    def bias_grad(self, grad_y, grad_b):
        """Column sums of grad_y, shaped like the bias (a length-1 row axis when stacked)."""
        return self.xp.reshape(self.xp.sum(grad_y, axis=-2), grad_b.shape)

    # -- activations (Eqs. 6-9)

    def relu(self, x, scratch):
        """max(x, 0)."""
        xp = self.xp
        return xp.maximum(x, xp.asarray(0, dtype=x.dtype))

    def relu_backward(self, y, grad_y, scratch):
        """grad_y where y > 0, else 0."""
        xp = self.xp
        return xp.where(y > 0, grad_y, xp.zeros_like(grad_y))

    def sigmoid(self, x, scratch):
        """1 / (1 + e^-x), from e^-|x| so that no exponent overflows, in either precision."""
        xp = self.xp
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))

    def sigmoid_backward(self, y, grad_y, scratch):
        """grad_y * y (1 - y)."""
        return grad_y * y * (1 - y)

    # -- losses (Eqs. 10-13): (mean loss, accuracy, dL/doutput), one computation each

    def euclidean(self, output, labels, scratch, out=None):
        """L = 1/(2N) sum_n ||x_n - t_n||^2; dL/dx_n = (x_n - t_n)/N."""
        xp, n = self.xp, output.shape[-2]
        diff = output - one_hot(xp, labels, output.shape[-1], output.dtype)
        loss = xp.sum(diff * diff, axis=(-2, -1)) / (2 * n)
        return self._metrics(loss, accuracy(xp, output, labels), out) + (diff / n,)

    def softmax_xent(self, output, labels, scratch, out=None):
        """L = -1/N sum_n log softmax(x_n)_c; dL/dx_n = (softmax(x_n) - t_n)/N.  Log-sum-exp
        with the row maximum subtracted, so no exponent overflows."""
        xp, n = self.xp, output.shape[-2]
        shifted = output - xp.max(output, axis=-1, keepdims=True)
        exp_shifted = xp.exp(shifted)
        sum_exp = xp.sum(exp_shifted, axis=-1, keepdims=True)
        targets = one_hot(xp, labels, output.shape[-1], output.dtype)
        loss = -xp.sum(targets * (shifted - xp.log(sum_exp)), axis=(-2, -1)) / n
        grad = (exp_shifted / sum_exp - targets) / n
        return self._metrics(loss, accuracy(xp, output, labels), out) + (grad,)

    @staticmethod
    def _metrics(loss, acc, out):
        """``out``: two length-1 arrays (e.g. this step's slots in the epoch's records) that
        receive the loss and the accuracy and are returned in their place."""
        if out is None:
            return loss, acc
        out[0][...], out[1][...] = loss, acc
        return tuple(out)

    # -- the optimizer and the batch

    def sgd_update(self, p, g, v, lr, momentum, weight_decay, scratch, active=None):
        """(p, v) after v <- m*v + (g + wd*p); p <- p - lr*v.  Stacked models (a leading
        axis of K): lr, momentum, weight_decay are (K, 1, ...) columns, and ``active``, a
        boolean column or None (all), keeps the frozen models' p and v as they were."""
        v_new = momentum * v + (g + weight_decay * p)
        p_new = p - lr * v_new
        if active is None:
            return p_new, v_new
        return self.xp.where(active, p_new, p), self.xp.where(active, v_new, v)

    def flush_denormals(self, a):
        """``a`` with the values below the dtype's smallest normal number set to zero."""
        xp = self.xp
        return xp.where(xp.abs(a) < xp.finfo(a.dtype).smallest_normal, xp.zeros_like(a), a)

    def take_rows(self, a, indices, scratch, name):
        """Rows ``indices`` of ``a`` (the batch gather); (K, B) indices give K batches."""
        if indices.ndim == 1:
            return self.backend.take_rows(a, indices)
        # The Array API's take wants 1-D indices: one stacked model at a time.
        return self.xp.stack([self.backend.take_rows(a, indices[k, ...]) for k in range(indices.shape[0])])


class BufferedOps(PlainOps):
    """The same math into reused buffers (``out=``), parameters updated in place."""

    name = "buffered"
    in_place = True

    def _out(self, scratch, name, shape):
        return scratch.get(name, shape)

    def _matmul(self, a, b, out):
        return self.xp.matmul(a, b, out=out)

    def bias_add(self, y, b):
        return self.xp.add(y, b, out=y)

    def bias_grad(self, grad_y, grad_b):
        return grad_y.sum(axis=-2, keepdims=grad_b.ndim > 1, out=grad_b)

    def relu(self, x, scratch):
        return self.xp.maximum(x, 0, out=scratch.get("relu_y", x.shape))

    def relu_backward(self, y, grad_y, scratch):
        xp = self.xp
        mask = xp.greater(y, 0, out=scratch.get("relu_mask", y.shape, dtype=bool))
        return xp.multiply(grad_y, mask, out=scratch.get("relu_dx", y.shape))

    def sigmoid(self, x, scratch):
        # The same numbers without a select (a masked copy is ~20x slower than a ufunc):
        # the numerator e^min(x, 0) is e^-|x| where x < 0 and 1 elsewhere.
        xp = self.xp
        y, denom = scratch.get("sigmoid_y", x.shape), scratch.get("sigmoid_denom", x.shape)
        xp.exp(xp.negative(xp.abs(x, out=denom), out=denom), out=denom)
        xp.add(denom, 1, out=denom)
        xp.exp(xp.minimum(x, 0, out=y), out=y)
        return xp.divide(y, denom, out=y)

    def sigmoid_backward(self, y, grad_y, scratch):
        xp = self.xp
        dx = scratch.get("sigmoid_dx", y.shape)
        xp.subtract(1, y, out=dx)
        xp.multiply(dx, y, out=dx)
        return xp.multiply(dx, grad_y, out=dx)

    def _one_hot(self, labels, output, scratch):
        xp = self.xp
        classes = scratch.get("classes", output.shape[-1:], dtype=labels.dtype)
        classes[...] = xp.arange(output.shape[-1], dtype=labels.dtype)
        return xp.equal(xp.expand_dims(labels, -1), classes, out=scratch.get("onehot", output.shape))

    def euclidean(self, output, labels, scratch, out=None):
        xp, n = self.xp, output.shape[-2]
        diff = xp.subtract(output, self._one_hot(labels, output, scratch), out=scratch.get("onehot", output.shape))
        loss = xp.sum(diff * diff, axis=(-2, -1)) / (2 * n)
        grad = xp.divide(diff, n, out=scratch.get("dx", output.shape))
        return self._metrics(loss, accuracy(xp, output, labels), out) + (grad,)

    def softmax_xent(self, output, labels, scratch, out=None):
        xp, n = self.xp, output.shape[-2]
        shifted = output - xp.max(output, axis=-1, keepdims=True)
        exp_shifted = xp.exp(shifted)
        sum_exp = xp.sum(exp_shifted, axis=-1, keepdims=True)
        targets = self._one_hot(labels, output, scratch)
        loss = -xp.sum(targets * (shifted - xp.log(sum_exp)), axis=(-2, -1)) / n
        grad = xp.subtract(exp_shifted / sum_exp, targets, out=scratch.get("dx", output.shape))
        return self._metrics(loss, accuracy(xp, output, labels), out) + (xp.divide(grad, n, out=grad),)

    def sgd_update(self, p, g, v, lr, momentum, weight_decay, scratch, active=None):
        if active is not None:  # some stacked models frozen: their rows put back after the update
            before = (scratch.get("sgd_p", p.shape), scratch.get("sgd_v", v.shape))
            before[0][...], before[1][...] = p, v
            self.sgd_update(p, g, v, lr, momentum, weight_decay, scratch)
            p[...], v[...] = self.xp.where(active, p, before[0]), self.xp.where(active, v, before[1])
            return p, v
        xp, tmp = self.xp, scratch.get("sgd_tmp", p.shape)
        xp.multiply(p, weight_decay, out=tmp)
        xp.add(g, tmp, out=tmp)
        xp.multiply(v, momentum, out=v)
        xp.add(v, tmp, out=v)
        xp.multiply(v, lr, out=tmp)
        xp.subtract(p, tmp, out=p)
        return p, v

    def flush_denormals(self, a):
        xp = self.xp
        a[xp.abs(a) < xp.finfo(a.dtype).smallest_normal] = 0
        return a

    def take_rows(self, a, indices, scratch, name):
        out = scratch.get(name, indices.shape + a.shape[1:], dtype=a.dtype)
        return self.backend.take_rows(a, indices, out=out)


class FusedOps(BufferedOps):
    """What both backends' kernels fuse: each loss with its gradient and the accuracy, in one
    read of a 2-D output, and the SGD step in one pass over the flat buffers.  ``kernels``:
    the backend's kernel object."""

    name = "fused"

    def __init__(self, backend):
        super().__init__(backend)
        self.kernels = backend.kernels

    def euclidean(self, output, labels, scratch, out=None):
        if output.ndim not in (2, 3):
            return super().euclidean(output, labels, scratch, out)
        return self._fused_loss("euclidean", output, labels, scratch, out)

    def softmax_xent(self, output, labels, scratch, out=None):
        if output.ndim not in (2, 3):
            return super().softmax_xent(output, labels, scratch, out)
        return self._fused_loss("softmax_xent", output, labels, scratch, out)

    def _fused_loss(self, name, output, labels, scratch, out):
        grad = scratch.get("dx", output.shape)
        if output.ndim == 2:
            return tuple(getattr(self.kernels, name)(output, labels, grad, out)) + (grad,)
        if out is None:
            out = tuple(self.xp.empty(output.shape[:1], dtype=output.dtype) for _ in range(2))
        return tuple(self._stacked_loss(name, output, labels, grad, out)) + (grad,)

    def _stacked_loss(self, name, output, labels, grad, out):
        """Stacked models (K, N, C): the one-model kernel on each model's slice, so each
        computes exactly what it computes alone.  Labels (N,) are shared by all."""
        kernel = getattr(self.kernels, name)
        for k in range(output.shape[0]):
            kernel(output[k], labels if labels.ndim == 1 else labels[k], grad[k],
                   (out[0][..., k:k + 1], out[1][..., k:k + 1]))
        return out

    def sgd_update(self, p, g, v, lr, momentum, weight_decay, scratch, active=None):
        if p.ndim == 1:
            self.kernels.sgd_step(p, g, v, lr, momentum, weight_decay)  # flat buffers: contiguous
        else:  # K stacked models' flat rows (K, P), (K, 1) hyperparameters; frozen rows skipped
            if active is None:
                active = scratch.constant("sgd_all_active", (p.shape[0], 1), True, dtype=bool)
            self.kernels.sgd_step_stacked(p, g, v, *(h.reshape(-1) for h in (lr, momentum, weight_decay, active)))
        return p, v


def _contiguous(*arrays):
    return all(a.flags.c_contiguous for a in arrays)


def _into(kernel, *args):
    """Run an elementwise kernel that writes into its last argument; return that argument."""
    kernel(*args)
    return args[-1]


class NumbaOps(FusedOps):
    """NumPy with Numba's CPU kernels: the losses and the SGD step (``FusedOps``), the bias
    add and gradient, the ReLU and the sigmoid's backward.  No sigmoid forward: Numba's
    scalar exp is 20x slower than NumPy's.  The small passes cost a NumPy ufunc a few
    microseconds of set-up each (broadcast, scalar, axis reduction); one loop saves 8% of
    an epoch (measured, mlp2-relu-sce)."""

    def bias_add(self, y, b):
        if y.ndim == 3:  # stacked: each model's slice as one model does it
            for k in range(y.shape[0]):
                self.kernels.bias_add(y[k], b[k, 0])
            return y
        if y.ndim != 2:
            return super().bias_add(y, b)
        self.kernels.bias_add(y, b)
        return y

    def bias_grad(self, grad_y, grad_b):
        if grad_y.ndim == 3:
            for k in range(grad_y.shape[0]):
                self.kernels.bias_grad(grad_y[k], grad_b[k, 0])
            return grad_b
        if grad_y.ndim != 2:
            return super().bias_grad(grad_y, grad_b)
        self.kernels.bias_grad(grad_y, grad_b)
        return grad_b

    # The elementwise kernels walk flat memory: contiguous arrays only.

    def relu(self, x, scratch):
        if not _contiguous(x):
            return super().relu(x, scratch)
        return _into(self.kernels.relu_forward, x, scratch.get("relu_y", x.shape))

    def relu_backward(self, y, grad_y, scratch):
        if not _contiguous(y, grad_y):
            return super().relu_backward(y, grad_y, scratch)
        return _into(self.kernels.relu_backward, y, grad_y, scratch.get("relu_dx", y.shape))

    def sigmoid_backward(self, y, grad_y, scratch):
        if not _contiguous(y, grad_y):
            return super().sigmoid_backward(y, grad_y, scratch)
        return _into(self.kernels.sigmoid_backward, y, grad_y, scratch.get("sigmoid_dx", y.shape))


class CudaOps(FusedOps):
    """CuPy with its CUDA kernels: the losses (one launch each, K stacked models too) and the SGD step
    (``FusedOps``), the ReLU backward and the sigmoid forward and backward (elementwise
    kernels: any shape and layout).  On a GPU a step costs launches, not arithmetic: each
    kernel replaces several.  The loss kernel copies a non-contiguous output itself."""

    # Stacked models' flat buffers parameter by parameter (model.FlatBuffers): each stacked W
    # one contiguous (K, in, out) block, which CuPy's matmul would otherwise copy every call.
    # The optimizer then calls sgd_update_by_layer.
    stack_by_layer = True

    def sgd_update_by_layer(self, flat, p, g, v, lr, momentum, weight_decay, scratch, active=None):
        """The SGD step of K models' 1-D buffers laid out by ``flat`` (a FlatBuffers), in one
        launch; (K,) hyperparameters and ``active`` (None: all)."""
        if active is None:
            active = scratch.constant("sgd_all_active", lr.shape, True, dtype=bool)
        self.kernels.sgd_step_by_layer(p, g, v, lr, momentum, weight_decay, active, *flat.blocks)
        return p, v

    def _stacked_loss(self, name, output, labels, grad, out):
        # One launch for all K models (a block a model), not one per model: on a GPU each
        # launch and its Python costs more than the loss itself.
        return getattr(self.kernels, name + "_stacked")(output, labels, grad, out)

    def relu_backward(self, y, grad_y, scratch):
        return _into(self.kernels.relu_backward, y, grad_y, scratch.get("relu_dx", y.shape))

    def sigmoid(self, x, scratch):
        return _into(self.kernels.sigmoid_forward, x, scratch.get("sigmoid_y", x.shape))

    def sigmoid_backward(self, y, grad_y, scratch):
        return _into(self.kernels.sigmoid_backward, y, grad_y, scratch.get("sigmoid_dx", y.shape))


# What fuses on which backend: the backend's name -> the class of its fused ops.
FUSED = {"numpy": NumbaOps, "cupy": CudaOps}
KINDS = ("plain", "buffered", "fused")


def ops_for(backend, kind=None):
    """The ops of ``kind`` ('plain', 'buffered' or 'fused') on ``backend``; None gives the
    fastest the backend has.  An ops object given as ``kind`` is returned as it is."""
    if isinstance(kind, PlainOps):
        return kind
    has_kernels = backend.name in FUSED and backend.kernels is not None
    if kind is None:
        kind = "fused" if has_kernels else "buffered" if backend.has_out_buffers else "plain"
    if kind not in KINDS:
        raise ValueError(f"unknown ops {kind!r}; choose one of: {', '.join(KINDS)}")
    if kind != "plain" and not backend.has_out_buffers:
        raise ValueError(f"{backend.name} has only the plain ops (no out= buffers)")
    if kind == "fused" and not has_kernels:
        raise ValueError(f"{backend.name} has no fused kernels here (NumPy's need Numba: pip install 'xpmlp[fast]')")
    return {"plain": PlainOps, "buffered": BufferedOps}.get(kind, FUSED.get(backend.name))(backend)
