"""A sequential model, the report's ten networks by name, and a general builder."""
import numpy as np

from .layers import Linear, ReLU, Sigmoid
from .losses import EuclideanLoss, SoftmaxCrossEntropyLoss, accuracy  # noqa: F401 (re-exported)
from .ops import ops_for

# The names the builder, the config check and the CLI's choices all take from here.
ACTIVATIONS = {"sigmoid": Sigmoid, "relu": ReLU}
LOSSES = {"mse": EuclideanLoss, "sce": SoftmaxCrossEntropyLoss}
DTYPES = ("float32", "float64")

# The report's networks (Tables 1-10): hidden sizes, activation, loss.
MODELS = {
    **{f"mlp0-{loss}": ((), None, loss) for loss in LOSSES},
    **{f"mlp1-{act}-{loss}": ((256,), act, loss) for loss in LOSSES for act in ACTIVATIONS},
    **{f"mlp2-{act}-{loss}": ((256, 128), act, loss) for loss in LOSSES for act in ACTIVATIONS},
}


class FlatBuffers:
    """All parameters in one contiguous array and all gradients in another.

    Layers hold views into them, so the optimizer updates every W and b with a
    handful of whole-buffer operations instead of one small kernel each.  With
    ``stack=(K,)`` the buffers are (K, P), one row per stacked model, so per-model
    hyperparameters broadcast as a (K, 1) column over the whole buffer, and each model's
    parameters are one contiguous row (the CPU's compiled step runs a model on its row).

    ``by_layer`` (stacked models on a GPU) lays the buffers out parameter by parameter
    instead: all K models' W of a layer, then their b, and so on, so that each stacked W is
    one contiguous (K, in, out) block, which CuPy's matmul takes without copying it.  The
    ops that ask for it (``stack_by_layer``) update the buffers in one pass that finds each
    value's model from ``blocks``.
    """

    def __init__(self, xp, arrays, dtype, stack=(), by_layer=False):
        self.stack = tuple(stack)
        self.by_layer = bool(by_layer and self.stack)
        lead = len(self.stack)
        self.shapes = [tuple(a.shape) for a in arrays]
        self.sizes = [int(np.prod(s[lead:])) for s in self.shapes]
        total = sum(self.sizes)
        shape = (int(np.prod(self.stack)) * total,) if self.by_layer else self.stack + (total,)
        self.params = xp.empty(shape, dtype=dtype)
        self.grads = xp.zeros(shape, dtype=dtype)
        if self.by_layer:  # on the device once: where each parameter's block starts (then the
            # buffers' length), and its values a model
            starts = np.cumsum([0, *self.sizes]) * int(np.prod(self.stack))
            self.blocks = (xp.asarray(starts, dtype=xp.int64), xp.asarray(self.sizes, dtype=xp.int64))
        for view, a in zip(self.split(self.params), arrays):
            view[...] = a

    def split(self, flat):
        """Views of ``flat`` shaped like each parameter, in order."""
        views, start = [], 0
        models = int(np.prod(self.stack)) if self.by_layer else 1
        for shape, size in zip(self.shapes, self.sizes):
            if self.by_layer:
                views.append(flat[models * start:models * (start + size)].reshape(shape))
            else:
                views.append(flat[..., start:start + size].reshape(shape))
            start += size
        return views


class PerModelNormal:
    """Draws stacked weights of shape (K, ...) with model k's values from its own
    ``numpy.random.Generator(seeds[k])`` and std ``stds[k]``: each stacked model starts
    from exactly the weights its separate run would draw."""

    def __init__(self, seeds, stds):
        self.rngs = [np.random.default_rng(seed) for seed in seeds]
        self.stds = list(stds)

    def normal(self, loc, scale, size):  # ``scale`` is ignored: each model has its own std
        return np.stack([rng.normal(loc, std, size=size[1:]) for rng, std in zip(self.rngs, self.stds)])


class Sequential:
    """Layers applied in order, then a loss, all computing with one ops object (``ops``,
    by default the loss's).

    Where the ops update in place (buffered, fused), parameters and gradients live in
    flat buffers, so that the optimizer has one slot to update.
    """

    def __init__(self, layers, loss, backend, dtype, ops=None, stack=()):
        self.layers, self.loss = list(layers), loss
        self.backend, self.xp, self.dtype = backend, backend.xp, dtype
        self.ops = ops if ops is not None else loss.ops
        self.stack = tuple(stack)  # (K,) for K models over a leading axis
        self.flat = None
        if self.ops.in_place:
            pairs = self.parameters()
            self.flat = FlatBuffers(self.xp, [getattr(layer, name) for layer, name in pairs], dtype,
                                    stack=self.stack, by_layer=getattr(self.ops, "stack_by_layer", False))
            for (layer, name), p, g in zip(pairs, self.flat.split(self.flat.params),
                                           self.flat.split(self.flat.grads)):
                setattr(layer, name, p)
                setattr(layer, "grad_" + name, g)

    def parameters(self):
        """(layer, attribute name) for every trainable array, in order."""
        return [(layer, name) for layer in self.layers for name in layer.params]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad, need_input_grad=False):
        """Back-propagate ``grad`` (dL/d output), filling every layer's grad_W and grad_b.

        Returns dL/dx only when ``need_input_grad``: the input is data, and skipping
        its gradient saves the largest GEMM of the step.
        """
        for i in range(len(self.layers) - 1, -1, -1):
            need = need_input_grad or i > 0
            grad = self.layers[i].backward(grad, need_input_grad=need)
            if grad is None:
                break
        return grad

    def predict(self, x):
        """Class indices, the arg-max of the output."""
        return self.xp.argmax(self.forward(x), axis=-1)

    def state_arrays(self):
        """Parameters as host NumPy arrays, in ``parameters()`` order."""
        return [self.backend.to_numpy(getattr(layer, name)) for layer, name in self.parameters()]

    def load_state_arrays(self, arrays):
        for (layer, name), a in zip(self.parameters(), arrays):
            value = self.backend.asarray(a, dtype=self.dtype)
            if self.flat is not None:
                getattr(layer, name)[...] = value
            else:
                setattr(layer, name, value)

    def __repr__(self):
        return f"Sequential({', '.join(map(repr, self.layers))}; loss={self.loss!r})"


def build_mlp(hidden, activation, loss, *, backend="numpy", dtype="float32", init_std=0.01,
              seed=0, stack=(), ops=None, in_features=784, num_classes=10):
    """An MLP with the given hidden sizes.  Euclidean-loss networks end in a Sigmoid
    (report Section 2); softmax cross-entropy networks end in the last Linear.

    ``ops``: 'plain' (the Array API reference), 'buffered' (out= buffers, NumPy and CuPy)
    or 'fused' (the backend's kernels); by default the fastest the backend has.

    ``stack=(K,)`` builds K models over a leading axis.  With a scalar ``seed`` one
    generator draws all their weights; with K seeds (and a scalar or K values of
    ``init_std``) model k draws exactly what ``build_mlp(seed=seed[k], ...)`` draws."""
    from ..backends import get_backend

    backend = get_backend(backend)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if hidden and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
    if np.dtype(dtype).name not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    ops = ops_for(backend, ops)
    xp_dtype = backend.dtype(dtype)
    if np.ndim(seed):
        if len(stack) != 1 or len(seed) != stack[0]:
            raise ValueError(f"{len(seed)} seeds for stack={tuple(stack)}: give one seed per stacked model")
        init_std = np.broadcast_to(init_std, (len(seed),))
        rng = PerModelNormal(seed, init_std)
    else:
        rng = np.random.default_rng(seed)
    sizes = [in_features, *hidden, num_classes]
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Linear(n_in, n_out, backend, xp_dtype, init_std=init_std, rng=rng,
                             stack=stack, ops=ops))
        if i < len(hidden):
            layers.append(ACTIVATIONS[activation](backend, xp_dtype, ops=ops))
    if loss == "mse":
        layers.append(Sigmoid(backend, xp_dtype, ops=ops))
    return Sequential(layers, LOSSES[loss](backend, xp_dtype, ops=ops), backend, xp_dtype, ops, stack=stack)


def build_model(name, *, backend="numpy", dtype="float32", init_std=0.01, seed=0, stack=(),
                ops=None):
    """One of the report's ten networks by name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    hidden, activation, loss = MODELS[name]
    return build_mlp(hidden, activation, loss, backend=backend, dtype=dtype, init_std=init_std,
                     seed=seed, stack=stack, ops=ops)
