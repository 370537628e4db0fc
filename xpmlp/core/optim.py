"""SGD with momentum and weight decay, written by hand.

For every W and b alike:  v <- m*v + (g + wd*p);  p <- p - lr*v
which is torch.optim.SGD with dampening 0 (the first step gives v = g + wd*p).

The rule is written once, as the ops' ``sgd_update``, and applied to each slot: a
(parameter, gradient, velocity) triple.  A model whose ops update in place keeps every
parameter in one flat buffer, so it has one slot and a step is one pass; on the plain
path each parameter is a slot of its own, and the update rebinds it.

For K stacked models (``model.stack == (K,)``) each hyperparameter may be one value or
K values, kept on the device as a (K,) array and given to the rule as a column that
broadcasts over each model's rows; ``freeze(k)`` masks model k's updates from then on.
"""
import numpy as np

from .ops import Scratch


class ParamSlot:
    """One parameter of a layer (the plain path), its gradient and its velocity."""

    def __init__(self, layer, name, velocity):
        self.layer, self.name, self.velocity = layer, name, velocity

    @property
    def param(self):
        return getattr(self.layer, self.name)

    @param.setter
    def param(self, value):
        setattr(self.layer, self.name, value)

    @property
    def grad(self):
        return getattr(self.layer, "grad_" + self.name)

    def velocities(self):
        return [self.velocity]

    def load_velocities(self, arrays):
        (self.velocity,) = arrays


class FlatSlot:
    """Every parameter at once: the model's flat buffers, updated in place."""

    def __init__(self, flat, velocity):
        self.flat, self.param, self.grad, self.velocity = flat, flat.params, flat.grads, velocity

    def velocities(self):
        """The velocity as views shaped like each parameter (for checkpoints)."""
        return self.flat.split(self.velocity)

    def load_velocities(self, arrays):
        for view, a in zip(self.velocities(), arrays):
            view[...] = a


class SGD:
    def __init__(self, model, lr=0.01, momentum=0.0, weight_decay=0.0):
        self.model, self.ops = model, model.ops
        self.stacked = bool(model.stack)
        if self.stacked:
            lr, momentum, weight_decay = (self._per_model(h) for h in (lr, momentum, weight_decay))
            self._active_host = [True] * model.stack[0]
            self.active = model.backend.asarray(self._active_host)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        xp = model.xp
        if model.flat is not None:
            self.slots = [FlatSlot(model.flat, xp.zeros_like(model.flat.params))]
        else:
            self.slots = [ParamSlot(layer, name, xp.zeros_like(getattr(layer, name)))
                          for layer, name in model.parameters()]
        self.scratch = Scratch(xp, model.dtype)

    def set_lr(self, lr):
        """The learning rate from the next step on: one value, or one a stacked model."""
        self.lr = self._per_model(lr) if self.stacked else lr

    def _per_model(self, value):
        """One hyperparameter as a (K,) device array of the model's dtype."""
        host = np.broadcast_to(np.asarray(value, dtype=np.float64), self.model.stack)
        return self.model.backend.asarray(host, dtype=self.model.dtype)

    def freeze(self, k):
        """Stop updating stacked model ``k`` (it diverged): its weights and velocity stay
        as they are, and the other models' updates are unaffected."""
        self._active_host[k] = False
        self.active = self.model.backend.asarray(self._active_host)

    def active_models(self):
        """The stacked models not frozen, by index (on the host)."""
        return [k for k, on in enumerate(self._active_host) if on]

    def step(self):
        if self.stacked:
            return self._step_stacked()
        for slot in self.slots:
            slot.param, slot.velocity = self.ops.sgd_update(
                slot.param, slot.grad, slot.velocity, self.lr, self.momentum, self.weight_decay, self.scratch)

    def _step_stacked(self):
        xp = self.model.xp
        for slot in self.slots:
            def column(h, ndim=slot.param.ndim):  # (K,) -> (K, 1, ...) over the slot's rows
                return xp.reshape(h, (h.shape[0],) + (1,) * (ndim - 1))
            if isinstance(slot, FlatSlot) and slot.flat.by_layer:  # CUDA's layout: its own kernel
                self.ops.sgd_update_by_layer(slot.flat, slot.param, slot.grad, slot.velocity, self.lr,
                                             self.momentum, self.weight_decay, self.scratch,
                                             active=None if all(self._active_host) else self.active)
                continue
            active = None if all(self._active_host) else column(self.active)
            slot.param, slot.velocity = self.ops.sgd_update(
                slot.param, slot.grad, slot.velocity, column(self.lr), column(self.momentum),
                column(self.weight_decay), self.scratch, active=active)

    def flush_denormals(self):
        """Set parameters and velocities smaller than the dtype's smallest normal number
        to zero.  Weight decay shrinks the weights of a dead network geometrically into
        denormals, which x86 CPUs compute in slow microcode (a 40x slower epoch was
        measured); the trainer calls this once per epoch, a negligible cost."""
        for slot in self.slots:
            slot.param, slot.velocity = self.ops.flush_denormals(slot.param), self.ops.flush_denormals(slot.velocity)

    def state(self):
        """Velocity as a list of arrays, one per parameter (for checkpoints)."""
        return [v for slot in self.slots for v in slot.velocities()]

    def load_state(self, arrays):
        arrays = list(arrays)
        for slot in self.slots:
            n = len(slot.velocities())
            slot.load_velocities(arrays[:n])
            arrays = arrays[n:]
