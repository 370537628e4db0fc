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
    """Subclasses write the math as ``_loss(output, labels)`` and ``_grad()``.  On the fast
    path, a backend kernel named ``kernel`` (where the backend has one) computes the loss,
    its gradient and the accuracy in one pass instead."""

    kernel = None
    grad = None  # dL/doutput, when a fused kernel computed it with the loss

    def __init__(self, backend, dtype, fast=False):
        self.backend, self.xp, self.dtype, self.fast = backend, backend.xp, dtype, fast
        self.buffers = Buffers(self.xp, dtype, fast)

    def _fused(self, output):
        fusable = self.fast and self.kernel is not None and output.ndim == 2
        return self.backend.kernel(self.kernel) if fusable else None

    def forward(self, output, labels):
        """Mean loss over the batch (one value per stacked model)."""
        if self._fused(output) is not None:
            return self.forward_with_accuracy(output, labels)[0]
        self.grad = None
        self.n = output.shape[-2]
        return self._loss(output, labels)

    def backward(self):
        """dL/d output of the last forward."""
        return self.grad if self.grad is not None else self._grad()

    def forward_with_accuracy(self, output, labels, out=None):
        """(mean loss, accuracy) of one batch.

        ``out``: two length-1 arrays (e.g. slots of per-iteration records) that receive
        the loss and the accuracy; they are then what is returned."""
        fused = self._fused(output)
        if fused is not None:
            self.n = output.shape[-2]
            self.grad = self.buffers.get("dx", output.shape)
            return fused(output, labels, self.grad, out)
        loss, acc = self.forward(output, labels), accuracy(self.xp, output, labels)
        if out is None:
            return loss, acc
        out[0][...], out[1][...] = loss, acc
        return out

    def _targets(self, output, labels):
        """One-hot targets; on the fast path written into a reused buffer, not allocated."""
        xp = self.xp
        if not self.fast:
            return one_hot(xp, labels, output.shape[-1], self.dtype)
        classes = self.buffers.get("classes", (output.shape[-1],), dtype=labels.dtype)
        classes[...] = xp.arange(output.shape[-1], dtype=labels.dtype)
        return xp.equal(xp.expand_dims(labels, -1), classes,
                        out=self.buffers.get("onehot", output.shape))

    def __repr__(self):
        return f"{type(self).__name__}()"


class EuclideanLoss(Loss):
    """L = 1/(2N) sum_n ||x_n - t_n||^2 (Eq. 10); dL/dx_n = (x_n - t_n)/N (Eq. 11)."""

    kernel = "euclidean"

    def _loss(self, output, labels):
        xp = self.xp
        t = self._targets(output, labels)
        self.diff = output - t if not self.fast else xp.subtract(output, t, out=t)
        return xp.sum(self.diff * self.diff, axis=(-2, -1)) / (2 * self.n)

    def _grad(self):
        if not self.fast:
            return self.diff / self.n
        return self.xp.divide(self.diff, self.n, out=self.buffers.get("dx", self.diff.shape))


class SoftmaxCrossEntropyLoss(Loss):
    """L = -1/N sum_n log softmax(x_n)_c (Eq. 12); dL/dx_n = (softmax(x_n) - t_n)/N (Eq. 13).

    Log-sum-exp with the row maximum subtracted, so no exponent overflows.
    """

    kernel = "softmax_xent"

    def _loss(self, output, labels):
        xp = self.xp
        shifted = output - xp.max(output, axis=-1, keepdims=True)
        exp_shifted = xp.exp(shifted)
        sum_exp = xp.sum(exp_shifted, axis=-1, keepdims=True)
        self.prob = exp_shifted / sum_exp
        self.targets = self._targets(output, labels)
        log_prob = shifted - xp.log(sum_exp)
        return -xp.sum(self.targets * log_prob, axis=(-2, -1)) / self.n

    def _grad(self):
        xp = self.xp
        if not self.fast:
            return (self.prob - self.targets) / self.n
        dx = xp.subtract(self.prob, self.targets, out=self.buffers.get("dx", self.prob.shape))
        return xp.divide(dx, self.n, out=dx)
