"""Layers with hand-written forward and backward passes (report Section 1).

A layer holds its parameters and what its backward needs from its forward; the
arithmetic is one call into its ops (ops.py), chosen once per model: the plain Array
API reference, the buffered NumPy/CuPy one, or a backend's fused kernels.  Everything
works over the last two axes, so a leading axis of stacked models works unchanged.
"""
from .ops import Scratch, ops_for


class Layer:
    """Base: a layer without parameters.  ``params`` names the trainable attributes.

    ``ops``: an ops object, or 'plain' (the default: the reference) / 'buffered' / 'fused';
    None: the fastest the backend has."""

    params = ()

    def __init__(self, backend, dtype, *, ops="plain"):
        self.backend, self.xp, self.dtype = backend, backend.xp, dtype
        self.ops = ops_for(backend, ops)
        self.scratch = Scratch(self.xp, dtype)  # this layer's reused outputs (buffered ops)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Linear(Layer):
    """y = xW + b (Eq. 4); W of shape (in, out) drawn from N(0, init_std^2), b = 0.
    Backward (Eq. 5): dL/dW = x^T g, dL/db = sum_n g, dL/dx = g W^T."""

    params = ("W", "b")

    def __init__(self, in_features, out_features, backend, dtype, *, init_std=0.01, rng,
                 stack=(), ops="plain"):
        super().__init__(backend, dtype, ops=ops)
        self.in_features, self.out_features = in_features, out_features
        stack = tuple(stack)
        # Drawn on the host so every backend starts from identical weights.
        W_host = rng.normal(0.0, init_std, size=stack + (in_features, out_features))
        self.W = backend.asarray(W_host, dtype=dtype)
        # b has a length-1 row axis when stacked so it broadcasts over each model's batch.
        self.b = self.xp.zeros(stack + ((1,) if stack else ()) + (out_features,), dtype=dtype)
        self.grad_W = self.xp.zeros_like(self.W)
        self.grad_b = self.xp.zeros_like(self.b)

    def forward(self, x):
        self.x = x
        return self.ops.linear(x, self.W, self.b, self.scratch)

    def backward(self, grad_y, need_input_grad=True):
        """Fills grad_W and grad_b; returns dL/dx, or None when not ``need_input_grad`` (the
        first layer's input is data: that skips a third of the GEMM work)."""
        self.grad_W, self.grad_b, grad_x = self.ops.linear_backward(
            self.x, self.W, grad_y, self.grad_W, self.grad_b, need_input_grad, self.scratch)
        return grad_x

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """y = max(x, 0) (Eq. 6); dy/dx = 1 where x > 0, else 0 (Eq. 7)."""

    def forward(self, x):
        self.y = self.ops.relu(x, self.scratch)
        return self.y

    def backward(self, grad_y, need_input_grad=True):
        return self.ops.relu_backward(self.y, grad_y, self.scratch)


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x) (Eq. 8, sign corrected); dy/dx = y (1 - y) (Eq. 9).

    Computed from e^-|x| so no exponent ever overflows, in either precision.
    """

    def forward(self, x):
        self.y = self.ops.sigmoid(x, self.scratch)
        return self.y

    def backward(self, grad_y, need_input_grad=True):
        return self.ops.sigmoid_backward(self.y, grad_y, self.scratch)
