"""SGD with momentum and weight decay, written by hand.

For every W and b alike:  v <- m*v + (g + wd*p);  p <- p - lr*v
which is torch.optim.SGD with dampening 0 (the first step gives v = g + wd*p).
"""


class SGD:
    def __init__(self, model, lr=0.01, momentum=0.0, weight_decay=0.0):
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        xp = model.xp
        if model.flat is not None:
            # One velocity buffer matching the flat parameter buffer: a step is whole-buffer ops.
            self.velocity = xp.zeros_like(model.flat.params)
            self._scratch = xp.empty_like(model.flat.params)
        else:
            self.velocity = [xp.zeros_like(getattr(layer, name)) for layer, name in model.parameters()]

    def step(self):
        lr, m, wd = self.lr, self.momentum, self.weight_decay
        flat = self.model.flat
        sgd_step = self.model.backend.kernel("sgd_step") if flat is not None else None
        if sgd_step is not None:  # one fused pass over the flat buffers
            sgd_step(flat.params, flat.grads, self.velocity, lr, m, wd)
            return
        if flat is not None:
            xp, v, tmp = self.model.xp, self.velocity, self._scratch
            xp.multiply(flat.params, wd, out=tmp)
            xp.add(flat.grads, tmp, out=tmp)
            xp.multiply(v, m, out=v)
            xp.add(v, tmp, out=v)
            xp.multiply(v, lr, out=tmp)
            xp.subtract(flat.params, tmp, out=flat.params)
            return
        for i, (layer, name) in enumerate(self.model.parameters()):
            p, g = getattr(layer, name), getattr(layer, "grad_" + name)
            self.velocity[i] = m * self.velocity[i] + (g + wd * p)
            setattr(layer, name, p - lr * self.velocity[i])

    def flush_denormals(self):
        """Set parameters and velocities smaller than the dtype's smallest normal number
        to zero.  Weight decay shrinks the weights of a dead network geometrically into
        denormals, which x86 CPUs compute in slow microcode (a 40x slower epoch was
        measured); the trainer calls this once per epoch, a negligible cost."""
        xp, flat = self.model.xp, self.model.flat
        if flat is not None:
            for a in (flat.params, self.velocity):
                a[xp.abs(a) < xp.finfo(a.dtype).smallest_normal] = 0
            return

        def flushed(a):
            return xp.where(xp.abs(a) < xp.finfo(a.dtype).smallest_normal, xp.zeros_like(a), a)

        for i, (layer, name) in enumerate(self.model.parameters()):
            setattr(layer, name, flushed(getattr(layer, name)))
            self.velocity[i] = flushed(self.velocity[i])

    def state(self):
        """Velocity as a list of arrays, one per parameter (for checkpoints)."""
        if self.model.flat is not None:
            return self.model.flat.split(self.velocity)
        return list(self.velocity)

    def load_state(self, arrays):
        if self.model.flat is not None:
            for view, a in zip(self.model.flat.split(self.velocity), arrays):
                view[...] = a
        else:
            self.velocity = list(arrays)
