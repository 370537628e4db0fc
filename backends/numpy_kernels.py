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

    def sgd_body(p, g, v, lr, momentum, weight_decay):
        # v <- m*v + (g + wd*p); p <- p - lr*v, in the parameters' dtype, one pass.
        for i in numba.prange(p.size):
            vi = momentum * v[i] + (g[i] + weight_decay * p[i])
            v[i] = vi
            p[i] = p[i] - lr * vi

    # prange is a plain range in the serial build; the parallel one splits the buffer
    # across Numba's threads (used when more than one CPU thread is allowed).
    sgd_step = jit(sgd_body)
    sgd_step_parallel = numba.njit(cache=True, nogil=True, parallel=True)(sgd_body)

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

    return sgd_step, sgd_step_parallel, softmax_xent


class NumbaKernels:
    """The fused kernels, as plain callables (scalars in the arrays' dtype)."""

    def __init__(self):
        self._sgd, self._sgd_parallel, self._xent = _build()
        # Follow the BLAS thread setting (the sweep caps it per job) so kernels never
        # oversubscribe the cores that the matrix products use.
        self.set_threads(_env_threads() or numba.config.NUMBA_NUM_THREADS)

    def set_threads(self, n):
        self.threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        if self.threads > 1:
            numba.set_num_threads(self.threads)
            self._sgd_parallel(p, g, v, t(lr), t(momentum), t(weight_decay))
        else:
            self._sgd(p, g, v, t(lr), t(momentum), t(weight_decay))

    def softmax_xent(self, logits, labels, grad_out):
        """Loss (a 0-d array of the logits' dtype); writes dL/dlogits into grad_out."""
        return np.asarray(self._xent(logits, labels, grad_out), dtype=logits.dtype)


def _env_threads():
    import os
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def load():
    return NumbaKernels() if numba is not None else None
