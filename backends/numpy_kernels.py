"""Fused CPU kernels for the NumPy backend, compiled with Numba when it is installed.

Each replaces several whole-array NumPy passes with one loop, which matters for the
memory-bound parts of a step (the optimizer touches every parameter three times).
Without Numba the NumPy backend has no kernels and the layers use their NumPy path.
"""
import numpy as np

try:
    import numba
except ImportError:  # optional: pip install 'xpmlp[fast]'
    numba = None


def _build():
    jit = numba.njit(cache=True, nogil=True)

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
    def softmax_xent(logits, labels, grad_out):
        # Mean -log softmax(x)_label over rows, its gradient (softmax - onehot)/N, and the
        # number of rows whose arg-max is the label: all from one read of the logits.
        n, k = logits.shape
        total = 0.0
        hits = 0
        for r in range(n):
            row_max = logits[r, 0]
            arg_max = 0
            for c in range(1, k):
                v = logits[r, c]
                if v > row_max:
                    row_max, arg_max = v, c
            for c in range(k):  # np.argmax semantics: the first NaN wins
                if np.isnan(logits[r, c]):
                    arg_max = c
                    break
            hits += arg_max == labels[r]
            sum_exp = 0.0
            for c in range(k):
                e = np.exp(logits[r, c] - row_max)
                grad_out[r, c] = e
                sum_exp += e
            total += np.log(sum_exp) - (logits[r, labels[r]] - row_max)
            for c in range(k):
                grad_out[r, c] = grad_out[r, c] / sum_exp / n
            grad_out[r, labels[r]] -= 1.0 / n
        return total / n, hits / n

    @jit
    def relu_backward(y, grad_y, grad_x):
        # dL/dx = dL/dy where y > 0, else 0 (Eq. 7): one pass, no boolean mask array.
        y, grad_y, grad_x = y.reshape(-1), grad_y.reshape(-1), grad_x.reshape(-1)
        for i in range(y.size):
            grad_x[i] = grad_y[i] if y[i] > 0 else 0

    return sgd_step, softmax_xent, relu_backward


class NumbaKernels:
    """The fused kernels, as plain callables (scalars in the arrays' dtype)."""

    def __init__(self):
        self._sgd, self._xent, self._relu_backward = _build()

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        self._sgd(p, g, v, t(lr), t(momentum), t(weight_decay))

    def softmax_xent(self, logits, labels, grad_out, out=None):
        """(loss, accuracy) of 2-D logits in one pass; writes dL/dlogits into grad_out.

        ``out``: two arrays to write the loss and the accuracy into (their first element),
        e.g. this step's slots in the per-iteration records; else new 0-d arrays."""
        loss, acc = self._xent(logits, labels, grad_out)
        if out is None:
            return np.asarray(loss, dtype=logits.dtype), np.asarray(acc, dtype=logits.dtype)
        out[0][0], out[1][0] = loss, acc
        return out

    def relu_backward(self, y, grad_y, grad_x):
        """grad_x = grad_y where y > 0, else 0 (arrays of one shape)."""
        if y.flags.c_contiguous and grad_y.flags.c_contiguous and grad_x.flags.c_contiguous:
            self._relu_backward(y, grad_y, grad_x)
        else:  # the kernel walks flat memory
            np.multiply(grad_y, y > 0, out=grad_x)
        return grad_x


def load():
    return NumbaKernels() if numba is not None else None
