"""The compiled training step: a Stepper that hands whole steps to the fused kernels'
compiled ``mlp_steps`` (NumPy + Numba: backends/numpy_step.py) where the model is one it
compiles, so no Python runs between a step's operations.  Chosen once per model, as its
ops are (``make_stepper`` in loop.py); the Stepper of the ops stays for everything else.

It keeps the model's own arrays: the layers' W and b stay views into the flat parameter
buffer, their gradients into the flat gradient buffer, and the optimizer's velocity is
the one SGD checkpoints, so evaluation, checkpoints and resume see no difference.

With P threads (threads.py's policy: one a core this process may run on) each step's work
is split in parts that P - 1 helper threads and the calling one claim (numpy_step.py):
the batch's rows for the forward and backward passes (a large layer's outputs instead,
COLUMNS_MIN_BYTES), each layer's weight rows for the gradients and the update (on a small
batch in blocks, also on one thread: SMALL_BATCH).  The parts are cut where the products
give the same bits as whole ones, so the training is the same, bit for bit, with one
thread or P.  Only a
product big enough to share is split: at most one part per ROWS_PER_PART batch rows
(and two parts always where the batch allows a cut), so a small batch keeps few threads.
Stacked models split by model instead (StackedCompiledStepper).  A Chooser times the
calls and goes back to one thread while that is faster (a busy machine).
"""
import queue
import sys
import threading
import time
import weakref

import numpy as np

from ..core.layers import Linear, ReLU, Sigmoid
from ..core.losses import EuclideanLoss, SoftmaxCrossEntropyLoss

# Two threads win only while both get a core: once another process takes one, a step
# waits for a descheduled helper (2-4x slower epochs, measured).  So each call times its
# steps, the faster way so far runs, and every so often (PROBE_MIN_S after the way changed,
# up to PROBE_MAX_S apart while the other way keeps losing) a call first tries the other
# way for PROBE_STEPS steps: a probe costs little on a busy machine, and the end of a busy
# spell is seen within PROBE_MAX_S (a fraction of an epoch), whatever the call's length.
# A probe is PROBE_STEPS steps, or as many of the running way's as take PROBE_S where steps
# are long (a wide network's take ~10-20 ms: 8 of them every 0.4 s made 20-40% of its steps
# probes): a few time slices, since a probe of 4 steps of mlp2 (~3 ms, about one slice)
# often won by luck on a busy machine, and the call after it lost; and not one step of
# mlp2, whose time a call's fixed costs (waking the helper) sway.
PROBE_MIN_S, PROBE_MAX_S, PROBE_STEPS, PROBE_S = 0.05, 0.4, 8, 0.008
# Batch rows a part of a step takes at least, beyond two parts: below ~16 rows a product's
# share of work no longer pays for another thread's wake-up and waits (two waits a step).
ROWS_PER_PART = 16
# On a small batch a layer's weight gradient costs few operations an element and is written
# whole before its update reads it back, by then out of cache where it is large: so at most
# SMALL_BATCH rows, each layer's weight rows are taken in parts of at most BLOCK_BYTES of
# gradient (more parts than threads), each part's product updated while it is in cache.
# Measured (`xpmlp train`, mlp2-relu-sce, one pinned thread, epoch medians): 0.85x the
# epoch at batch 5 and 10, 0.90x at 16; 0.98-1.02x at 20, 30 and 50, so not there.  256 KB
# blocks did as well as 128 KB, 512 KB less well (0.93x); 128 KB with the weights and
# momenta beside them fits a 512 KB L2.
SMALL_BATCH, BLOCK_BYTES = 16, 128 * 1024
# A layer whose W takes at least COLUMNS_MIN_BYTES is split by its outputs (W's columns)
# between the threads, with the layers before it, not by the batch's rows: split by rows,
# each thread's product packs all of W, the same work on every thread.  Measured, the wide
# network's forward and backward products (784 x 2048, 2048 x 1024; batch 100) on two
# threads: 0.67x one thread's time split by rows, 0.55x by columns (OpenBLAS's own two
# threads: 0.56x).  Each such layer's phase is one more wait a step.  `xpmlp train`, two
# cores, defaults, epoch medians, by columns against by rows: the wide network 0.91x,
# --hidden 1024 0.84x, mlp2-relu-sce (784 x 256 first) 0.89x, mlp1-sigmoid-sce 0.83-0.90x,
# mlp1-relu-mse 0.87x; mlp2's 256 x 128 second layer by columns too (64 KB): 1.01-1.03x.
COLUMNS_MIN_BYTES = 512 * 1024
# The last layer's product may be computed whole by every part (numpy_step._rows) where no
# cut keeps its bits, if its outputs are this few (the classes): a small share of a step.
WHOLE_LAST_MAX_OUTPUTS = 16


def _network(model):
    """(loss, activation): the names (keys of the kernel's LOSS_CODES and ACTIVATION_CODES)
    of the model's loss and hidden activation, or None where the kernel compiles no such
    network: Linear (Act Linear)* with one Act, ReLU or Sigmoid, throughout, then softmax
    cross-entropy, or then Sigmoid + Euclidean."""
    layers = model.layers
    if isinstance(model.loss, SoftmaxCrossEntropyLoss):
        loss = "softmax_xent"
    elif isinstance(model.loss, EuclideanLoss) and layers and isinstance(layers[-1], Sigmoid):
        loss, layers = "sigmoid_euclidean", layers[:-1]
    else:
        return None
    acts = {type(layer) for layer in layers[1::2]}
    linear = all(isinstance(layer, Linear) for layer in layers[0::2])
    if not (layers and len(layers) % 2 == 1 and linear and len(acts) <= 1 and acts <= {ReLU, Sigmoid}):
        return None
    return loss, "sigmoid" if acts == {Sigmoid} else "relu"


_said = set()


def _say_once(line):
    """A notice on stderr, once per process: which step a run takes instead, and why."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


def compiled_steps(model):
    """The compiled step for this model, or None: only a model on fused ops whose kernels
    compile steps (NumPy + Numba), of a network they compile; one model, or models stacked
    over one leading axis (StackedCompiledStepper).  Where this machine's setup, not the
    network, is why it has none (no Numba, no GEMM it can call), or where the step calls
    another BLAS than NumPy's, it says so in one line on stderr, once."""
    build = getattr(model.backend, "mlp_steps", None)  # NumPy's backend: backends/numpy_step.py
    if build is None or model.flat is None or _network(model) is None or len(model.stack) > 1:
        return None
    kernel, why = build(model.dtype)
    if kernel is None:
        if why == "Numba is not installed":
            _say_once(f"xpmlp: Numba is not installed, so training takes the {model.ops.name} ops' step, not the "
                      "compiled one (about 2x slower); pip install 'xpmlp[fast]'")
        else:
            _say_once(f"xpmlp: no compiled step: {why}; training takes the fused ops' step (up to 1.6x slower)")
        return None
    if getattr(model.ops, "kernels", None) is None:  # the caller chose array ops
        return None
    if not kernel.source.numpys:
        _say_once(f"xpmlp: the compiled step calls {kernel.source}, as NumPy's BLAS has no GEMM it can call; "
                  "its results agree with the array path's to rounding, not bit for bit")
    return kernel


def step_record(stepper):
    """What config.json records of a run's step, to explain its speed afterwards: "step" is
    "compiled" (with "step_gemm", the GEMM it calls) or the ops' step ("fused ops",
    "buffered ops", "plain ops")."""
    kernel = getattr(stepper, "kernel", None)
    if kernel is not None:
        source = getattr(kernel, "source", None)
        return {"step": "compiled", **({"step_gemm": str(source)} if source is not None else {})}
    return {"step": f"{stepper.model.ops.name} ops"}


def _new_call(sync, generation):
    """Count a new kernel call in ``generation`` (a one-item list) and reset its ``sync``
    words (numpy_step.py): this call's generation, task 0 next, none done.  Returns the
    generation."""
    generation[0] += 1
    sync[1] = 0
    sync[0] = generation[0] << 32
    return generation[0]


class _Helper:
    """A daemon thread that runs the calls it is handed (a kernel's, or a function's that
    steps stacked models), each returning how many tasks it took (``tasks``: the sum);
    ends when its stepper is collected."""

    def __init__(self, owner):
        self.jobs = queue.SimpleQueue()
        self.tasks, self.errors = [0], []  # errors: raised again on the calling thread (raise_error)
        threading.Thread(target=self._serve, args=(self.jobs, self.tasks, self.errors), daemon=True,
                         name="xpmlp-step").start()
        weakref.finalize(owner, self.jobs.put, None)

    @staticmethod
    def _serve(jobs, tasks, errors):
        # No reference to the stepper, nor to a finished job (a stacked job's function holds
        # the stepper) while waiting for the next: the stepper can be collected.
        while (job := jobs.get()) is not None:
            try:
                tasks[0] += job[0](*job[1])
            except Exception as exc:  # noqa: BLE001 - the thread stays, for the next calls
                errors.append(exc)
            del job

    def raise_error(self):
        """Raise, on the calling thread, what a call of the helper raised."""
        if self.errors:
            raise self.errors.pop()


class Chooser:
    """One thread or ``threads`` (the split way) for the next steps: the one whose latest
    run took less time per step, each tried first; a probe of the other one (PROBE_STEPS
    steps first in a call, fewer where they would take over PROBE_S) when its time comes,
    by the clock: PROBE_MIN_S after the way changed, twice as long after each probe that
    lost, at most PROBE_MAX_S.  The latest run, not an average:
    after a busy spell one quick probe brings two threads back.  A probe that wins runs the
    rest of its call too, which confirms it or not: on a busy machine a lucky probe costs
    the rest of one call and counts as a probe that lost, so it does not make probes come
    sooner."""

    def __init__(self, clock=time.perf_counter, threads=2):
        self.per_step = {1: None, threads: None}
        self.steps_run = {1: 0, threads: 0}  # how many steps each way took
        self.split = threads
        self.clock, self.interval, self.next_probe = clock, PROBE_MIN_S, None
        self.probing = self.confirming = None  # the way a probe tries; the way a probe just chose

    def best(self):
        untried = [t for t, v in self.per_step.items() if v is None]
        return untried[-1] if untried else min(self.per_step, key=self.per_step.get)

    def plan(self, steps):
        """(threads, steps) for each part of a call of ``steps`` steps, in turn: each
        decided after the parts before it were recorded."""
        best, now = self.best(), self.clock()
        if None in self.per_step.values() or self.confirming or now < self.next_probe:
            yield best, steps
            return
        other = self.split if best == 1 else 1
        self.next_probe, self.probing = now + self.interval, other  # until the probe's outcome sets it
        # By the steps of the way that runs (the other's latest time may be a busy spell's):
        # the probe's time is what a call's fixed costs do not sway.
        probe = min(steps, PROBE_STEPS, max(1, int(PROBE_S / self.per_step[best])))
        yield other, probe
        if steps > probe:
            yield self.best(), steps - probe

    def record(self, threads, steps, seconds):
        before = self.best()
        probed, confirmed = threads == self.probing, threads == self.confirming
        self.probing = self.confirming = None
        self.per_step[threads] = seconds / steps
        self.steps_run[threads] += steps
        if None in self.per_step.values():
            return
        changed = self.best() != before
        if probed and changed:  # the probe won: the next steps confirm it, or not
            self.confirming = threads
            return
        if confirmed and changed:  # a probe's luck: as a probe that lost
            self.interval = min(2 * self.interval, PROBE_MAX_S)
        elif changed or confirmed or self.next_probe is None:  # a new way: look again soon
            self.interval = PROBE_MIN_S
        elif probed:  # the other way lost again: look again later
            self.interval = min(2 * self.interval, PROBE_MAX_S)
        else:
            return
        self.next_probe = self.clock() + self.interval


class CompiledStepper:
    """Stepper's interface (``step``), plus ``steps`` for several batches in one call.
    ``threads``: 1, or P > 1 to let helper threads take parts of each step's work where the
    BLAS allows exact cuts (as many parts as the batch is worth, at most P): in the calls
    where that is faster (Chooser), or in all of them if not ``adaptive``."""

    def __init__(self, model, optimizer, kernel=None, threads=1, adaptive=True):
        self.model, self.optimizer = model, optimizer
        self.kernel = kernel or compiled_steps(model)
        if self.kernel is None:
            raise ValueError(f"no compiled step for {model!r} on {model.backend!r}")
        loss, activation = _network(model)
        self.loss_code, self.act = self.kernel.LOSS_CODES[loss], self.kernel.ACTIVATION_CODES[activation]
        self.linears = [layer for layer in model.layers if isinstance(layer, Linear)]
        sizes = [layer.W.size + layer.b.size for layer in self.linears]
        self.offsets = np.cumsum([0] + sizes)
        self.threads, self.adaptive = threads, adaptive
        self.chooser = Chooser(threads=threads)
        self._batch = None
        self._sync = np.zeros(2, dtype=np.int64)  # numpy_step.py's CLAIM and DONE words
        self._generation = [0]  # the kernel calls so far (_new_call)
        self._helpers, self._blas = [], None
        self._exact_bounds = {}  # _exact's answers

    def parts_for(self, batch):
        """How many parts a step of ``batch`` rows is split in, at most: 1 on one thread; else
        two, and one more per ROWS_PER_PART rows beyond, up to the threads."""
        if self.threads == 1 or batch < 8:
            return 1
        return max(2, min(self.threads, batch // ROWS_PER_PART))

    def _cuts(self, batch):
        """(row_bounds, feature_bounds, column_bounds, whole_ins, whole_outs,
        forward_columns, backward_columns) of an exact split of a step of this batch size in
        as many parts as it is worth (parts_for, else fewer where no exact cut is found), or
        None: numpy_step.exact_bounds for every product the parts compute.  Where only the
        last layer's forward product has no exact cut and it has few outputs, every part
        computes it whole (whole_ins and whole_outs: a batch-sized input and output a part;
        else none, as _one_part's).  Wide first layers go by columns (_column_bounds)."""
        shapes = [layer.W.shape for layer in self.linears]
        with self._one_blas_thread():  # as each part will run
            for parts in range(self.parts_for(batch), 1, -1):
                by_columns = self._column_bounds(batch, parts)
                first = len(by_columns[0])  # the rows' phase starts at this layer (its products alone)
                forward = [(fan_in, fan_out, False, False) for fan_in, fan_out in shapes[first:]]
                backward = [(fan_out, fan_in, False, True) for fan_in, fan_out in shapes[max(first, 1):]]  # g @ W^T
                row_bounds, whole = self.kernel.bounds(batch, forward + backward, parts), False
                if row_bounds is None and shapes[-1][1] <= WHOLE_LAST_MAX_OUTPUTS:
                    row_bounds, whole = self.kernel.bounds(batch, forward[:-1] + backward, parts), True
                features = self._feature_bounds(batch, parts)
                if row_bounds is not None and features is not None:
                    fan_in, fan_out = shapes[-1]
                    wholes = ((np.zeros((parts, batch, fan_in), dtype=self.model.dtype),
                               np.zeros((parts, batch, fan_out), dtype=self.model.dtype)) if whole
                              else self._one_part(batch)[3:5])
                    return (np.array(row_bounds, dtype=np.int64), *features, *wholes, *by_columns)
        return None

    def _column_bounds(self, batch, parts):
        """(forward_columns, backward_columns), numpy_step.steps' arguments: the outputs of
        the first layers (all but the last) whose W takes COLUMNS_MIN_BYTES or more, cut
        exactly in ``parts``, and their output gradients; empty where there are none, or
        where a cut keeps no bits."""
        shapes = [layer.W.shape for layer in self.linears]
        itemsize = np.dtype(self.model.dtype).itemsize
        count = 0
        while count < len(shapes) - 1 and shapes[count][0] * shapes[count][1] * itemsize >= COLUMNS_MIN_BYTES:
            count += 1
        forward = [self.kernel.bounds(fan_out, [(fan_in, batch, False, False)], parts, columns=True)
                   for fan_in, fan_out in shapes[:count]]
        backward = [self.kernel.bounds(fan_in, [(fan_out, batch, False, True)], parts, columns=True)
                    for fan_in, fan_out in shapes[1:count]]  # layer k - 1's output gradient: g @ W[k]^T
        if None in forward + backward:
            count, forward, backward = 0, [], []
        return (np.array(forward, dtype=np.int64).reshape(count, parts + 1),
                np.array(backward, dtype=np.int64).reshape(max(count - 1, 0), parts + 1))

    def _feature_bounds(self, batch, parts):
        """(feature_bounds, column_bounds): each layer's weight rows cut exactly in ``parts``
        parts, or in more on a small batch (SMALL_BATCH, BLOCK_BYTES); a layer in fewer parts
        than the most has empty ones last.  None where a layer has no exact cut."""
        shapes = [layer.W.shape for layer in self.linears]
        itemsize = np.dtype(self.model.dtype).itemsize
        features = []
        for fan_in, fan_out in shapes:
            blocks = -(-fan_in * fan_out * itemsize // BLOCK_BYTES) if batch <= SMALL_BATCH else 1
            counts = [max(parts, min(blocks, fan_in // 8))]  # the blocks, else half as many, ..., a part a thread
            while counts[-1] > parts:
                counts.append(max(parts, counts[-1] // 2))
            bounds = next((bounds for count in counts if (bounds := self._exact(fan_in, batch, fan_out, count))), None)
            if bounds is None:
                return None
            features.append(list(bounds))
        most = max(len(bounds) for bounds in features) - 1
        features = [bounds + bounds[-1:] * (most + 1 - len(bounds)) for bounds in features]
        columns = [[n * j // most for j in range(most + 1)] for _, n in shapes]
        return np.array(features, dtype=np.int64), np.array(columns, dtype=np.int64)

    def _exact(self, fan_in, batch, fan_out, parts):
        """A weight gradient's rows cut exactly in ``parts`` (kernel.bounds), or None; found
        once (one thread's bounds and the split's ask for the same blocks)."""
        key = (fan_in, batch, fan_out, parts)
        if key not in self._exact_bounds:
            self._exact_bounds[key] = self.kernel.bounds(fan_in, [(batch, fan_out, True, False)], parts)
        return self._exact_bounds[key]

    def _one_thread(self, batch):
        """The bounds of a step on one thread: the rows in one part, the weight rows in one
        or, on a small batch, more (_feature_bounds), no whole product."""
        with self._one_blas_thread():
            features = self._feature_bounds(batch, 1)
        one = self._one_part(batch)
        return one if features is None else (one[0], *features, *one[3:])

    def _one_part(self, batch):
        """The bounds of a step in one part, no whole product, no layer by columns (steps'
        arguments)."""
        shapes = [layer.W.shape[-2:] for layer in self.linears]
        none, by_rows = np.zeros((1, 0, 0), dtype=self.model.dtype), np.zeros((0, 2), dtype=np.int64)
        return (np.array([0, batch], dtype=np.int64), np.array([[0, f] for f, _ in shapes], dtype=np.int64),
                np.array([[0, n] for _, n in shapes], dtype=np.int64), none, none, by_rows, by_rows)

    def _new_buffers(self, x, y, batch):
        """A step's work arrays: the batch, every layer's output and gradient, each row's
        loss term and hit."""
        dtype = self.model.dtype
        outputs = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
        grads = tuple(np.empty((batch, layer.out_features), dtype=dtype) for layer in self.linears)
        # The batch in the model's dtype whatever x's: the products get one dtype.
        return (np.empty((batch, x.shape[1]), dtype=dtype), np.empty((batch,), dtype=y.dtype),
                outputs, grads, np.empty(batch), np.empty(batch, dtype=np.int64))

    def _buffers(self, x, y, batch):
        """_new_buffers, the bounds of a step on one thread and the split's cuts (None: no
        split), made once per batch size."""
        if self._batch is None or self._batch[0].shape[0] != batch:
            self._batch = self._new_buffers(x, y, batch) + (
                self._one_thread(batch), self._cuts(batch) if self.threads > 1 else None)
        return self._batch

    def steps(self, x, y, idx, loss_out, acc_out):
        """``len(loss_out)`` steps, on consecutive batches of the rows ``idx`` of (x, y);
        each step's loss and accuracy written into ``loss_out``, ``acc_out``."""
        n = loss_out.shape[0]
        buffers = self._buffers(x, y, idx.shape[0] // n)
        self._chosen(buffers[-1] is not None, idx, loss_out, acc_out,
                     lambda threads, *part: self._run(threads, x, y, *part, buffers))

    def _chosen(self, split, idx, loss_out, acc_out, run):
        """``run(threads, idx, loss_out, acc_out)`` over parts of the call's steps: on one
        thread unless the work can ``split``, else as the chooser plans (each part timed
        for it), or split always if not ``adaptive``."""
        n = loss_out.shape[0]
        batch = idx.shape[-1] // n
        if not split:
            return run(1, idx, loss_out, acc_out)
        done = 0
        for threads, count in self.chooser.plan(n) if self.adaptive else [(self.threads, n)]:
            start = time.perf_counter()
            run(threads, idx[..., done * batch:(done + count) * batch], loss_out[done:done + count],
                acc_out[done:done + count])
            self.chooser.record(threads, count, time.perf_counter() - start)
            done += count

    def _run(self, threads, x, y, idx, loss_out, acc_out, buffers):
        """The steps in one kernel call, in parts (this thread and the helpers) or one."""
        xb, yb, outputs, grads, row_loss, row_hit, one_thread, cuts = buffers
        flat, opt, t = self.model.flat, self.optimizer, np.dtype(self.model.dtype).type
        (slot,) = opt.slots  # the flat buffers' one slot
        bounds = cuts if threads > 1 else one_thread
        generation = _new_call(self._sync, self._generation)
        args = (x, y, idx, tuple(layer.W for layer in self.linears), tuple(layer.b for layer in self.linears),
                tuple(layer.grad_W for layer in self.linears), tuple(layer.grad_b for layer in self.linears),
                outputs, grads, xb, yb, self.loss_code, self.act, flat.params, flat.grads, slot.velocity,
                self.offsets, t(opt.lr), t(opt.momentum), t(opt.weight_decay), loss_out, acc_out,
                row_loss, row_hit, *bounds, self._sync, generation)
        if threads == 1:
            self.kernel(*args, True)
            return
        helpers = len(bounds[0]) - 2  # a helper a part, beyond this thread's
        with self._with_helpers(helpers):  # each part's products on its own thread
            for helper in self._helpers[:helpers]:
                helper.jobs.put((self.kernel, args + (False,)))
            self.kernel(*args, True)
        self._raise_helper_error()

    @property
    def _helper(self):
        """The first helper thread, or None before any started."""
        return self._helpers[0] if self._helpers else None

    def _with_helpers(self, count):
        """``count`` helper threads, started on first use, and BLAS held to one thread each."""
        while len(self._helpers) < count:
            self._helpers.append(_Helper(self))
        return self._one_blas_thread()

    def _two_threads(self):
        return self._with_helpers(1)

    def _raise_helper_error(self):
        for helper in self._helpers:
            helper.raise_error()

    def _one_blas_thread(self):
        if self._blas is None:
            from threadpoolctl import ThreadpoolController
            self._blas = ThreadpoolController().select(user_api="blas")
        return self._blas.limit(limits=1)

    def step(self, x, y, idx, loss_out, acc_out, i):
        self.steps(x, y, idx, loss_out[i:i + 1], acc_out[i:i + 1])


class StackedCompiledStepper(CompiledStepper):
    """The compiled step of K stacked models (stack.py): each model's step is the one-model
    kernel's, on one thread, on that model's slices of the stacked arrays (its rows of the
    flat buffers), so each computes exactly what it computes alone; a frozen model
    (SGD.freeze) is not stepped.  A call takes its steps model by model.

    With P threads the models are the tasks: the calling thread and the helpers each claim
    the next model nobody has and run all of the call's steps for it, on work arrays of its
    own.  No product is split, so nothing needs an exact cut and the threads meet once a
    call; one thread or P give the same bits.  The Chooser picks one or P as for one model
    (a busy machine)."""

    def __init__(self, model, optimizer, kernel=None, threads=1, adaptive=True):
        super().__init__(model, optimizer, kernel, threads=threads, adaptive=adaptive)
        self.offsets = np.cumsum([0] + [layer.W[0].size + layer.b[0].size for layer in self.linears])
        flat, (slot,) = model.flat, optimizer.slots
        # Model m's arrays as the kernel takes one model's: views, so the kernel updates the stack.
        self._models = [(tuple(layer.W[m] for layer in self.linears), tuple(layer.b[m, 0] for layer in self.linears),
                         tuple(layer.grad_W[m] for layer in self.linears),
                         tuple(layer.grad_b[m, 0] for layer in self.linears),
                         flat.params[m], flat.grads[m], slot.velocity[m]) for m in range(model.stack[0])]
        self._lanes = [None] * threads  # each thread's (work arrays, sync words), per batch size
        self._timed_models = len(self._models)  # how many models the chooser's times are for

    def steps(self, x, y, idx, loss_out, acc_out):
        """``idx``: (n,) rows all models share, or (K, n), one row of indices a model;
        ``loss_out``, ``acc_out``: (steps, K)."""
        batch = idx.shape[-1] // loss_out.shape[0]
        models = self.optimizer.active_models()
        if len(models) != self._timed_models:  # a model froze: the times so far were for more
            self.chooser, self._timed_models = Chooser(threads=self.threads), len(models)
        self._chosen(self.threads > 1 and len(models) > 1, idx, loss_out, acc_out,
                     lambda threads, *part: self._run_models(threads, models, x, y, *part, batch))

    def _run_models(self, threads, models, x, y, idx, loss_out, acc_out, batch):
        if threads == 1:
            for m in models:
                self._step_model(0, m, x, y, idx, loss_out, acc_out, batch)
            return
        ended = threading.Condition()
        count = {"claimed": 0, "finished": 0, "open": True}  # under ``ended``'s lock

        def work(lane):
            ran = 0
            while True:
                with ended:  # claim the next model nobody has
                    if not count["open"] or count["claimed"] == len(models):
                        return ran
                    m = models[count["claimed"]]
                    count["claimed"] += 1
                try:
                    self._step_model(lane, m, x, y, idx, loss_out, acc_out, batch)
                    ran += 1
                finally:  # counted even if it failed: the calling thread waits for the count
                    with ended:
                        count["finished"] += 1
                        ended.notify()

        helpers = min(threads, len(models)) - 1
        with self._with_helpers(helpers):
            for lane, helper in enumerate(self._helpers[:helpers], 1):
                helper.jobs.put((work, (lane,)))
            try:
                work(0)
            finally:  # no more claims; the models the helpers are stepping, if any, end first
                with ended:
                    count["open"] = False
                    ended.wait_for(lambda: count["finished"] == count["claimed"])
        self._raise_helper_error()

    def _step_model(self, lane, m, x, y, idx, loss_out, acc_out, batch):
        """All of the call's steps of model m, on thread ``lane``'s work arrays."""
        if self._lanes[lane] is None or self._lanes[lane][0][0].shape[0] != batch:
            self._lanes[lane] = (self._new_buffers(x, y, batch), np.zeros(2, dtype=np.int64), [0])
        (xb, yb, outputs, grads, row_loss, row_hit), sync, generation = self._lanes[lane]
        Ws, bs, grad_Ws, grad_bs, params, grads_m, velocity = self._models[m]
        opt, t = self.optimizer, np.dtype(self.model.dtype).type
        self.kernel(x, y, idx if idx.ndim == 1 else idx[m], Ws, bs, grad_Ws, grad_bs, outputs, grads, xb, yb,
                    self.loss_code, self.act, params, grads_m, velocity, self.offsets, t(opt.lr[m]), t(opt.momentum[m]),
                    t(opt.weight_decay[m]), loss_out[:, m], acc_out[:, m], row_loss, row_hit, *self._one_part(batch),
                    sync, _new_call(sync, generation), True)
