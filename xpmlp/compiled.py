"""The compiled training step: a Stepper that hands whole steps to the fused kernels'
compiled ``mlp_steps`` (NumPy + Numba: backends/numpy_step.py) where the model is one it
compiles, so no Python runs between a step's operations.  Chosen once per model, as its
ops are (``make_stepper`` in train.py); the Stepper of the ops stays for everything else.

It keeps the model's own arrays: the layers' W and b stay views into the flat parameter
buffer, their gradients into the flat gradient buffer, and the optimizer's velocity is
the one SGD checkpoints, so evaluation, checkpoints and resume see no difference.
"""
import numpy as np

from .layers import Linear, ReLU, Sigmoid
from .losses import EuclideanLoss, SoftmaxCrossEntropyLoss

SOFTMAX_XENT, SIGMOID_EUCLIDEAN = 0, 1  # the kernel's loss codes (numpy_step.py)


def _loss_code(model):
    """The kernel's code for the model's layers and loss, or None where it compiles no such
    network: Linear (ReLU Linear)* then softmax cross-entropy, or then Sigmoid + Euclidean."""
    layers = model.layers
    if isinstance(model.loss, SoftmaxCrossEntropyLoss):
        code = SOFTMAX_XENT
    elif isinstance(model.loss, EuclideanLoss) and layers and isinstance(layers[-1], Sigmoid):
        code, layers = SIGMOID_EUCLIDEAN, layers[:-1]
    else:
        return None
    linear = all(isinstance(layer, Linear) for layer in layers[0::2])
    relu = all(isinstance(layer, ReLU) for layer in layers[1::2])
    return code if layers and len(layers) % 2 == 1 and linear and relu else None


def compiled_steps(model):
    """The compiled step for this model, or None: only a model on fused ops whose kernels
    compile steps (NumPy + Numba), of a network they compile, not stacked."""
    kernel = getattr(getattr(model.ops, "kernels", None), "mlp_steps", None)
    if kernel is None or model.flat is None or _loss_code(model) is None or model.layers[0].W.ndim != 2:
        return None
    return kernel(model.dtype)


class CompiledStepper:
    """Stepper's interface (``step``), plus ``steps`` for several batches in one call."""

    def __init__(self, model, optimizer, kernel=None):
        self.model, self.optimizer = model, optimizer
        self.kernel = kernel or compiled_steps(model)
        if self.kernel is None:
            raise ValueError(f"no compiled step for {model!r} on {model.backend!r}")
        self.loss_code = _loss_code(model)
        self.linears = [layer for layer in model.layers if isinstance(layer, Linear)]
        sizes = [layer.W.size + layer.b.size for layer in self.linears]
        self.offsets = np.cumsum([0] + sizes)
        self._batch = None

    def _buffers(self, x, y, batch):
        """The batch and every layer's output and gradient, allocated once per batch size."""
        if self._batch is None or self._batch[0].shape[0] != batch:
            dtype = self.model.dtype
            outputs = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
            grads = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
            # The batch in the model's dtype whatever x's: the products get one dtype.
            self._batch = (np.empty((batch, x.shape[1]), dtype=dtype), np.empty((batch,), dtype=y.dtype),
                           outputs, grads)
        return self._batch

    def steps(self, x, y, idx, loss_out, acc_out):
        """``len(loss_out)`` steps, on consecutive batches of the rows ``idx`` of (x, y);
        each step's loss and accuracy written into ``loss_out``, ``acc_out``."""
        batch = idx.shape[0] // loss_out.shape[0]
        xb, yb, outputs, grads = self._buffers(x, y, batch)
        flat, opt, t = self.model.flat, self.optimizer, np.dtype(self.model.dtype).type
        (slot,) = opt.slots  # the flat buffers' one slot
        self.kernel(x, y, idx, tuple(layer.W for layer in self.linears), tuple(layer.b for layer in self.linears),
                    tuple(layer.grad_W for layer in self.linears), tuple(layer.grad_b for layer in self.linears),
                    outputs, grads, xb, yb, self.loss_code, flat.params, flat.grads, slot.velocity,
                    self.offsets, t(opt.lr), t(opt.momentum), t(opt.weight_decay), loss_out, acc_out)

    def step(self, x, y, idx, loss_out, acc_out, i):
        self.steps(x, y, idx, loss_out[i:i + 1], acc_out[i:i + 1])
