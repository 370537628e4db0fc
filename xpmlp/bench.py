"""`xpmlp bench`: time training epochs of mlp2-relu-sce against PyTorch eager, JAX and the GEMM limit.

Method (docs/performance.md, "Measuring", says the same):
- MNIST-shaped random data (60000 x 784, 10 classes) on the chosen device; batch 100.
- One epoch = shuffle on the host, send the permutation, then 600 steps of gather,
  forward, loss, accuracy, backward and SGD (momentum 0.9, weight decay 5e-4), all
  kept on the device, losses read back once at the end.  No evaluation.
- Each contender runs one warm-up epoch, then ``--epochs`` rounds time one epoch of each
  contender in turn, the order rotating from round to round (interleaved, so a shared
  machine's drift hits all alike, and no contender always follows the same one), each after
  a 0.5 s pause that lets the previous one's spinning threads go idle; we report each
  one's median.  The device is synchronised before and after each timed epoch.
- Ours is the trainer's own step loop and stepper: the compiled step where the model has
  one (xpmlp/compiled.py; on one or two threads as threads.py's policy says, each step on
  two only while that is faster), and then the ops' step loop too, to show what compiling buys.
- PyTorch eager runs the same model, loss and optimizer on the same device in the same
  process (when torch is installed); JAX (when installed, CPU only) the same network as one
  jitted ``lax.scan`` per epoch (bench_jax.py), from our initial weights, and the bench
  checks that its first losses equal ours on the same batches.  ``--threads`` sets every
  contender's CPU threads; by default ours follow xpmlp's policy (threads.py) and the
  peers their own default.  ``--pin`` puts everyone on one core, one thread each.
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
import time

import numpy as np

from .backends import get_backend
from .core.model import build_model
from .core.optim import SGD
from .rundir import versions
from .training.compiled import compiled_steps
from .training.threads import blas_threads, limit_blas_threads
from .training.train import Stepper, make_stepper, step_loop

MODEL, BATCH, N_TRAIN, FEATURES, CLASSES = "mlp2-relu-sce", 100, 60000, 784, 10
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


def bench_memory_passes(backend, x, y, dtype, ops=None, seed=0):
    """(gather_epoch, sgd_epoch): the two memory-bound passes of an epoch that no fusion
    removes, each alone on a model of its own: the batch gather and the optimizer step."""
    model = build_model(MODEL, backend=backend, dtype=dtype, seed=seed, ops=ops)
    optimizer = SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    stepper = Stepper(model, optimizer)
    rng, iters = np.random.default_rng(seed), N_TRAIN // BATCH

    def gather_epoch():
        perm = backend.asarray(rng.permutation(N_TRAIN))
        for i in range(iters):
            stepper.gather(x, y, perm[i * BATCH:(i + 1) * BATCH])

    def sgd_epoch():
        for _ in range(iters):
            optimizer.step()

    return gather_epoch, sgd_epoch


def bench_gemm_limit(backend, model):
    """The epoch's matrix products alone, into preallocated outputs."""
    xp, iters = backend.xp, N_TRAIN // BATCH
    linears = [layer for layer in model.layers if hasattr(layer, "W")]
    xs = [xp.ones((BATCH, layer.in_features), dtype=model.dtype) for layer in linears]
    ys = [xp.ones((BATCH, layer.out_features), dtype=model.dtype) for layer in linears]
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


def bench_torch(backend, model, x_host, y_host, threads, seed=0):
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
            layers.append(torch.nn.ReLU())
    if threads is not None:  # else its own default
        torch.set_num_threads(threads)
    net = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.from_numpy(x_host).to(device=device, dtype=dtype)
    y = torch.from_numpy(y_host).to(device)
    gen = torch.Generator().manual_seed(seed)
    iters = N_TRAIN // BATCH

    def epoch():
        perm = torch.randperm(N_TRAIN, generator=gen).to(device)
        losses = torch.zeros(iters, device=device, dtype=dtype)
        accs = torch.zeros(iters, device=device, dtype=dtype)
        for i in range(iters):
            idx = perm[i * BATCH:(i + 1) * BATCH]
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


def bench_jax(weights, x_host, y_host, first_perm, our_first_losses, seed=0):
    """(run_epoch, version, check) for JAX's compiled epoch from ``weights``, the initial
    weights of our model; None when JAX is not installed.  Its warm-up epoch runs on
    ``first_perm``, the permutation of our warm-up epoch, and ``check`` compares the first
    CHECK_STEPS losses of the two: the same weights and batches must give the same losses."""
    from .bench_jax import jax_epoch

    found = jax_epoch(weights, x_host, y_host, BATCH, LR, MOMENTUM, WEIGHT_DECAY)
    if found is None:
        return None
    run, version = found
    jax_losses = run(first_perm)[0][:CHECK_STEPS]  # also its warm-up: the XLA compilation
    ours = np.asarray(our_first_losses[:CHECK_STEPS], dtype=np.float64)
    rel = np.abs(jax_losses - ours) / np.abs(ours)
    check = {"steps": CHECK_STEPS, "max_rel_diff": float(rel.max()), "rtol": CHECK_RTOL,
             "losses_equal": bool(rel.max() <= CHECK_RTOL)}
    rng = np.random.default_rng(seed)
    rng.permutation(N_TRAIN)  # the warm-up's permutation: continue with ours' sequence

    def epoch():
        run(rng.permutation(N_TRAIN))

    return epoch, version, check


def _step_threads(stepper):
    """The compiled step's threads and, where it had two, the share of its steps (all its
    epochs, busy ones included) that ran on two."""
    threads = getattr(stepper, "threads", None)
    if threads != 2:
        return {"step_threads": threads}
    run = stepper.chooser.steps_run
    return {"step_threads": 2, "two_thread_step_share": run[2] / max(1, run[1] + run[2])}


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
        jax_peer=True, pin=False, busy=0, stack=None):
    """The benchmark's result dict.  ``kernels=False`` runs the buffered ops (the fast
    path's array code) instead of the backend's fused kernels, to see what they are worth.
    ``threads``: CPU threads of every contender (None: ours by xpmlp's policy, the peers
    their own default).  ``pin``: every contender on one core, one thread each.  ``busy``:
    also time each contender with that many CPU-bound processes running.  ``stack=K``: time
    K stacked models against one model at a time instead."""
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
            result = _run(backend, dtype, epochs, torch_peer, jax_peer, threads, busy,
                          ops=None if kernels else "buffered")
        return dict(result, pin=pin, pinned_core=pinned, busy_processes=busy)
    finally:
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


def _data(backend, dtype):
    """MNIST-shaped random data: (host x, host y, device x, device y)."""
    rng = np.random.default_rng(0)
    x_host = rng.random((N_TRAIN, FEATURES), dtype=np.float32) - np.float32(0.5)
    y_host = rng.integers(0, CLASSES, N_TRAIN)
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


def _run(backend, dtype, epochs, torch_peer, jax_peer, threads, busy, ops):
    x_host, y_host, x, y = _data(backend, dtype)
    ours, model, stepper = bench_ours(backend, x, y, dtype, ops, threads=threads)
    initial_weights = [(backend.to_numpy(layer.W).copy(), backend.to_numpy(layer.b).copy())
                       for layer in model.layers if hasattr(layer, "W")]
    our_first_losses = ours().copy()  # its warm-up, so the memory peak below is the training's own
    memory_key, memory_mb = _peak_memory_mb(backend)  # before torch adds its own
    gather, sgd = bench_memory_passes(backend, x, y, dtype, ops)
    contenders = {"ours": (ours, backend.synchronize),
                  "gemm": (bench_gemm_limit(backend, model), backend.synchronize),
                  "gather": (gather, backend.synchronize), "sgd": (sgd, backend.synchronize)}
    compiled = compiled_steps(model) is not None
    if compiled:  # ours ran the compiled step: time the ops' step loop too
        contenders["array"] = (bench_ours(backend, x, y, dtype, ops, compiled=False)[0], backend.synchronize)
    peer = bench_torch(backend, model, x_host, y_host, threads) if torch_peer else "left out (--no-torch)"
    peer_versions, warmed, jax_check, torch_note = {}, ["ours"], None, None
    if isinstance(peer, str):
        torch_note = peer
    else:
        contenders["torch"], peer_versions["torch"] = peer[:2], peer[2]
    jax = None
    if jax_peer and backend.name == "numpy":  # the JAX contender runs on the CPU
        first_perm = np.random.default_rng(0).permutation(N_TRAIN)  # ours' first epoch's
        jax = bench_jax(initial_weights, x_host.astype(np.dtype(dtype)), y_host, first_perm, our_first_losses)
    if jax is not None:
        contenders["jax"], peer_versions["jax"], jax_check = (jax[0], backend.synchronize), jax[1], jax[2]
        warmed.append("jax")
    median = _time_interleaved(contenders, epochs, warmed=warmed, busy=busy, settle=settle_s(backend))
    epoch_s, gemm_s = median["ours"], median["gemm"]
    torch_s, jax_s, array_s = median.get("torch"), median.get("jax"), median.get("array")
    floor_s = gemm_s + median["gather"] + median["sgd"]
    result = {
        "model": MODEL, "batch_size": BATCH, "dtype": dtype, "epochs_timed": epochs,
        "epoch_s": epoch_s, "array_path_epoch_s": array_s, "torch_epoch_s": torch_s, "torch_note": torch_note,
        "jax_epoch_s": jax_s, "gemm_limit_epoch_s": gemm_s,
        "ratio_torch": epoch_s / torch_s if torch_s else None, "ratio_jax": epoch_s / jax_s if jax_s else None,
        "ratio_limit": epoch_s / gemm_s,
        "gather_epoch_s": median["gather"], "sgd_epoch_s": median["sgd"], "floor_epoch_s": floor_s,
        "ratio_floor": epoch_s / floor_s, "jax_check": jax_check,
        memory_key: memory_mb, **backend.describe(),
        "ops": model.ops.name, "fused_kernels": model.ops.name == "fused", "compiled_step": compiled,
        "threads": blas_threads(threads), "peer_threads": threads,
        **_step_threads(stepper),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "versions": dict(versions(), **peer_versions),
    }
    if busy:
        result["busy"] = {name[len("busy:"):]: t for name, t in median.items() if name.startswith("busy:")}
        result["ratio_busy"] = result["busy"]["ours"] / epoch_s
    return result


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
    if r.get("two_thread_step_share") is not None:
        lines.append(f"steps the compiled step ran on two threads: {r['two_thread_step_share']:.0%}")
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


def main(args):
    result = run(args.device, args.dtype, args.epochs, torch_peer=not args.no_torch, threads=args.threads,
                 kernels=not args.no_kernels, jax_peer=not args.no_jax, pin=args.pin, busy=args.busy,
                 stack=args.stack)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_stack(result) if args.stack else format_table(result))
    sys.stdout.flush()
    return 0
