"""The compiled training step: a Stepper that hands whole steps to the fused kernels'
compiled ``mlp_steps`` (NumPy + Numba: backends/numpy_step.py) where the model is one it
compiles, so no Python runs between a step's operations.  Chosen once per model, as its
ops are (``make_stepper`` in train.py); the Stepper of the ops stays for everything else.

It keeps the model's own arrays: the layers' W and b stay views into the flat parameter
buffer, their gradients into the flat gradient buffer, and the optimizer's velocity is
the one SGD checkpoints, so evaluation, checkpoints and resume see no difference.

With two threads (threads.py's policy: two where two cores are free) each step's work is
split in halves that a helper thread and the calling one claim (numpy_step.py): the
batch's rows for the forward and backward passes, each layer's weight rows for the
gradients and the update.  The halves are cut where the products give the same bits as
whole ones, so the training is the same, bit for bit, with one thread or two.
"""
import queue
import threading
import time
import weakref

import numpy as np

from .layers import Linear, ReLU, Sigmoid
from .losses import EuclideanLoss, SoftmaxCrossEntropyLoss

SOFTMAX_XENT, SIGMOID_EUCLIDEAN = 0, 1  # the kernel's loss codes (numpy_step.py)
# Two threads win only while both get a core: once another process takes one, a step
# waits for a descheduled helper (2-4x slower epochs, measured).  So each call times its
# steps, the faster way so far runs, and every PROBE_EVERY-th call first tries the other
# way for PROBE_STEPS steps, which bounds what a probe costs on a busy machine; while two
# threads keep losing, the probes grow rarer, down to one in PROBE_MAX calls.
PROBE_EVERY, PROBE_MAX, PROBE_STEPS = 8, 32, 4


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
    compile steps (NumPy + Numba), of a network they compile; one model, or models stacked
    over one leading axis (StackedCompiledStepper)."""
    kernel = getattr(getattr(model.ops, "kernels", None), "mlp_steps", None)
    if kernel is None or model.flat is None or _loss_code(model) is None or len(model.stack) > 1:
        return None
    return kernel(model.dtype)


class _Helper:
    """A daemon thread that runs the compiled step's calls it is handed, taking their
    unclaimed tasks (``tasks``: how many it took); ends when its stepper is collected."""

    def __init__(self, owner):
        self.jobs = queue.SimpleQueue()
        self.tasks = [0]
        threading.Thread(target=self._serve, args=(self.jobs, self.tasks), daemon=True, name="xpmlp-step").start()
        weakref.finalize(owner, self.jobs.put, None)

    @staticmethod
    def _serve(jobs, tasks):  # no reference to the stepper: it can be collected
        while (job := jobs.get()) is not None:
            kernel, args = job
            tasks[0] += kernel(*args)


class Chooser:
    """One thread or two for the next steps: the one whose latest run took less time per
    step, each tried first; every few calls (PROBE_EVERY, or up to PROBE_MAX apart while
    two threads keep losing) the other one is tried first on PROBE_STEPS steps, so a change
    in the machine's load is seen within a few calls.  The latest run, not an average:
    after a busy spell one quick probe brings two threads back, and a lucky probe on a busy
    machine costs one slow call."""

    def __init__(self):
        self.per_step = {1: None, 2: None}
        self.steps_run = {1: 0, 2: 0}  # how many steps each way took
        self.calls, self.interval, self.next_probe = 0, PROBE_EVERY, PROBE_EVERY

    def plan(self, steps):
        """[(threads, steps), ...] for a call of ``steps`` steps."""
        self.calls += 1
        untried = [t for t, v in self.per_step.items() if v is None]
        best = untried[-1] if untried else min(self.per_step, key=self.per_step.get)
        if untried or self.calls < self.next_probe:
            return [(best, steps)]
        self.next_probe = self.calls + self.interval
        probe = min(steps, PROBE_STEPS)
        return [(3 - best, probe)] + ([(best, steps - probe)] if steps > probe else [])

    def record(self, threads, steps, seconds):
        self.per_step[threads] = seconds / steps
        self.steps_run[threads] += steps
        one = self.per_step[1]
        if threads == 2 and one is not None:  # two threads won or lost again
            self.interval = PROBE_EVERY if self.per_step[2] < one else min(2 * self.interval, PROBE_MAX)


class CompiledStepper:
    """Stepper's interface (``step``), plus ``steps`` for several batches in one call.
    ``threads``: 1, or 2 to let a helper thread take half of each step's work where the
    BLAS allows an exact cut: in the calls where that is faster (Chooser), or in all of
    them if not ``adaptive``."""

    def __init__(self, model, optimizer, kernel=None, threads=1, adaptive=True):
        self.model, self.optimizer = model, optimizer
        self.kernel = kernel or compiled_steps(model)
        if self.kernel is None:
            raise ValueError(f"no compiled step for {model!r} on {model.backend!r}")
        self.loss_code = _loss_code(model)
        self.linears = [layer for layer in model.layers if isinstance(layer, Linear)]
        sizes = [layer.W.size + layer.b.size for layer in self.linears]
        self.offsets = np.cumsum([0] + sizes)
        self.threads, self.adaptive = threads, adaptive
        self.chooser = Chooser()
        self._batch = None
        self._sync = np.zeros(2, dtype=np.int64)  # numpy_step.py's CLAIM and DONE words
        self._generation = 0
        self._helper = self._blas = None

    def _cuts(self, batch):
        """(row_cut, feature_cuts, column_cuts) of an exact two-way split for this batch
        size, or None: numpy_step.exact_cut for every product the halves compute."""
        shapes = [layer.W.shape for layer in self.linears]
        rows = [(fan_in, fan_out, False, False) for fan_in, fan_out in shapes]  # forward
        rows += [(fan_out, fan_in, False, True) for fan_in, fan_out in shapes[1:]]  # g @ W^T
        row_cut = self.kernel.cut(batch, rows) if batch >= 8 else None
        features = [self.kernel.cut(fan_in, [(batch, fan_out, True, False)]) for fan_in, fan_out in shapes]
        if row_cut is None or None in features:
            return None
        return row_cut, np.array(features, dtype=np.int64), np.array([n // 2 for _, n in shapes], dtype=np.int64)

    def _buffers(self, x, y, batch):
        """The batch, every layer's output and gradient, each row's loss term and hit, and
        the halves' cuts (None: one part), allocated once per batch size."""
        if self._batch is None or self._batch[0].shape[0] != batch:
            dtype = self.model.dtype
            outputs = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
            grads = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
            # The batch in the model's dtype whatever x's: the products get one dtype.
            self._batch = (np.empty((batch, x.shape[1]), dtype=dtype), np.empty((batch,), dtype=y.dtype),
                           outputs, grads, np.empty(batch), np.empty(batch, dtype=np.int64),
                           self._cuts(batch) if self.threads > 1 else None)
        return self._batch

    def steps(self, x, y, idx, loss_out, acc_out):
        """``len(loss_out)`` steps, on consecutive batches of the rows ``idx`` of (x, y);
        each step's loss and accuracy written into ``loss_out``, ``acc_out``."""
        n = loss_out.shape[0]
        batch = idx.shape[0] // n
        buffers = self._buffers(x, y, batch)
        if buffers[-1] is None:
            return self._run(1, x, y, idx, loss_out, acc_out, buffers)
        done = 0
        for threads, count in self.chooser.plan(n) if self.adaptive else [(2, n)]:
            start = time.perf_counter()
            self._run(threads, x, y, idx[done * batch:(done + count) * batch], loss_out[done:done + count],
                      acc_out[done:done + count], buffers)
            self.chooser.record(threads, count, time.perf_counter() - start)
            done += count

    def _run(self, threads, x, y, idx, loss_out, acc_out, buffers):
        """The steps in one kernel call, in two parts (this thread and the helper) or one."""
        xb, yb, outputs, grads, row_loss, row_hit, cuts = buffers
        flat, opt, t = self.model.flat, self.optimizer, np.dtype(self.model.dtype).type
        (slot,) = opt.slots  # the flat buffers' one slot
        row_cut, feature_cuts, column_cuts = cuts if threads > 1 else (0, self.offsets[:0], self.offsets[:0])
        self._generation += 1
        self._sync[1] = 0
        self._sync[0] = self._generation << 32  # a new call, task 0 next
        args = (x, y, idx, tuple(layer.W for layer in self.linears), tuple(layer.b for layer in self.linears),
                tuple(layer.grad_W for layer in self.linears), tuple(layer.grad_b for layer in self.linears),
                outputs, grads, xb, yb, self.loss_code, flat.params, flat.grads, slot.velocity,
                self.offsets, t(opt.lr), t(opt.momentum), t(opt.weight_decay), loss_out, acc_out,
                row_loss, row_hit, threads, row_cut, feature_cuts, column_cuts, self._sync, self._generation)
        if threads == 1:
            self.kernel(*args, True)
            return
        if self._helper is None:
            from threadpoolctl import ThreadpoolController
            self._helper, self._blas = _Helper(self), ThreadpoolController().select(user_api="blas")
        with self._blas.limit(limits=1):  # each half's products on its own thread
            self._helper.jobs.put((self.kernel, args + (False,)))
            self.kernel(*args, True)

    def step(self, x, y, idx, loss_out, acc_out, i):
        self.steps(x, y, idx, loss_out[i:i + 1], acc_out[i:i + 1])


class StackedCompiledStepper(CompiledStepper):
    """The compiled step of K stacked models (stack.py): each model's step is the one-model
    kernel's, on one thread, on that model's slices of the stacked arrays (its rows of the
    flat buffers), the models in turn, so each computes exactly what it computes alone; a
    frozen model (SGD.freeze) is not stepped.  The steps of ``steps`` go one at a time,
    every model taking step s before any takes step s + 1."""

    def __init__(self, model, optimizer, kernel=None):
        super().__init__(model, optimizer, kernel, threads=1)
        self.offsets = np.cumsum([0] + [layer.W[0].size + layer.b[0].size for layer in self.linears])
        flat, (slot,) = model.flat, optimizer.slots
        # Model m's arrays as the kernel takes one model's: views, so the kernel updates the stack.
        self._models = [(tuple(layer.W[m] for layer in self.linears), tuple(layer.b[m, 0] for layer in self.linears),
                         tuple(layer.grad_W[m] for layer in self.linears),
                         tuple(layer.grad_b[m, 0] for layer in self.linears),
                         flat.params[m], flat.grads[m], slot.velocity[m]) for m in range(model.stack[0])]

    def steps(self, x, y, idx, loss_out, acc_out):
        """``idx``: (n,) rows all models share, or (K, n), one row of indices a model;
        ``loss_out``, ``acc_out``: (steps, K)."""
        n = loss_out.shape[0]
        batch = idx.shape[-1] // n
        xb, yb, outputs, grads, row_loss, row_hit, _ = self._buffers(x, y, batch)
        opt, t, none = self.optimizer, np.dtype(self.model.dtype).type, self.offsets[:0]
        for s in range(n):
            for m, (Ws, bs, grad_Ws, grad_bs, params, grads_m, velocity) in enumerate(self._models):
                if not opt._active_host[m]:
                    continue
                rows = (idx if idx.ndim == 1 else idx[m])[s * batch:(s + 1) * batch]
                self._generation += 1
                self._sync[1] = 0
                self._sync[0] = self._generation << 32
                self.kernel(x, y, rows, Ws, bs, grad_Ws, grad_bs, outputs, grads, xb, yb, self.loss_code,
                            params, grads_m, velocity, self.offsets, t(opt.lr[m]), t(opt.momentum[m]),
                            t(opt.weight_decay[m]), loss_out[s:s + 1, m], acc_out[s:s + 1, m], row_loss, row_hit,
                            1, 0, none, none, self._sync, self._generation, True)
