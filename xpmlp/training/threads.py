"""How many CPU threads NumPy's BLAS may use while `train`, `sweep` and `bench` run.

Default: one.  The products of a batch of 100 are small (at most 100 x 784 x 256), so
OpenBLAS's second thread buys at most ~1.4x on them, and only on an idle machine; once
another process keeps a core busy, the two threads wait for each other at every product
and an epoch becomes 3-15x slower.  One thread is steady (docs/performance.md, Threads, measured
with `xpmlp bench --busy 1`).  ``XPMLP_THREADS`` or a command's ``--threads`` overrides it.

The compiled step (training/compiled.py) does better with more cores: it splits each step
(or, for stacked models, the models) between threads of its own, each calling BLAS with
one thread, and goes back to one while that is faster (a busy machine).  It takes one
thread a core this process may run on, unless ``XPMLP_THREADS`` / ``--threads`` says
otherwise; a step uses as many as its batch is worth (compiled.ROWS_PER_PART).
"""
import contextlib
import os
import sys

from ..config import TrainError

DEFAULT_THREADS = 1


def blas_threads(threads=None):
    """Threads for BLAS: ``threads`` when given, else ``$XPMLP_THREADS``, else the default."""
    if threads is not None:
        return threads
    value = os.environ.get("XPMLP_THREADS")
    if value is None:
        return DEFAULT_THREADS
    if not value.strip().isdigit() or int(value) < 1:
        raise TrainError(f"XPMLP_THREADS must be a positive integer, got {value!r}")
    return int(value)


def step_threads(threads=None):
    """Threads of the compiled step: ``threads`` or ``$XPMLP_THREADS`` when given, else the
    cores this process may run on."""
    if threads is None and os.environ.get("XPMLP_THREADS") is not None:
        threads = blas_threads()
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, threads)


@contextlib.contextmanager
def limit_blas_threads(threads=None):
    """Inside, NumPy's BLAS, and torch's own CPU pool where torch is loaded (--device torch;
    threadpoolctl does not reach it), use ``blas_threads(threads)`` threads."""
    n = blas_threads(threads)
    with contextlib.ExitStack() as limits:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # e.g. a GPU box with only the essentials: BLAS threads stay as they are
            pass
        else:
            limits.enter_context(threadpool_limits(limits=n, user_api="blas"))
        torch = sys.modules.get("torch")  # never imported here: only a torch run has it
        if torch is not None:
            limits.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(n)
        yield
