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
        # Mean -log softmax(x)_label over rows, and its gradient (softmax - onehot)/N.
        n, k = logits.shape
        total = 0.0
        for r in range(n):
            row_max = logits[r, 0]
            for c in range(1, k):
                row_max = max(row_max, logits[r, c])
            sum_exp = 0.0
            for c in range(k):
                e = np.exp(logits[r, c] - row_max)
                grad_out[r, c] = e
                sum_exp += e
            total += np.log(sum_exp) - (logits[r, labels[r]] - row_max)
            for c in range(k):
                grad_out[r, c] = grad_out[r, c] / sum_exp / n
            grad_out[r, labels[r]] -= 1.0 / n
        return total / n

    return sgd_step, softmax_xent


class NumbaKernels:
    """The fused kernels, as plain callables (scalars in the arrays' dtype)."""

    def __init__(self):
        self._sgd, self._xent = _build()

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        self._sgd(p, g, v, t(lr), t(momentum), t(weight_decay))

    def softmax_xent(self, logits, labels, grad_out):
        """Loss (a 0-d array of the logits' dtype); writes dL/dlogits into grad_out."""
        return np.asarray(self._xent(logits, labels, grad_out), dtype=logits.dtype)


def load():
    return NumbaKernels() if numba is not None else None
