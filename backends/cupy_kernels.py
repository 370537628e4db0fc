"""Fused CUDA kernels for the CuPy backend, compiled on first use (CuPy caches them on disk).

On a GPU a training step of this size costs kernel launches, not arithmetic, so each
kernel here replaces several array operations, and therefore several launches.
"""
import numpy as np

# The fused losses.  One block walks the rows (thread t takes rows t, t + blockDim.x, ...)
# and sums the loss and the hits in shared memory in a fixed order: the result is the
# same bits every run, which float atomics would not give.  Stacked models are one launch,
# one block a model (grid = K): block m reads model m's (n, k) output and writes its
# gradient at offset m*n*k, its labels at m*labels_stride (0: shared by all models), its
# loss and accuracy at m*out_stride; each block computes what the one-model launch computes.
# Same arithmetic as the Numba kernels.  A label outside [0, k) is never used as an index: its row gets no target, as
# the array code's one_hot gives it (a row of zeros), instead of a write out of bounds.
LOSS_SOURCE = r"""
template <typename T>
__device__ int xpmlp_row_argmax(const T* row, const int k) {
    int arg_max = 0;  // np.argmax semantics: the first maximum, or the first NaN
    for (int c = 1; c < k; ++c) {
        if (row[c] > row[arg_max]) arg_max = c;
    }
    for (int c = 0; c < k; ++c) {
        if (isnan(row[c])) return c;
    }
    return arg_max;
}

template <typename T>
__device__ void xpmlp_write_means(const double loss, const double hits, const double loss_divisor,
                                  const int n, T* loss_out, T* acc_out) {
    extern __shared__ double partial[];  // 2 * blockDim.x: losses, then hits
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
        *loss_out = (T)(partial[0] / loss_divisor);
        *acc_out = (T)(partial[blockDim.x] / n);
    }
}

// Each loss's per-row math: writes the row's gradient into g and adds the row's loss to
// ``loss`` (term by term, in the Numba kernels' order).  ``label`` may lie outside [0, k).
template <typename T>
struct XpmlpSoftmaxXentRow {  // -log softmax(x)_label; gradient (softmax(x) - t)/n
    __device__ static void add(const T* x, T* g, const long long label, const int n, const int k,
                               double& loss) {
        const bool has_target = 0 <= label && label < k;  // else a row of zeros, as one_hot gives
        T row_max = x[0];
        for (int c = 1; c < k; ++c) row_max = max(row_max, x[c]);
        double sum_exp = 0.0;
        for (int c = 0; c < k; ++c) {
            const T e = exp(x[c] - row_max);
            g[c] = e;
            sum_exp += (double)e;
        }
        if (has_target) loss += log(sum_exp) - (double)(x[label] - row_max);
        for (int c = 0; c < k; ++c) g[c] = (T)((double)g[c] / sum_exp / n);
        if (has_target) g[label] = (T)((double)g[label] - 1.0 / n);
    }
};

template <typename T>
struct XpmlpEuclideanRow {  // ||x - t||^2 (halved with the mean); gradient (x - t)/n
    __device__ static void add(const T* x, T* g, const long long label, const int n, const int k,
                               double& loss) {
        for (int c = 0; c < k; ++c) {  // outside [0, k): no column matches, no target
            const T diff = (c == label) ? x[c] - (T)1 : x[c];
            loss += (double)(diff * diff);
            g[c] = diff / (T)n;
        }
    }
};

// What both loss kernels share: the walk over the rows, each row's hit, and the means, for
// the model of this block.
template <typename T, typename Row>
__device__ void xpmlp_loss_rows(const T* output, const long long* labels, T* grad, T* loss_out,
                                T* acc_out, const int n, const int k, const long long labels_stride,
                                const long long out_stride, const double loss_divisor) {
    const long long model = blockIdx.x;
    output += model * n * k;
    grad += model * n * k;
    labels += model * labels_stride;
    loss_out += model * out_stride;
    acc_out += model * out_stride;
    double loss = 0.0, hits = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const T* x = output + (long long)r * k;
        const long long label = labels[r];
        hits += (xpmlp_row_argmax(x, k) == label) ? 1.0 : 0.0;
        Row::add(x, grad + (long long)r * k, label, n, k, loss);
    }
    xpmlp_write_means(loss, hits, loss_divisor, n, loss_out, acc_out);
}

template <typename T>
__global__ void xpmlp_softmax_xent(const T* logits, const long long* labels, T* grad, T* loss_out,
                                   T* acc_out, const int n, const int k, const long long labels_stride,
                                   const long long out_stride) {
    xpmlp_loss_rows<T, XpmlpSoftmaxXentRow<T>>(logits, labels, grad, loss_out, acc_out, n, k, labels_stride,
                                               out_stride, (double)n);
}

template <typename T>
__global__ void xpmlp_euclidean(const T* output, const long long* labels, T* grad, T* loss_out,
                                T* acc_out, const int n, const int k, const long long labels_stride,
                                const long long out_stride) {
    xpmlp_loss_rows<T, XpmlpEuclideanRow<T>>(output, labels, grad, loss_out, acc_out, n, k, labels_stride,
                                             out_stride, 2.0 * n);
}
"""
# The loss kernels' parameters after the template type (test_kernels.py declares them for nvcc).
LOSS_PARAMS = ("const {t}*", "const long long*", "{t}*", "{t}*", "{t}*", "const int", "const int",
               "const long long", "const long long")
LOSS_KERNELS = ("xpmlp_softmax_xent", "xpmlp_euclidean")
LOSS_THREADS = 256
LOSS_OPTIONS = ("-std=c++14",)
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# name: (inputs, outputs, body) of each cupy.ElementwiseKernel.
ELEMENTWISE = {
    "xpmlp_sgd_step": (  # v <- m*v + (g + wd*p); p <- p - lr*v over the flat buffers
        "T g, T lr, T momentum, T weight_decay", "T p, T v",
        "T vi = momentum * v + (g + weight_decay * p); v = vi; p = p - lr * vi;"),
    "xpmlp_sgd_step_stacked": (  # the same for K stacked models, (K, 1) hyperparameters, frozen rows kept
        "T g, T lr, T momentum, T weight_decay, bool active", "T p, T v",
        "if (active) { T vi = momentum * v + (g + weight_decay * p); v = vi; p = p - lr * vi; }"),
    "xpmlp_sgd_step_by_layer": (  # the same over K models' buffers laid out parameter by parameter:
        # element i's parameter b is found from the blocks' starts (which end with the total),
        # its model from its offset in the block, and the model's hyperparameters read there
        "T g, raw T lr, raw T momentum, raw T weight_decay, raw bool active, raw int64 starts, raw int64 sizes",
        "T p, T v",
        "long long b = 0; while (i >= starts[b + 1]) ++b; const long long m = (i - starts[b]) / sizes[b]; "
        "if (active[m]) { T vi = momentum[m] * v + (g + weight_decay[m] * p); v = vi; p = p - lr[m] * vi; }"),
    "xpmlp_relu_backward": (  # Eq. (7)
        "T y, T grad_y", "T grad_x", "grad_x = y > (T)0 ? grad_y : (T)0;"),
    "xpmlp_sigmoid_forward": (  # Eq. (8) from e^-|x|: no overflow
        "T x", "T y", "T e = exp(-fabs(x)); y = x >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);"),
    "xpmlp_sigmoid_backward": (  # Eq. (9)
        "T y, T grad_y", "T grad_x", "grad_x = grad_y * y * ((T)1 - y);"),
}
# NVRTC options per ElementwiseKernel (CuPy adds -ftz=true to all).  The SGD step is compiled
# without multiply-add contraction: NVRTC would otherwise fuse m*v + (...) into one FMA,
# whose single rounding differs from NumPy's where the terms nearly cancel (716 of 100,003
# float32 elements beyond rtol 1e-6).  Separate IEEE roundings cost nothing in a step that
# is bound by memory traffic, and give the CPU's bits exactly (subnormals aside, which
# -ftz flushes), so the GPU and CPU optimizers can be compared bit for bit.
ELEMENTWISE_OPTIONS = {name: ("--fmad=false",) for name in
                       ("xpmlp_sgd_step", "xpmlp_sgd_step_stacked", "xpmlp_sgd_step_by_layer")}


class CupyKernels:
    """The fused kernels, as plain callables with the same contracts as the Numba ones: the
    elementwise ones write into their output argument (their last)."""

    def __init__(self, cupy):
        self.cupy = cupy
        kernels = {name: cupy.ElementwiseKernel(*spec, name, options=ELEMENTWISE_OPTIONS.get(name, ()))
                   for name, spec in ELEMENTWISE.items()}
        self._sgd = kernels["xpmlp_sgd_step"]
        self._sgd_stacked = kernels["xpmlp_sgd_step_stacked"]
        self._sgd_by_layer = kernels["xpmlp_sgd_step_by_layer"]
        self._relu_backward = kernels["xpmlp_relu_backward"]
        self._sigmoid_forward = kernels["xpmlp_sigmoid_forward"]
        self._sigmoid_backward = kernels["xpmlp_sigmoid_backward"]
        self._loss_module = None
        self._loss_functions = {}  # (name, dtype) -> the module's compiled function

    def sgd_step(self, p, g, v, lr, momentum, weight_decay):
        t = p.dtype.type
        self._sgd(g, t(lr), t(momentum), t(weight_decay), p, v)

    def sgd_step_stacked(self, p, g, v, lr, momentum, weight_decay, active):
        """sgd_step for (K, P) buffers; (K,) hyperparameters and ``active`` broadcast per row."""
        def column(a):
            return a.reshape(-1, 1)
        self._sgd_stacked(g, column(lr), column(momentum), column(weight_decay), column(active), p, v)

    def sgd_step_by_layer(self, p, g, v, lr, momentum, weight_decay, active, starts, sizes):
        """sgd_step for K models' 1-D buffers laid out parameter by parameter, in one launch:
        parameter b's block begins at ``starts[b]`` and holds ``sizes[b]`` values a model
        (``starts`` ends with the buffers' length); (K,) hyperparameters and ``active``."""
        self._sgd_by_layer(g, lr, momentum, weight_decay, active, starts, sizes, p, v)

    def relu_backward(self, y, grad_y, grad_x):
        """grad_x = grad_y where y > 0, else 0, in one kernel instead of a mask and a multiply."""
        self._relu_backward(y, grad_y, grad_x)

    def sigmoid_forward(self, x, y):
        """y = 1 / (1 + e^-x), written into y."""
        self._sigmoid_forward(x, y)

    def sigmoid_backward(self, y, grad_y, grad_x):
        """grad_x = grad_y * y * (1 - y)."""
        self._sigmoid_backward(y, grad_y, grad_x)

    def softmax_xent(self, logits, labels, grad_out, out=None):
        """(loss, accuracy) of 2-D logits in one launch; writes dL/dlogits into grad_out."""
        return self._loss("xpmlp_softmax_xent", logits, labels, grad_out, out)

    def euclidean(self, output, labels, grad_out, out=None):
        """(loss, accuracy) of a 2-D output in one launch; writes dL/doutput into grad_out."""
        return self._loss("xpmlp_euclidean", output, labels, grad_out, out)

    def softmax_xent_stacked(self, logits, labels, grad_out, out=None):
        """softmax_xent of K stacked models, (K, N, C) logits, in one launch (a block a model);
        labels (N,) shared or (K, N); (K,) losses and accuracies."""
        return self._loss("xpmlp_softmax_xent", logits, labels, grad_out, out)

    def euclidean_stacked(self, output, labels, grad_out, out=None):
        """euclidean of K stacked models in one launch, as softmax_xent_stacked."""
        return self._loss("xpmlp_euclidean", output, labels, grad_out, out)

    def _loss(self, name, output, labels, grad_out, out):
        """``grad_out`` must be C-contiguous.  ``out``: two arrays to write the loss and the
        accuracy into (their first element; K elements along their last axis when stacked),
        e.g. this step's slots in the per-iteration records; else new arrays (0-d, or (K,))."""
        cp = self.cupy
        kernel = self._loss_functions.get((name, output.dtype))
        if kernel is None:  # looked up once per dtype, not on every step
            if self._loss_module is None:
                self._loss_module = cp.RawModule(
                    code=LOSS_SOURCE, options=LOSS_OPTIONS,
                    name_expressions=[f"{k}<{t}>" for k in LOSS_KERNELS for t in CTYPES.values()])
            kernel = self._loss_module.get_function(f"{name}<{CTYPES[output.dtype]}>")
            self._loss_functions[(name, output.dtype)] = kernel
        output = cp.ascontiguousarray(output)
        labels = cp.ascontiguousarray(labels, dtype=cp.int64)
        models = output.shape[0] if output.ndim == 3 else 1
        lead = output.shape[:-2]
        loss, acc = out if out is not None else (cp.empty(lead, output.dtype), cp.empty(lead, output.dtype))
        n, k = output.shape[-2:]
        if labels.shape[-1] != n or (labels.ndim == 2 and labels.shape[0] != models) or \
                (models > 1 and (loss.shape[-1] != models or loss.strides != acc.strides)):
            # the kernel does not check bounds: a wrong shape here would read or write past them
            raise ValueError(f"loss of {tuple(output.shape)}: labels {tuple(labels.shape)} or slots "
                             f"{tuple(loss.shape)} do not match")
        labels_stride = n if labels.ndim == 2 else 0  # (K, N): a row a model; (N,): shared
        out_stride = loss.strides[-1] // loss.itemsize if models > 1 else 0  # model m's slot
        kernel((models,), (LOSS_THREADS,), (output, labels, grad_out, loss, acc, np.int32(n), np.int32(k),
                                            np.int64(labels_stride), np.int64(out_stride)),
               shared_mem=2 * LOSS_THREADS * 8)
        return loss, acc
