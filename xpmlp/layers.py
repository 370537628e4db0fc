"""Layers with hand-written forward and backward passes (report Section 1).

Each layer computes with ``xp``, the namespace of its backend, over the last
two axes, so a leading axis of stacked models works unchanged.

Two paths share each body.  The plain path allocates fresh arrays and uses
only the Array API standard (it runs on array-api-strict).  The fast path
(``fast=True``, NumPy and CuPy) writes into buffers reused across steps via
``out=``; arrays it returns are overwritten by the next call of the same shape.
"""


class Buffers:
    """Reusable output arrays keyed by (name, shape); ``get`` returns None on the plain path."""

    def __init__(self, xp, dtype, enabled):
        self.xp, self.dtype, self.enabled = xp, dtype, enabled
        self._arrays = {}

    def get(self, name, shape, dtype=None):
        if not self.enabled:
            return None
        key = (name, tuple(shape))
        buf = self._arrays.get(key)
        if buf is None:
            buf = self._arrays[key] = self.xp.empty(tuple(shape), dtype=dtype or self.dtype)
        return buf


def _call(fn, *args, out=None):
    """``fn(*args, out=out)`` where a buffer is given, else the allocating form."""
    return fn(*args) if out is None else fn(*args, out=out)


def matrix_transpose(xp, a):
    # The ndarray method where there is one: NumPy's module function costs ~1 us a call in Python.
    return a.swapaxes(-1, -2) if hasattr(a, "swapaxes") else xp.matrix_transpose(a)


class Layer:
    """Base: a layer without parameters.  ``params`` names the trainable attributes."""

    params = ()

    def __init__(self, backend, dtype, fast=False):
        self.backend, self.xp, self.dtype = backend, backend.xp, dtype
        self.fast = fast
        self.buffers = Buffers(self.xp, dtype, fast)

    def __repr__(self):
        return f"{type(self).__name__}()"


class Linear(Layer):
    """y = xW + b (Eq. 4); W of shape (in, out) drawn from N(0, init_std^2), b = 0."""

    params = ("W", "b")

    def __init__(self, in_features, out_features, backend, dtype, *, init_std=0.01, rng,
                 stack=(), fast=False):
        super().__init__(backend, dtype, fast)
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
        xp = self.xp
        y = _call(xp.matmul, x, self.W, out=self.buffers.get("y", x.shape[:-1] + (self.out_features,)))
        if not self.fast:
            return y + self.b
        bias_add = self.backend.kernel("bias_add")
        if bias_add is not None and y.ndim == 2:
            return bias_add(y, self.b)
        return xp.add(y, self.b, out=y)

    def backward(self, grad_y, need_input_grad=True):
        """Eq. (5): dL/dW = x^T g, dL/db = sum_n g, dL/dx = g W^T."""
        xp = self.xp
        x_T = matrix_transpose(xp, self.x)
        if self.fast:
            xp.matmul(x_T, grad_y, out=self.grad_W)
            bias_grad = self.backend.kernel("bias_grad")
            if bias_grad is not None and grad_y.ndim == 2:
                bias_grad(grad_y, self.grad_b)
            else:
                grad_y.sum(axis=-2, keepdims=self.b.ndim > 1, out=self.grad_b)
        else:
            self.grad_W = xp.matmul(x_T, grad_y)
            self.grad_b = xp.reshape(xp.sum(grad_y, axis=-2), self.b.shape)
        if not need_input_grad:  # the first layer's input is data: skip a third of the GEMM work
            return None
        return _call(xp.matmul, grad_y, matrix_transpose(xp, self.W),
                     out=self.buffers.get("dx", grad_y.shape[:-1] + (self.in_features,)))

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Layer):
    """y = max(x, 0) (Eq. 6); dy/dx = 1 where x > 0, else 0 (Eq. 7)."""

    def forward(self, x):
        xp = self.xp
        if not self.fast:
            self.y = xp.maximum(x, xp.asarray(0, dtype=x.dtype))
            return self.y
        y = self.buffers.get("y", x.shape)
        relu_forward = self.backend.kernel("relu_forward")
        if relu_forward is not None:
            self.y = relu_forward(x, y)
        else:
            self.y = xp.maximum(x, 0, out=y)
        return self.y

    def backward(self, grad_y, need_input_grad=True):
        xp = self.xp
        if not self.fast:
            return xp.where(self.y > 0, grad_y, xp.zeros_like(grad_y))
        grad_x = self.buffers.get("dx", grad_y.shape)
        relu_backward = self.backend.kernel("relu_backward")
        if relu_backward is not None:
            return relu_backward(self.y, grad_y, grad_x)  # one fused pass
        mask = xp.greater(self.y, 0, out=self.buffers.get("mask", self.y.shape, dtype=bool))
        return xp.multiply(grad_y, mask, out=grad_x)


class Sigmoid(Layer):
    """y = 1 / (1 + e^-x) (Eq. 8, sign corrected); dy/dx = y (1 - y) (Eq. 9).

    Computed from e^-|x| so no exponent ever overflows, in either precision.
    """

    def forward(self, x):
        xp = self.xp
        if not self.fast:
            e = xp.exp(-xp.abs(x))
            self.y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
            return self.y
        y = self.buffers.get("y", x.shape)
        sigmoid_forward = self.backend.kernel("sigmoid_forward")
        if sigmoid_forward is not None:
            self.y = sigmoid_forward(x, y)  # one fused pass
            return self.y
        # The same numbers without a select (a masked copy is ~20x slower than a ufunc):
        # the numerator e^min(x, 0) is e^-|x| where x < 0 and 1 elsewhere.
        denom = self.buffers.get("denom", x.shape)
        xp.exp(xp.negative(xp.abs(x, out=denom), out=denom), out=denom)
        xp.add(denom, 1, out=denom)
        xp.exp(xp.minimum(x, 0, out=y), out=y)
        self.y = xp.divide(y, denom, out=y)
        return y

    def backward(self, grad_y, need_input_grad=True):
        xp = self.xp
        if not self.fast:
            return grad_y * self.y * (1 - self.y)
        dx = self.buffers.get("dx", grad_y.shape)
        sigmoid_backward = self.backend.kernel("sigmoid_backward")
        if sigmoid_backward is not None:
            return sigmoid_backward(self.y, grad_y, dx)
        xp.subtract(1, self.y, out=dx)
        xp.multiply(dx, self.y, out=dx)
        return xp.multiply(dx, grad_y, out=dx)
