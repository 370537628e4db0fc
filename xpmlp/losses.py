"""Losses (report Sections 1.5, 1.6).  ``forward(output, labels)`` takes integer class
labels of shape (..., N) and returns the mean loss over the batch (one value per stacked
model); ``backward()`` returns the gradient with respect to ``output``."""
from .layers import Buffers


def one_hot(xp, labels, num_classes, dtype):
    """t_n: one row per label with a 1 in the label's column."""
    classes = xp.arange(num_classes, dtype=labels.dtype)
    match = xp.expand_dims(labels, axis=-1) == classes
    return xp.astype(match, dtype) if hasattr(xp, "astype") else match.astype(dtype)


def accuracy(xp, output, labels):
    """Fraction of rows whose arg-max equals the label (a device scalar; per stacked model)."""
    hits = xp.argmax(output, axis=-1) == labels
    return xp.mean(xp.astype(hits, output.dtype) if hasattr(xp, "astype") else hits.astype(output.dtype),
                   axis=-1)


class Loss:
    def __init__(self, backend, dtype, fast=False):
        self.backend, self.xp, self.dtype, self.fast = backend, backend.xp, dtype, fast
        self.buffers = Buffers(self.xp, dtype, fast)

    def _targets(self, output, labels):
        """One-hot targets; on the fast path written into a reused buffer, not allocated."""
        xp = self.xp
        if not self.fast:
            return one_hot(xp, labels, output.shape[-1], self.dtype)
        classes = self.buffers.get("classes", (output.shape[-1],), dtype=labels.dtype)
        classes[...] = xp.arange(output.shape[-1], dtype=labels.dtype)
        return xp.equal(xp.expand_dims(labels, -1), classes,
                        out=self.buffers.get("onehot", output.shape))

    def forward_with_accuracy(self, output, labels, out=None):
        """(mean loss, accuracy) of one batch; a fused kernel may compute both in one pass.

        ``out``: two length-1 arrays (e.g. slots of per-iteration records) that receive
        the loss and the accuracy; they are then what is returned."""
        loss, acc = self.forward(output, labels), accuracy(self.xp, output, labels)
        if out is None:
            return loss, acc
        out[0][...], out[1][...] = loss, acc
        return out

    def __repr__(self):
        return f"{type(self).__name__}()"


class EuclideanLoss(Loss):
    """L = 1/(2N) sum_n ||x_n - t_n||^2 (Eq. 10); dL/dx_n = (x_n - t_n)/N (Eq. 11)."""

    def forward(self, output, labels):
        xp = self.xp
        self.n = output.shape[-2]
        t = self._targets(output, labels)
        self.diff = output - t if not self.fast else xp.subtract(output, t, out=t)
        return xp.sum(self.diff * self.diff, axis=(-2, -1)) / (2 * self.n)

    def backward(self):
        if not self.fast:
            return self.diff / self.n
        return self.xp.divide(self.diff, self.n, out=self.buffers.get("dx", self.diff.shape))


class SoftmaxCrossEntropyLoss(Loss):
    """L = -1/N sum_n log softmax(x_n)_c (Eq. 12); dL/dx_n = (softmax(x_n) - t_n)/N (Eq. 13).

    Log-sum-exp with the row maximum subtracted, so no exponent overflows.
    """

    grad = None  # set by a fused forward (kernels.softmax_xent)

    def _fused(self, output):
        kernels = self.backend.kernels if self.fast else None
        if kernels is None or kernels.softmax_xent is None or output.ndim != 2:
            return None
        return kernels.softmax_xent

    def forward_with_accuracy(self, output, labels, out=None):
        fused = self._fused(output)
        if fused is None:
            return super().forward_with_accuracy(output, labels, out)
        # One pass: the loss, its gradient, and the arg-max hits (the row maximum is at hand).
        self.n = output.shape[-2]
        self.grad = self.buffers.get("dx", output.shape)
        return fused(output, labels, self.grad, out)

    def forward(self, output, labels):
        xp = self.xp
        self.n = output.shape[-2]
        if self._fused(output) is not None:
            return self.forward_with_accuracy(output, labels)[0]
        self.grad = None
        shifted = output - xp.max(output, axis=-1, keepdims=True)
        exp_shifted = xp.exp(shifted)
        sum_exp = xp.sum(exp_shifted, axis=-1, keepdims=True)
        self.prob = exp_shifted / sum_exp
        self.targets = self._targets(output, labels)
        log_prob = shifted - xp.log(sum_exp)
        return -xp.sum(self.targets * log_prob, axis=(-2, -1)) / self.n

    def backward(self):
        xp = self.xp
        if self.grad is not None:
            return self.grad
        if not self.fast:
            return (self.prob - self.targets) / self.n
        dx = xp.subtract(self.prob, self.targets, out=self.buffers.get("dx", self.prob.shape))
        return xp.divide(dx, self.n, out=dx)
