"""`xpmlp bench`: time training epochs of a network (mlp2-relu-sce unless ``--model`` or
``--hidden/--activation/--loss`` say otherwise) against PyTorch eager, JAX and the GEMM limit.

Method (docs/performance.md says the same):
- MNIST-shaped random data (60000 x 784, 10 classes) on the chosen device; batch 100
  unless ``--batch-size`` says otherwise.
- One epoch = shuffle on the host, send the permutation, then 600 steps of gather,
  forward, loss, accuracy, backward and SGD (momentum 0.9, weight decay 5e-4), all
  kept on the device, losses read back once at the end.  No evaluation.
- Each contender runs one warm-up epoch, then ``--epochs`` rounds time one epoch of each
  contender in turn, the order rotating from round to round (interleaved, so a shared
  machine's drift hits all alike, and no contender always follows the same one), each after
  a 0.5 s pause that lets the previous one's spinning threads go idle; we report each
  one's median.  The device is synchronised before and after each timed epoch.
- Ours is the trainer's own epoch (EpochLoop._epoch, as `xpmlp train` runs it: the step
  loop with its per-step hook, then the epoch's records, one a ``--log-every`` steps,
  appended to a run directory's metrics.jsonl; no progress bar, no evaluation, no
  checkpoint): the compiled step where the model has one (training/compiled.py; on one or
  two threads as threads.py's policy says, each step on two only while that is faster),
  and then the ops' step in the same loop too, to show what compiling buys.
  ``records_s``: the part of our epoch after the step loop (the records).
- PyTorch eager runs the same model, loss and optimizer on the same device in the same
  process (when torch is installed); JAX (when installed, CPU only) the same network (its
  activation and loss too) as one
  jitted ``lax.scan`` per epoch (bench_jax.py), from our initial weights, and the bench
  checks that its first losses equal ours on the same batches.  ``--threads`` sets every
  contender's CPU threads; by default ours follow xpmlp's policy (threads.py) and the
  peers their own default.  ``--pin`` puts everyone on one core, one thread each.
- ``--threads 1,2,...`` (several counts): the scaling table, one child bench for each
  count N, confined to N of the cores this process may use (the first N), everyone with
  its default threads there (N = 1: one thread each, as --pin); ``scaling`` lists their
  results, ``speedup`` each one's epoch over the first.
- ``--busy N`` times every contender a second time in each round while N CPU-bound
  processes run: ``ratio_busy`` is our epoch under that load over our idle epoch.
- The GEMM limit times the same epoch's matrix products alone (forward, weight
  gradients, input gradients except the first layer's), into preallocated outputs.
- The floor adds to it the two memory-bound passes no fusion removes, each timed alone:
  the batch gather (100 random rows) and the optimizer step (the fused SGD kernel over
  every parameter).  What an epoch costs beyond the floor is everything else: bias,
  activations, loss, the launches or Python calls between them, and cache traffic.
- ``--stack K`` times instead K stacked models (stack.py) against one model at a time,
  interleaved the same way: model-epochs per second of each and their ratio.  The K
  models share the shuffle (seed 0) and take the report's Table 12 learning rates and
  Table 13 momenta in turn, as ``xpmlp sweep ... --stack`` would train them.  With them
  the first layer's products of an epoch (forward and weight gradient) of the K models,
  batched as the stacked model computes them, against one wide product
  ``X @ [W_1 ... W_K]`` (``ratio_wide`` = batched / wide time): the stacked model keeps
  the batched form while that ratio stays near 1.
"""
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from . import rundir
from .backends import get_backend
from .config import TrainConfig
from .core.layers import Sigmoid
from .core.model import build_model
from .core.optim import SGD
from .data import Mnist
from .rundir import versions
from .training.compiled import compiled_steps
from .training.loop import EpochLoop
from .training.threads import blas_threads, limit_blas_threads
from .training.train import Stepper, make_stepper, step_loop

MODEL, BATCH, N_TRAIN, FEATURES, CLASSES = "mlp2-relu-sce", 100, 60000, 784, 10
# Never reached in a bench: no evaluation, no checkpoint, no last epoch.
NEVER = 10**9
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
# Idle time before each timed epoch: the previous contender's thread pool (OpenBLAS, OpenMP)
# keeps spinning for up to ~0.2 s after its last call and would slow the next one down.
SETTLE_S = 0.5
# On a GPU the contenders drive the device from one Python thread, with no CPU pool to wind
# down: a short pause keeps the stacked bench of the one-shot GPU check within its cap.
CUDA_SETTLE_S = 0.05


def settle_s(backend):
    """The pause before each timed epoch on ``backend``."""
    return CUDA_SETTLE_S if backend.name == "cupy" else SETTLE_S
# Steps whose losses JAX's must equal ours: from the same weights on the same batches.
CHECK_STEPS, CHECK_RTOL = 20, 1e-4


# A spinning load process that ends when its stdin, a pipe whose write end only the bench
# holds, reaches EOF: when the bench ends, however it ends (SIGKILL included), on any OS.
_SPIN = """
import os, signal, sys, threading
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the bench's to handle (it kills us)
def watch():
    sys.stdin.buffer.read()
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
while True:
    pass
"""


@contextlib.contextmanager
def busy_processes(count):
    """``count`` CPU-bound processes (a Python spin loop each) while the block runs: the
    machine of a user who is doing something else.  Ended on the way out, whatever happens,
    and with this process if it is killed.  Yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.PIPE) for _ in range(count)]
    try:
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
            proc.stdin.close()


def _time_interleaved(contenders, epochs, warmed=(), busy=0, settle=SETTLE_S):
    """Median epoch time of each contender: one warm-up epoch each, then ``epochs`` rounds
    that time one epoch of every contender in turn, in a rotating order, so drift in a
    shared machine's speed hits all of them alike.  ``contenders`` maps a name to
    (run_epoch, synchronize); those named in ``warmed`` had their warm-up already.
    ``busy`` > 0: each round times every contender a second time with that many CPU-bound
    processes running; those medians come back under "busy:NAME".  ``settle``: the pause
    before each timed epoch, in seconds."""
    for name, (run_epoch, _) in contenders.items():
        if name not in warmed:
            run_epoch()  # warm-up: buffers, kernel caches, BLAS threads
    phases = [("", contextlib.nullcontext)] + ([("busy:", lambda: busy_processes(busy))] if busy else [])
    times = {prefix + name: [] for prefix, _ in phases for name in contenders}
    names = list(contenders)
    for r in range(epochs):
        # Rotate the order each round, so that no contender always follows the same one
        # (a heavy epoch can leave the next one a little slower: caches, clocks, threads).
        for prefix, load in phases:
            with load():
                for name in names[r % len(names):] + names[:r % len(names)]:
                    run_epoch, synchronize = contenders[name]
                    synchronize()
                    time.sleep(settle)
                    start = time.perf_counter()
                    run_epoch()
                    synchronize()
                    times[prefix + name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def workload(model=MODEL, hidden=None, activation=None, loss=None, batch_size=BATCH, dtype="float32",
             log_every=1, seed=0):
    """The TrainConfig of what the bench trains: a named network, or ``hidden`` (a list of
    widths) with ``activation`` and ``loss``; as `xpmlp train` would, records every
    ``log_every`` steps; no evaluation or checkpoint."""
    return TrainConfig(model=model, hidden=hidden, activation=activation, loss=loss, batch_size=batch_size,
                       epochs=NEVER, eval_every=NEVER, checkpoint_every=NEVER, log_every=log_every, lr=LR,
                       momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, dtype=dtype, seed=seed).validate()


class _BenchLoop(EpochLoop):
    """The trainer's epoch loop writing its records as train.Trainer does (metrics.jsonl of
    ``run_dir``), one epoch a call of ``epoch()``; keeps the latest epoch's iteration
    records (``iter_records``)."""

    def __init__(self, net, model, data, run_dir, threads, device_data, compiled):
        optimizer = net.optimizer(model)
        super().__init__(net, model, optimizer, data, seeds=[net.seed], progress=False, log=_silent,
                         threads=threads, device_data=device_data)
        if not compiled:
            self.stepper = make_stepper(model, optimizer, compiled=False)
        self.rngs = [np.random.default_rng(net.seed)]  # the bench's shuffles (bench_ours', JAX's check)
        self.run_dir, self.iter_records = run_dir, []
        self._flag, self._last = types.SimpleNamespace(stop=False), [{}]
        self._train, self._test, self._val = self._on_device()
        self._warm_up(self._train)

    def epoch(self):
        self._epoch(self._train, self._test, self._flag, self._last)
        return self.iter_records

    def _write_epoch(self, k, iter_records, record):
        rundir.append_metrics(self.run_dir, iter_records + [record])
        self.iter_records = iter_records

    def _line(self, epoch, active, records, diverged):
        return ""

    def _checkpoint(self, *args, **kwargs):
        pass

    def _on_diverged(self, k, record):
        pass


def _silent(line):
    pass


def bench_trainer(backend, net, data, run_dir, ops=None, compiled=True, threads=None, device_data=None):
    """(run_epoch, model, loop): the trainer's epoch of ``net`` (a TrainConfig) on ``data``
    (an Mnist), records into ``run_dir``; run_epoch returns the epoch's iteration records.
    ``compiled``: the compiled step where the ops have one (on ``threads`` threads), else
    the ops' own Stepper, in the same loop."""
    model = net.build(backend, ops=ops)
    os.makedirs(run_dir, exist_ok=True)
    loop = _BenchLoop(net, model, data, run_dir, threads, device_data, compiled)
    return loop.epoch, model, loop


def bench_ours(backend, x, y, dtype, ops=None, seed=0, compiled=True, threads=None):
    """(run_epoch, model, stepper): our training epoch, through the trainer's own step loop;
    run_epoch returns the epoch's losses.  ``compiled``: the compiled step where the ops
    have one (as the trainer chooses, on ``threads`` threads), else the ops' own Stepper."""
    model = build_model(MODEL, backend=backend, dtype=dtype, seed=seed, ops=ops)
    stepper = make_stepper(model, SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), compiled,
                           threads)
    rng, xp, iters = np.random.default_rng(seed), backend.xp, N_TRAIN // BATCH
    losses = xp.zeros((iters,), dtype=model.dtype)
    accs = xp.zeros((iters,), dtype=model.dtype)

    def epoch():
        perm = backend.asarray(rng.permutation(N_TRAIN))
        step_loop(stepper, x, y, perm, BATCH, losses, accs, 0, iters)
        return backend.to_numpy(losses)  # the once-per-epoch read of the metrics

    return epoch, model, stepper


# (lr, momentum) of the report's Tables 12 and 13 (the default point once): 16 settings.
STACK_SETTINGS = ([(lr, MOMENTUM) for lr in (1.0, 0.1, 0.01, 0.001, 1e-4, 1e-5)]
                  + [(LR, m) for m in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)])


def bench_stacked(backend, x, y, dtype, models, ops=None, seed=0, threads=None):
    """(run_epoch, model, stepper): an epoch of ``models`` stacked models sharing one shuffle, the
    compiled step on ``threads`` threads (None: the trainer's policy), as bench_ours."""
    settings = [STACK_SETTINGS[k % len(STACK_SETTINGS)] for k in range(models)]
    model = build_model(MODEL, backend=backend, dtype=dtype, seed=[seed] * models, stack=(models,), ops=ops)
    stepper = make_stepper(model, SGD(model, lr=[lr for lr, _ in settings], momentum=[m for _, m in settings],
                                      weight_decay=WEIGHT_DECAY), threads=threads)
    rng, xp, iters = np.random.default_rng(seed), backend.xp, N_TRAIN // BATCH
    losses = xp.zeros((iters, models), dtype=model.dtype)
    accs = xp.zeros((iters, models), dtype=model.dtype)

    def epoch():
        perm = backend.asarray(rng.permutation(N_TRAIN))
        step_loop(stepper, x, y, perm, BATCH, losses, accs, 0, iters)
        backend.to_numpy(losses)

    return epoch, model, stepper


def bench_first_layer(backend, model):
    """(batched_epoch, wide_epoch): an epoch's first-layer products of K stacked models that
    share the batch X, forward and weight gradient, two ways: batched (what the stacked
    model computes: X @ W_k and X^T G_k, K products of (in, out)) and wide (one product
    each, X @ [W_1 ... W_K] and X^T [G_1 ... G_K], on arrays already in the wide layout:
    the wide form at its best, before the copies that the models' own layout would cost)."""
    xp, iters = backend.xp, N_TRAIN // BATCH
    layer = model.layers[0]
    models, (n_in, n_out) = layer.W.shape[0], layer.W.shape[1:]
    x = xp.ones((BATCH, n_in), dtype=model.dtype)
    grad_y, grad_W = xp.ones((models, BATCH, n_out), dtype=model.dtype), xp.empty_like(layer.W)
    y = xp.empty((models, BATCH, n_out), dtype=model.dtype)
    wide_W = xp.ones((n_in, models * n_out), dtype=model.dtype)
    wide_y, wide_grad_y = (xp.ones((BATCH, models * n_out), dtype=model.dtype) for _ in range(2))
    wide_grad_W = xp.empty_like(wide_W)

    def batched():
        for _ in range(iters):
            xp.matmul(x, layer.W, out=y)
            xp.matmul(x.T, grad_y, out=grad_W)

    def wide():
        for _ in range(iters):
            xp.matmul(x, wide_W, out=wide_y)
            xp.matmul(x.T, wide_grad_y, out=wide_grad_W)

    return batched, wide


def bench_memory_passes(backend, x, y, dtype, ops=None, seed=0, net=None):
    """(gather_epoch, sgd_epoch): the two memory-bound passes of an epoch that no fusion
    removes, each alone on a model of its own: the batch gather and the optimizer step."""
    net = net or workload(dtype=dtype)
    model, batch = net.build(backend, ops=ops), net.batch_size
    optimizer = SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    stepper = Stepper(model, optimizer)
    rng, iters = np.random.default_rng(seed), N_TRAIN // batch

    def gather_epoch():
        perm = backend.asarray(rng.permutation(N_TRAIN))
        for i in range(iters):
            stepper.gather(x, y, perm[i * batch:(i + 1) * batch])

    def sgd_epoch():
        for _ in range(iters):
            optimizer.step()

    return gather_epoch, sgd_epoch


def bench_gemm_limit(backend, model, batch=BATCH):
    """The epoch's matrix products alone, into preallocated outputs."""
    xp, iters = backend.xp, N_TRAIN // batch
    linears = [layer for layer in model.layers if hasattr(layer, "W")]
    xs = [xp.ones((batch, layer.in_features), dtype=model.dtype) for layer in linears]
    ys = [xp.ones((batch, layer.out_features), dtype=model.dtype) for layer in linears]
    grad_Ws = [xp.empty_like(layer.W) for layer in linears]

    def epoch():
        for _ in range(iters):
            for layer, x, y in zip(linears, xs, ys):
                xp.matmul(x, layer.W, out=y)
            for k, (layer, x, y) in enumerate(zip(linears, xs, ys)):
                xp.matmul(x.T, y, out=grad_Ws[k])
                if k > 0:
                    xp.matmul(y, layer.W.T, out=x)

    return epoch


def torch_for(device):
    """(torch, None) when PyTorch can run on ``device`` ("cpu", "cuda[:N]", "mps"), else (None, why)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - not only ImportError: a broken CUDA build raises OSError
        return None, f"PyTorch cannot be imported ({type(exc).__name__}: {exc})"
    try:
        if device.startswith("cuda") and not torch.cuda.is_available():
            return None, f"PyTorch {torch.__version__} has no usable CUDA (torch.version.cuda = {torch.version.cuda})"
    except Exception as exc:  # noqa: BLE001 - asking the driver can fail in many ways
        return None, f"PyTorch cannot use CUDA ({type(exc).__name__}: {exc})"
    return torch, None


def bench_torch(backend, model, x_host, y_host, threads, seed=0, batch=BATCH):
    """(run_epoch, synchronize, version) for PyTorch eager with the same model, loss,
    optimizer and device, or the reason it cannot run here (a str)."""
    # Where ours runs: the torch backend's own device, else CuPy's GPU or the CPU.
    device = str(getattr(backend, "torch_device", "cuda" if backend.name == "cupy" else "cpu"))
    torch, why = torch_for(device)
    if torch is None:
        return why
    dtype = getattr(torch, model.state_arrays()[0].dtype.name)  # the host dtype: any backend's model
    layers = []
    for layer in model.layers:
        if hasattr(layer, "W"):
            linear = torch.nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(backend.to_numpy(layer.W).T.copy()))
                linear.bias.zero_()
            layers.append(linear)
        else:
            layers.append(torch.nn.Sigmoid() if isinstance(layer, Sigmoid) else torch.nn.ReLU())
    if threads is not None:  # else its own default
        torch.set_num_threads(threads)
    net = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if _loss_of(model) == "sce":
        loss_fn = torch.nn.CrossEntropyLoss()
    else:  # Euclidean on the Sigmoid's output: 1/(2N) sum ||out - onehot||^2
        def loss_fn(out, yb):
            onehot = torch.nn.functional.one_hot(yb, out.shape[1]).to(out.dtype)
            return 0.5 * ((out - onehot) ** 2).sum(1).mean()
    x = torch.from_numpy(x_host).to(device=device, dtype=dtype)
    y = torch.from_numpy(y_host).to(device)
    gen = torch.Generator().manual_seed(seed)
    iters = N_TRAIN // batch

    def epoch():
        perm = torch.randperm(N_TRAIN, generator=gen).to(device)
        losses = torch.zeros(iters, device=device, dtype=dtype)
        accs = torch.zeros(iters, device=device, dtype=dtype)
        for i in range(iters):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            out = net(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[i] = loss.detach()
            accs[i] = (out.argmax(1) == yb).to(dtype).mean()
        losses.cpu()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    return epoch, sync, torch.__version__


def bench_jax(weights, x_host, y_host, first_perm, our_first_losses, seed=0, batch=BATCH, network=None):
    """(run_epoch, version, check) for JAX's compiled epoch from ``weights``, the initial
    weights of our model; None when JAX is not installed.  Its warm-up epoch runs on
    ``first_perm``, the permutation of our warm-up epoch, and ``check`` compares the
    losses of the two over the first CHECK_STEPS steps (``our_first_losses``: {step: loss},
    the steps our records keep): the same weights and batches must give the same losses.
    ``network``: {"activation": ..., "loss": ...} where not ReLU and softmax cross-entropy."""
    from .bench_jax import jax_epoch

    found = jax_epoch(weights, x_host, y_host, batch, LR, MOMENTUM, WEIGHT_DECAY, **(network or {}))
    if found is None:
        return None
    run, version = found
    jax_losses = run(first_perm)[0]  # also its warm-up: the XLA compilation
    steps = [i for i in sorted(our_first_losses) if i < CHECK_STEPS]
    ours = np.array([our_first_losses[i] for i in steps], dtype=np.float64)
    rel = np.abs(jax_losses[steps] - ours) / np.abs(ours)
    check = {"steps": len(steps), "max_rel_diff": float(rel.max()), "rtol": CHECK_RTOL,
             "losses_equal": bool(rel.max() <= CHECK_RTOL)}
    rng = np.random.default_rng(seed)
    rng.permutation(N_TRAIN)  # the warm-up's permutation: continue with ours' sequence

    def epoch():
        run(rng.permutation(N_TRAIN))

    return epoch, version, check


def _step_threads(stepper):
    """The compiled step's threads and, where it had more than one, the share of its steps
    (all its epochs, busy ones included) that ran split ("two_thread_step_share": on
    ``step_threads`` threads, two on a two-core machine)."""
    threads = getattr(stepper, "threads", None)
    if threads is None or threads < 2:
        return {"step_threads": threads}
    run = stepper.chooser.steps_run
    return {"step_threads": threads, "two_thread_step_share": run[threads] / max(1, run[1] + run[threads])}


def _peak_memory_mb(backend):
    """("peak_device_mb" or "peak_rss_mb", MiB); the RSS is None where the OS does not say
    (Windows: no ``resource`` module)."""
    if backend.name == "cupy":
        pool = backend.xp.get_default_memory_pool()
        return "peak_device_mb", pool.total_bytes() / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return "peak_rss_mb", None
    # ru_maxrss is in bytes on macOS, in KiB on Linux and the BSDs.
    unit = 1 if sys.platform == "darwin" else 1024
    return "peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20


def can_pin():
    """Whether this OS lets a process pin itself to a core (Linux; not macOS or Windows here)."""
    return hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")


def pin_to_one_core():
    """Pin this process, and so every contender in it, to one core (the last one it may
    use); returns that core, or None where the OS cannot pin (can_pin).  Thread pools
    created later see one CPU."""
    if not can_pin():
        return None
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def run(device="auto", dtype="float32", epochs=3, torch_peer=True, threads=None, kernels=True,
        jax_peer=True, pin=False, busy=0, stack=None, net=None):
    """The benchmark's result dict.  ``kernels=False`` runs the buffered ops (the fast
    path's array code) instead of the backend's fused kernels, to see what they are worth.
    ``threads``: CPU threads of every contender (None: ours by xpmlp's policy, the peers
    their own default).  ``pin``: every contender on one core, one thread each.  ``busy``:
    also time each contender with that many CPU-bound processes running.  ``stack=K``: time
    K stacked models of mlp2-relu-sce against one model at a time instead.  ``net``: what to
    train (``workload``; default mlp2-relu-sce, batch 100, in ``dtype``)."""
    net = net or workload(dtype=dtype)
    affinity = os.sched_getaffinity(0) if pin and can_pin() else None
    pinned = pin_to_one_core() if pin else None
    if pin:
        threads = 1
    if threads == 1:  # before JAX is imported: XLA sizes its thread pool once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    backend = get_backend(device)
    try:
        with limit_blas_threads(threads):
            if stack:
                return _run_stack(backend, dtype, epochs, threads, stack, ops=None if kernels else "buffered")
            result = _run(backend, net, epochs, torch_peer, jax_peer, threads, busy,
                          ops=None if kernels else "buffered")
        return dict(result, pin=pin, pinned_core=pinned, busy_processes=busy)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def _host_data():
    """MNIST-shaped random data on the host: (x, y)."""
    rng = np.random.default_rng(0)
    x_host = rng.random((N_TRAIN, FEATURES), dtype=np.float32) - np.float32(0.5)
    return x_host, rng.integers(0, CLASSES, N_TRAIN)


def _data(backend, dtype):
    """MNIST-shaped random data: (host x, host y, device x, device y)."""
    x_host, y_host = _host_data()
    return x_host, y_host, backend.asarray(x_host, dtype=backend.dtype(dtype)), backend.asarray(y_host)


def _run_stack(backend, dtype, epochs, threads, models, ops):
    _, _, x, y = _data(backend, dtype)
    stacked, model, stacked_stepper = bench_stacked(backend, x, y, dtype, models, ops, threads=threads)
    stacked()  # its warm-up first, so the memory peak below is the stacked training's
    memory_key, memory_mb = _peak_memory_mb(backend)
    single, _, stepper = bench_ours(backend, x, y, dtype, ops, threads=threads)
    batched, wide = bench_first_layer(backend, model)
    with np.errstate(all="ignore"):  # lr 1.0 and momentum 1.0 diverge, as in the report
        median = _time_interleaved({"stacked": (stacked, backend.synchronize),
                                    "single": (single, backend.synchronize),
                                    "first_layer_batched": (batched, backend.synchronize),
                                    "first_layer_wide": (wide, backend.synchronize)}, epochs, warmed=("stacked",),
                                    settle=settle_s(backend))
    stacked_rate, single_rate = models / median["stacked"], 1 / median["single"]
    return {"model": MODEL, "batch_size": BATCH, "dtype": dtype, "epochs_timed": epochs, "stack": models,
            "stacked_epoch_s": median["stacked"], "epoch_s": median["single"],
            "stacked_model_epochs_per_s": stacked_rate, "single_model_epochs_per_s": single_rate,
            "ratio_stack": stacked_rate / single_rate,
            "first_layer_batched_epoch_s": median["first_layer_batched"],
            "first_layer_wide_epoch_s": median["first_layer_wide"],
            "ratio_wide": median["first_layer_batched"] / median["first_layer_wide"],
            memory_key: memory_mb, **backend.describe(),
            "ops": model.ops.name, "fused_kernels": model.ops.name == "fused", "threads": threads,
            "step_threads": getattr(stepper, "threads", None),
            "stacked_step_threads": getattr(stacked_stepper, "threads", None),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "versions": versions()}


def _loss_of(model):
    """"sce" or "mse" (a Sigmoid output and the Euclidean loss)."""
    return "mse" if isinstance(model.layers[-1], Sigmoid) else "sce"


def _activation_of(model):
    """The hidden layers' activation: "relu" or "sigmoid" ("relu" where there are none)."""
    linears = [i for i, layer in enumerate(model.layers) if hasattr(layer, "W")]
    return "sigmoid" if len(linears) > 1 and isinstance(model.layers[linears[0] + 1], Sigmoid) else "relu"


def _run(backend, net, epochs, torch_peer, jax_peer, threads, busy, ops):
    dtype, batch = net.dtype, net.batch_size
    x_host, y_host = _host_data()
    data = Mnist(x_host, y_host, x_host[:batch], y_host[:batch])  # a test set that is never evaluated
    device_data = {}  # the data sent to the device once, for every loop
    with tempfile.TemporaryDirectory(prefix="xpmlp-bench-") as tmp:
        ours, model, loop = bench_trainer(backend, net, data, os.path.join(tmp, "ours"), ops, threads=threads,
                                          device_data=device_data)
        x, y = loop._train
        initial_weights = [(backend.to_numpy(layer.W).copy(), backend.to_numpy(layer.b).copy())
                           for layer in model.layers if hasattr(layer, "W")]
        # its warm-up, so the memory peak below is the training's own
        our_first_losses = {rec["iter"] - 1: rec["loss"] for rec in ours()}
        memory_key, memory_mb = _peak_memory_mb(backend)  # before torch adds its own
        gather, sgd = bench_memory_passes(backend, x, y, dtype, ops, net=net)
        timed_ours = _timed_parts(ours, loop)
        contenders = {"ours": (timed_ours, backend.synchronize),
                      "gemm": (bench_gemm_limit(backend, model, batch), backend.synchronize),
                      "gather": (gather, backend.synchronize), "sgd": (sgd, backend.synchronize)}
        compiled = compiled_steps(model) is not None
        if compiled:  # ours ran the compiled step: time the ops' step in the same loop too
            array = bench_trainer(backend, net, data, os.path.join(tmp, "array"), ops, compiled=False,
                                  device_data=device_data)[0]
            contenders["array"] = (array, backend.synchronize)
        peer = (bench_torch(backend, model, x_host, y_host, threads, batch=batch) if torch_peer
                else "left out (--no-torch)")
        peer_versions, warmed, jax_check, torch_note = {}, ["ours"], None, None
        if isinstance(peer, str):
            torch_note = peer
        else:
            contenders["torch"], peer_versions["torch"] = peer[:2], peer[2]
        jax = None
        if jax_peer and backend.name == "numpy":  # the JAX contender runs on the CPU
            first_perm = np.random.default_rng(0).permutation(N_TRAIN)  # ours' first epoch's
            network = {"activation": _activation_of(model), "loss": _loss_of(model)}
            jax = bench_jax(initial_weights, x_host.astype(np.dtype(dtype)), y_host, first_perm, our_first_losses,
                            batch=batch, network=None if network == {"activation": "relu", "loss": "sce"} else network)
        if jax is not None:
            contenders["jax"], peer_versions["jax"], jax_check = (jax[0], backend.synchronize), jax[1], jax[2]
            warmed.append("jax")
        times_before = len(timed_ours.parts)
        median = _time_interleaved(contenders, epochs, warmed=warmed, busy=busy, settle=settle_s(backend))
        parts = timed_ours.parts[times_before:times_before + epochs]  # the idle rounds' epochs
    epoch_s, gemm_s = median["ours"], median["gemm"]
    torch_s, jax_s, array_s = median.get("torch"), median.get("jax"), median.get("array")
    floor_s = gemm_s + median["gather"] + median["sgd"]
    result = {
        "model": net.name, "network": {"widths": net.widths, "activation": _activation_of(model),
                                       "loss": _loss_of(model)},
        "batch_size": batch, "dtype": dtype, "epochs_timed": epochs, "log_every": net.log_every,
        "epoch_s": epoch_s, "step_loop_s": statistics.median(p[0] for p in parts),
        "records_s": statistics.median(p[1] for p in parts),
        "array_path_epoch_s": array_s, "torch_epoch_s": torch_s, "torch_note": torch_note,
        "jax_epoch_s": jax_s, "gemm_limit_epoch_s": gemm_s,
        "ratio_torch": epoch_s / torch_s if torch_s else None, "ratio_jax": epoch_s / jax_s if jax_s else None,
        "ratio_limit": epoch_s / gemm_s,
        "gather_epoch_s": median["gather"], "sgd_epoch_s": median["sgd"], "floor_epoch_s": floor_s,
        "ratio_floor": epoch_s / floor_s, "jax_check": jax_check,
        memory_key: memory_mb, **backend.describe(),
        "ops": model.ops.name, "fused_kernels": model.ops.name == "fused", "compiled_step": compiled,
        "threads": blas_threads(threads), "peer_threads": threads,
        **_step_threads(loop.stepper),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "versions": dict(versions(), **peer_versions),
    }
    result["records_share"] = result["records_s"] / (result["step_loop_s"] + result["records_s"])
    if busy:
        result["busy"] = {name[len("busy:"):]: t for name, t in median.items() if name.startswith("busy:")}
        result["ratio_busy"] = result["busy"]["ours"] / epoch_s
    return result


def _timed_parts(run_epoch, loop):
    """``run_epoch`` that also keeps, in its ``parts``, each epoch's (step loop, the rest)
    seconds: the step loop as the trainer times it (train_time_s), the rest its records."""
    def epoch():
        before, start = loop.state["train_time_s"], time.perf_counter()
        run_epoch()
        total, steps = time.perf_counter() - start, loop.state["train_time_s"] - before
        epoch.parts.append((steps, total - steps))

    epoch.parts = []
    return epoch


def _mb(value):
    return "n/a" if value is None else f"{value:.0f}"


def format_table(r):
    def sec(v):
        return "n/a" if v is None else f"{v * 1000:8.1f} ms"
    rows = [("xpmlp", r["epoch_s"]), ("  ops step loop", r["array_path_epoch_s"]),
            ("PyTorch eager", r["torch_epoch_s"]), ("JAX (lax.scan)", r["jax_epoch_s"]),
            ("GEMM limit", r["gemm_limit_epoch_s"]), ("  + gather", r["gather_epoch_s"]),
            ("  + SGD step", r["sgd_epoch_s"]), ("  = floor", r["floor_epoch_s"])]
    mem = next(k for k in r if k.startswith("peak_"))
    if r["pinned_core"] is not None:
        where = f"pinned to core {r['pinned_core']}, "
    elif r.get("pin"):  # --pin where the OS has no affinity calls (macOS, Windows)
        where = "one thread each, not pinned: this OS cannot pin a process to a core, "
    else:
        where = ""
    step = f"compiled step on {r['step_threads']} thread(s)" if r["compiled_step"] else f"{r['ops']} ops"
    lines = [f"{r['model']}, batch {r['batch_size']}, {r['dtype']}, on {r.get('device_name', r['device'])} "
             f"({r['backend']}, {step}, {where}{r['threads']} BLAS thread(s)); median of {r['epochs_timed']} "
             "epochs after a warm-up",
             f"{'':16}{'epoch':>11}   {'xpmlp time / this':>18}"]
    for name, t in rows:
        ratio = "" if name.startswith("  +") else f"{r['epoch_s'] / t:.2f}" if t else "n/a"
        lines.append(f"{name:16}{sec(t):>11}   {ratio:>18}")
    lines.append(f"ratio_torch {r['ratio_torch'] and round(r['ratio_torch'], 3)}  "
                 f"ratio_jax {r['ratio_jax'] and round(r['ratio_jax'], 3)}  "
                 f"ratio_limit {round(r['ratio_limit'], 3)}  ratio_floor {round(r['ratio_floor'], 3)}  "
                 f"{mem} {_mb(r[mem])}")
    lines.append(f"our epoch as the trainer runs it: step loop {r['step_loop_s'] * 1000:.1f} ms, then the records "
                 f"(one every {r['log_every']} steps) {r['records_s'] * 1000:.1f} ms ({r['records_share']:.1%})")
    if r.get("two_thread_step_share") is not None:
        lines.append(f"steps the compiled step ran split on {r['step_threads']} threads: "
                     f"{r['two_thread_step_share']:.0%}")
    if r.get("torch_note"):
        lines.append(f"PyTorch eager: {r['torch_note']}")
    if r["jax_check"]:
        c = r["jax_check"]
        lines.append(f"JAX's first {c['steps']} losses equal ours: {c['losses_equal']} "
                     f"(largest relative difference {c['max_rel_diff']:.1e}, tolerance {c['rtol']:.0e})")
    if r.get("busy"):
        busy = "  ".join(f"{name} {sec(t).strip()}" for name, t in r["busy"].items()
                         if name in ("ours", "array", "torch", "jax"))
        lines.append(f"with {r['busy_processes']} busy process(es): {busy}  "
                     f"ratio_busy {r['ratio_busy']:.2f} (ours busy / ours idle)")
    return "\n".join(lines)


def format_stack(r):
    mem = next(k for k in r if k.startswith("peak_"))
    return "\n".join([
        f"{r['model']}, batch {r['batch_size']}, {r['dtype']}, on {r.get('device_name', r['device'])} "
        f"({r['backend']}); median of {r['epochs_timed']} epochs after a warm-up",
        f"{r['stack']} stacked models: {r['stacked_epoch_s'] * 1000:8.1f} ms an epoch, "
        f"{r['stacked_model_epochs_per_s']:.3f} model-epochs/s",
        f"one model at a time: {r['epoch_s'] * 1000:8.1f} ms an epoch, "
        f"{r['single_model_epochs_per_s']:.3f} model-epochs/s",
        f"ratio_stack {r['ratio_stack']:.3f}  {mem} {_mb(r[mem])}",
        f"first layer of the {r['stack']} (forward and weight gradient, shared batch): batched "
        f"{r['first_layer_batched_epoch_s'] * 1000:.1f} ms an epoch, one wide product "
        f"{r['first_layer_wide_epoch_s'] * 1000:.1f} ms: ratio_wide {r['ratio_wide']:.3f}"])


def _net_of(args):
    """The workload the command line names."""
    named = {"model": args.model} if args.model else {}
    return workload(**named, hidden=args.hidden, activation=args.activation, loss=args.loss,
                    batch_size=args.batch_size or BATCH, dtype=args.dtype, log_every=args.log_every)


def _child_argv(args):
    """The bench command line of one row of a scaling table, less its --threads."""
    argv = ["--device", args.device, "--dtype", args.dtype, "--epochs", str(args.epochs),
            "--log-every", str(args.log_every)]
    for flag, value in (("--model", args.model), ("--activation", args.activation), ("--loss", args.loss),
                        ("--batch-size", args.batch_size)):
        if value is not None:
            argv += [flag, str(value)]
    if args.hidden is not None:
        argv += ["--hidden", ",".join(map(str, args.hidden))]
    return argv + [flag for flag, on in (("--no-torch", args.no_torch), ("--no-jax", args.no_jax),
                                         ("--no-kernels", args.no_kernels)) if on]


def _run_child(argv, cores):
    """A child bench's result dict, the child confined to ``cores`` (None: where this one runs)."""
    def confine():
        if cores is not None:
            os.sched_setaffinity(0, cores)

    done = subprocess.run([sys.executable, "-m", "xpmlp", "bench", *argv, "--json"], capture_output=True,
                          text=True, preexec_fn=confine if cores is not None else None)
    if done.returncode != 0:
        raise RuntimeError(f"xpmlp bench {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def scaling(counts, argv, runner=_run_child):
    """The scaling table: for each count N, a child bench (``argv``) confined to N of this
    process's cores (all of them where there are fewer, or where the OS cannot confine a
    process), every contender on its defaults there, as a user's run on N cores: ours by
    xpmlp's policy (the compiled step on N threads, BLAS on one), the peers theirs.  N = 1
    also says --threads 1 (JAX's XLA then makes no thread pool), so that row is --pin's."""
    cores = sorted(os.sched_getaffinity(0)) if can_pin() else None
    rows = []
    for n in counts:
        mine = set(cores[:n]) if cores is not None else None
        row = runner(argv + (["--threads", "1"] if n == 1 else []), mine)
        rows.append(dict(row, cores=len(mine) if mine is not None else None, thread_count=n))
    first = rows[0]["epoch_s"]
    return {"model": rows[0]["model"], "batch_size": rows[0]["batch_size"], "dtype": rows[0]["dtype"],
            "thread_counts": list(counts), "scaling": rows, "speedup": [first / row["epoch_s"] for row in rows]}


def format_scaling(r):
    def ms(v):
        return "n/a" if v is None else f"{v * 1000:.1f}"

    lines = [f"{r['model']}, batch {r['batch_size']}, {r['dtype']}: epoch (ms) on each count of cores, "
             "every contender with its default threads there",
             f"{'threads':>7} {'cores':>5} {'xpmlp':>9} {'JAX':>9} {'PyTorch':>9} {'ratio_jax':>9} {'speedup':>8}"]
    for row, speedup in zip(r["scaling"], r["speedup"]):
        ratio = "n/a" if row["ratio_jax"] is None else f"{row['ratio_jax']:.2f}"
        lines.append(f"{row['thread_count']:>7} {row['cores'] or 'n/a':>5} {ms(row['epoch_s']):>9} "
                     f"{ms(row['jax_epoch_s']):>9} {ms(row['torch_epoch_s']):>9} {ratio:>9} {speedup:>8.2f}")
    return "\n".join(lines)


def main(args):
    counts = args.threads or [None]
    if len(counts) > 1:
        result = scaling(counts, _child_argv(args))
        print(json.dumps(result, indent=2) if args.json else format_scaling(result))
        sys.stdout.flush()
        return 0
    result = run(args.device, args.dtype, args.epochs, torch_peer=not args.no_torch, threads=counts[0],
                 kernels=not args.no_kernels, jax_peer=not args.no_jax, pin=args.pin, busy=args.busy,
                 stack=args.stack, net=None if args.stack else _net_of(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_stack(result) if args.stack else format_table(result))
    sys.stdout.flush()
    return 0
