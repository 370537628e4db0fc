"""Fused CUDA kernels for the CuPy backend, compiled on first use (CuPy caches them on disk).

On a GPU a training step of this size costs kernel launches, not arithmetic, so each
kernel here replaces several array operations, and therefore several launches.
"""
import numpy as np

# One block walks the rows (thread t takes rows t, t + blockDim.x, ...) and sums the loss
# and the hits in shared memory in a fixed order: the result is the same bits every run,
# which float atomics would not give.  Same arithmetic as the Numba kernel.
SOFTMAX_XENT_SOURCE = r"""
template <typename T>
__global__ void xpmlp_softmax_xent(const T* logits, const long long* labels, T* grad,
                                   T* loss_out, T* acc_out, const int n, const int k) {
    extern __shared__ double partial[];  // 2 * blockDim.x: losses, then hits
    double loss = 0.0, hits = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const T* row = logits + (long long)r * k;
        T* g = grad + (long long)r * k;
        T row_max = row[0];
        int arg_max = 0;
        for (int c = 1; c < k; ++c) {
            if (row[c] > row_max) { row_max = row[c]; arg_max = c; }
        }
        for (int c = 0; c < k; ++c) {  // np.argmax semantics: the first NaN wins
            if (isnan(row[c])) { arg_max = c; break; }
        }
        const int label = (int)labels[r];
        hits += (arg_max == label) ? 1.0 : 0.0;
        double sum_exp = 0.0;
        for (int c = 0; c < k; ++c) {
            const T e = exp(row[c] - row_max);
            g[c] = e;
            sum_exp += (double)e;
        }
        loss += log(sum_exp) - (double)(row[label] - row_max);
        for (int c = 0; c < k; ++c) {
            g[c] = (T)((double)g[c] / sum_exp / n);
        }
        g[label] = (T)((double)g[label] - 1.0 / n);
    }
    partial[threadIdx.x] = loss;
    partial[blockDim.x + threadIdx.x] = hits;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {  // blockDim.x is a power of two
        if (threadIdx.x < s) {
            partial[threadIdx.x] += partial[threadIdx.x + s];
            partial[blockDim.x + threadIdx.x] += partial[blockDim.x + threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *loss_out = (T)(partial[0] / n);
        *acc_out = (T)(partial[blockDim.x] / n);
    }
}
"""
SOFTMAX_XENT_THREADS = 256
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class CupyKernels:
    """The fused kernels, as plain callables with the same contracts as the Numba ones."""

    def __init__(self, cupy):
        self.cupy = cupy
        self._sgd = cupy.ElementwiseKernel(
            "T g, T lr, T momentum, T weight_decay", "T p, T v",
            "T vi = momentum * v + (g + weight_decay * p); v = vi; p = p - lr * vi;",
            "xpmlp_sgd_step")
        self._relu_backward = cupy.ElementwiseKernel(
            "T y, T grad_y", "T grad_x", "grad_x = y > (T)0 ? grad_y : (T)0;", "xpmlp_relu_backward")
        self._xent_module = None

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        self._sgd(g, t(lr), t(momentum), t(weight_decay), p, v)

    def relu_backward(self, y, grad_y, grad_x):
        """grad_x = grad_y where y > 0, else 0, in one kernel instead of a mask and a multiply."""
        self._relu_backward(y, grad_y, grad_x)
        return grad_x

    def softmax_xent(self, logits, labels, grad_out, out=None):
        """(loss, accuracy) of 2-D logits in one launch; writes dL/dlogits into grad_out (C-contiguous).

        ``out``: two arrays to write the loss and the accuracy into (their first element),
        e.g. this step's slots in the per-iteration records; else new 0-d arrays."""
        cp = self.cupy
        if self._xent_module is None:
            self._xent_module = cp.RawModule(
                code=SOFTMAX_XENT_SOURCE, options=("-std=c++14",),
                name_expressions=[f"xpmlp_softmax_xent<{t}>" for t in CTYPES.values()])
        kernel = self._xent_module.get_function(f"xpmlp_softmax_xent<{CTYPES[logits.dtype]}>")
        logits = cp.ascontiguousarray(logits)
        labels = cp.ascontiguousarray(labels, dtype=cp.int64)
        loss, acc = out if out is not None else (cp.empty((), logits.dtype), cp.empty((), logits.dtype))
        n, k = logits.shape
        kernel((1,), (SOFTMAX_XENT_THREADS,), (logits, labels, grad_out, loss, acc, np.int32(n), np.int32(k)),
               shared_mem=2 * SOFTMAX_XENT_THREADS * 8)
        return loss, acc
