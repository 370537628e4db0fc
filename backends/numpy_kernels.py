"""Fused CPU kernels for the NumPy backend, compiled with Numba when it is installed.

Each replaces several whole-array NumPy passes with one loop, which matters for the
memory-bound parts of a step (the optimizer touches every parameter three times).
Without Numba the NumPy backend has no kernels and models use the buffered ops.
There is no sigmoid forward kernel: Numba calls a scalar exp per element, 20x slower
than NumPy's vectorised exp (measured 211 us against 10 us for a 100 x 256 batch).
(The compiled step has a vectorised Sigmoid of its own, numpy_step.sigmoid_vectorised;
the ops keep NumPy's exp, the array path it is tested against.)
Constants come in as arguments of the arrays' dtype, so float32 stays float32.
"""
import numpy as np

try:
    import numba
except ImportError:  # optional: pip install 'xpmlp[fast]'
    numba = None


# Module-level functions, so that Numba caches them on disk, also when the compiled step
# (numpy_step.py) calls them.  Without Numba they stay plain Python and are never called.
jit = numba.njit(cache=True, nogil=True) if numba is not None else (lambda fn: fn)
# For loops LLVM should vectorise: no Python division check per element (IEEE division
# gives the same numbers), the loop over a slice so that nothing is indexed from the end.
vector_jit = numba.njit(cache=True, nogil=True, error_model="numpy") if numba is not None else (lambda fn: fn)


@jit
def sgd_step(p, g, v, lr, momentum, weight_decay):
    # v <- m*v + (g + wd*p); p <- p - lr*v, in the parameters' dtype, one pass.
    # Serial on purpose: a threaded kernel's spinning workers fight OpenBLAS's for
    # the same cores (measured: 30x slower steps with both pools on 2 cores).
    for i in range(p.size):
        vi = momentum * v[i] + (g[i] + weight_decay * p[i])
        v[i] = vi
        p[i] = p[i] - lr * vi


@jit
def sgd_step_stacked(p, g, v, lr, momentum, weight_decay, active):
    # The same update for K stacked models, rows (K, P), each with its own lr, m, wd;
    # a frozen model's row (active[k] False) is left as it is.
    for k in range(p.shape[0]):
        if not active[k]:
            continue
        lr_k, m_k, wd_k = lr[k], momentum[k], weight_decay[k]
        for i in range(p.shape[1]):
            vi = m_k * v[k, i] + (g[k, i] + wd_k * p[k, i])
            v[k, i] = vi
            p[k, i] = p[k, i] - lr_k * vi


@jit
def row_argmax(row):
    # np.argmax: the first maximum, or the first NaN if there is one.
    arg_max = 0
    for c in range(1, row.size):
        if row[c] > row[arg_max]:
            arg_max = c
    for c in range(row.size):
        if np.isnan(row[c]):
            return c
    return arg_max


@jit
def softmax_xent_row(logits, labels, grad_out, r, n):
    # Row r of softmax_xent: writes its gradient row (softmax - onehot)/n and returns its
    # loss term -log softmax(x)_label (float64; 0 without a target) and whether its
    # arg-max is the label.  A label outside [0, k) gives the row no target (one_hot's row
    # of zeros) and is never used as an index: Numba does not check bounds.
    k = logits.shape[1]
    label = labels[r]
    has_target = 0 <= label < k
    hit = row_argmax(logits[r]) == label
    row_max = logits[r, 0]
    for c in range(1, k):
        row_max = max(row_max, logits[r, c])
    sum_exp = 0.0
    for c in range(k):
        e = np.exp(logits[r, c] - row_max)
        grad_out[r, c] = e
        sum_exp += e
    term = np.log(sum_exp) - (logits[r, label] - row_max) if has_target else 0.0
    for c in range(k):
        grad_out[r, c] = grad_out[r, c] / sum_exp / n
    if has_target:
        grad_out[r, label] -= 1.0 / n
    return term, hit


@jit
def softmax_xent(logits, labels, grad_out):
    # Mean -log softmax(x)_label over rows, its gradient (softmax - onehot)/N, and the
    # fraction of rows whose arg-max is the label: all from one read of the logits.
    n = logits.shape[0]
    total = 0.0
    hits = 0
    for r in range(n):
        term, hit = softmax_xent_row(logits, labels, grad_out, r, n)
        total += term
        hits += hit
    return total / n, hits / n


@jit
def euclidean_row(output, labels, grad_out, one, n_t, r):
    # Row r of euclidean: writes its gradient row (x - t)/N and returns its ||x - t||^2
    # (float64) and whether its arg-max is the label.
    total = 0.0
    for c in range(output.shape[1]):
        diff = output[r, c] - one if c == labels[r] else output[r, c]
        total += diff * diff
        grad_out[r, c] = diff / n_t
    return total, row_argmax(output[r]) == labels[r]


@jit
def euclidean(output, labels, grad_out, one, n_t):
    # Mean 1/2 ||x - t||^2 over rows, its gradient (x - t)/N, and the accuracy.  A label
    # outside [0, k) matches no column: no target, as with one_hot.
    n = output.shape[0]
    total = 0.0
    hits = 0
    for r in range(n):
        term, hit = euclidean_row(output, labels, grad_out, one, n_t, r)
        total += term
        hits += hit
    return total / (2 * n), hits / n


@jit
def bias_add(y, b):
    # y += b on every row (Eq. 4's + b), in place.
    n, k = y.shape
    for r in range(n):
        for c in range(k):
            y[r, c] += b[c]


@vector_jit
def column_sums(g, out, lo, hi):
    # out[c] = sum of g[:, c] for c in [lo, hi), rows added in order as NumPy does (Eq. 5's
    # bias gradient; the compiled step sums a part of the columns on each thread).  Each
    # column's sum in row order, the columns side by side: vectorised, ~8x a scalar loop.
    acc = out[lo:hi]
    acc[:] = 0
    for r in range(g.shape[0]):
        row = g[r, lo:hi]
        for c in range(row.shape[0]):
            acc[c] += row[c]


@jit
def bias_grad(grad_y, grad_b):
    # dL/db = sum over rows of dL/dy (Eq. 5).
    column_sums(grad_y, grad_b, 0, grad_y.shape[1])


@jit
def relu_forward(x, y):
    # y = max(x, 0) (Eq. 6); a NaN stays NaN, as with np.maximum.
    x, y = x.reshape(-1), y.reshape(-1)
    for i in range(x.size):
        y[i] = 0 if x[i] <= 0 else x[i]


@jit
def relu_backward(y, grad_y, grad_x):
    # dL/dx = dL/dy where y > 0, else 0 (Eq. 7): one pass, no boolean mask array.
    y, grad_y, grad_x = y.reshape(-1), grad_y.reshape(-1), grad_x.reshape(-1)
    for i in range(y.size):
        grad_x[i] = grad_y[i] if y[i] > 0 else 0


@jit
def sigmoid_backward(y, grad_y, grad_x, one):
    # Eq. (9): dL/dx = dL/dy * y * (1 - y).
    y, grad_y, grad_x = y.reshape(-1), grad_y.reshape(-1), grad_x.reshape(-1)
    for i in range(y.size):
        grad_x[i] = grad_y[i] * y[i] * (one - y[i])


class NumbaKernels:
    """The fused kernels, as plain callables (scalars in the arrays' dtype).  The elementwise
    ones write into their output argument: ``bias_add(y, b)`` into y, ``bias_grad(grad_y,
    grad_b)``, ``relu_forward(x, y)``, ``relu_backward(y, grad_y, grad_x)`` and
    ``sigmoid_backward(y, grad_y, grad_x)`` into their last.  Those that walk flat memory
    (ReLU, sigmoid) take C-contiguous arrays: xpmlp's ops check, and run array code otherwise."""

    def __init__(self):
        self._sgd, self._sgd_stacked, self._xent, self._euclidean = sgd_step, sgd_step_stacked, softmax_xent, euclidean
        self.bias_add, self.bias_grad, self.relu_forward, self.relu_backward = bias_add, bias_grad, relu_forward, relu_backward
        self._sigmoid_backward = sigmoid_backward

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        self._sgd(p, g, v, t(lr), t(momentum), t(weight_decay))

    def sgd_step_stacked(self, p, g, v, lr, momentum, weight_decay, active):
        """sgd_step for (K, P) buffers of K stacked models; lr, momentum, weight_decay: (K,)
        arrays of the buffers' dtype; rows whose ``active`` is False are not touched."""
        self._sgd_stacked(p, g, v, lr, momentum, weight_decay, active)

    @staticmethod
    def _metrics(loss, acc, dtype, out):
        """``out``: two arrays to write the loss and the accuracy into (their first element),
        e.g. this step's slots in the per-iteration records; else new 0-d arrays."""
        if out is None:
            return np.asarray(loss, dtype=dtype), np.asarray(acc, dtype=dtype)
        out[0][0], out[1][0] = loss, acc
        return out

    def softmax_xent(self, logits, labels, grad_out, out=None):
        """(loss, accuracy) of 2-D logits in one pass; writes dL/dlogits into grad_out."""
        loss, acc = self._xent(logits, labels, grad_out)
        return self._metrics(loss, acc, logits.dtype, out)

    def euclidean(self, output, labels, grad_out, out=None):
        """(loss, accuracy) of a 2-D output in one pass; writes dL/doutput into grad_out."""
        t = output.dtype.type
        loss, acc = self._euclidean(output, labels, grad_out, t(1), t(output.shape[0]))
        return self._metrics(loss, acc, output.dtype, out)

    def sigmoid_backward(self, y, grad_y, grad_x):
        self._sigmoid_backward(y, grad_y, grad_x, y.dtype.type(1))  # a float32 one keeps float32


def load():
    return NumbaKernels() if numba is not None else None
