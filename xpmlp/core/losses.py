"""Losses (report Sections 1.5, 1.6).  ``forward(output, labels)`` takes integer class
labels of shape (..., N) and returns the mean loss over the batch (one value per stacked
model); ``backward()`` returns the gradient with respect to ``output``.

Each loss is one computation in its ops (ops.py) that gives the loss, the accuracy and the
gradient together, as the fused kernels do; ``forward`` and ``forward_with_accuracy`` both
wrap it.
"""
from .ops import Scratch, accuracy, ops_for  # noqa: F401 (accuracy: re-exported by model.py)


class Loss:
    """Subclasses name their computation in the ops: ``op``."""

    op = None
    grad = None  # dL/doutput of the last forward

    def __init__(self, backend, dtype, *, ops="plain"):
        self.backend, self.xp, self.dtype = backend, backend.xp, dtype
        self.ops = ops_for(backend, ops)
        self.scratch = Scratch(self.xp, dtype)
        self._compute = getattr(self.ops, self.op)

    def forward_with_accuracy(self, output, labels, out=None):
        """(mean loss, accuracy) of one batch; the gradient is kept for ``backward``.

        ``out``: two length-1 arrays (e.g. slots of per-iteration records) that receive
        the loss and the accuracy; they are then what is returned."""
        loss, acc, self.grad = self._compute(output, labels, self.scratch, out)
        return loss, acc

    def forward(self, output, labels):
        """Mean loss over the batch (one value per stacked model)."""
        return self.forward_with_accuracy(output, labels)[0]

    def backward(self):
        """dL/d output of the last forward."""
        return self.grad

    def __repr__(self):
        return f"{type(self).__name__}()"


class EuclideanLoss(Loss):
    """L = 1/(2N) sum_n ||x_n - t_n||^2 (Eq. 10); dL/dx_n = (x_n - t_n)/N (Eq. 11)."""

    op = "euclidean"


class SoftmaxCrossEntropyLoss(Loss):
    """L = -1/N sum_n log softmax(x_n)_c (Eq. 12); dL/dx_n = (softmax(x_n) - t_n)/N (Eq. 13).

    Log-sum-exp with the row maximum subtracted, so no exponent overflows.
    """

    op = "softmax_xent"
