"""The processes a sweep starts: their environment, their end with the sweep, and the
sweep's own handling of Ctrl-C and SIGTERM.  Used by the sweep's executors and by
``xpmlp train`` (a run started by a sweep)."""
import contextlib
import ctypes
import os
import signal
import sys

from .threads import blas_threads

PARENT_ENV = "XPMLP_SWEEP_PARENT"  # set for a sweep's runs: the driver's pid


def run_env(cores):
    """The environment of a sweep's ``xpmlp train`` processes, each of which has ``cores``
    cores: BLAS threads by xpmlp's policy within them, and this process as the parent whose
    death ends them (die_with_parent)."""
    threads = str(min(blas_threads(), cores))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if cores == 1 or "XPMLP_THREADS" in os.environ:  # else the compiled step may take two
        env["XPMLP_THREADS"] = threads
    env[PARENT_ENV] = str(os.getpid())  # each run stops when this process dies: die_with_parent()
    return env


@contextlib.contextmanager
def stop_on_signals(stop_runs):
    """Inside, Ctrl-C and SIGTERM call ``stop_runs()`` and are recorded in the list yielded
    (true once the sweep should start nothing new) instead of ending this process."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        stop_runs()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def die_with_parent():
    """In a sweep's run: ask Linux to send us SIGTERM when the sweep that started us dies,
    however it dies (kill -9 included), so no run is left orphaned; SIGTERM ends the run
    like Ctrl-C, at a checkpoint.  (Elsewhere than Linux, runs outlive a killed sweep.)"""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before we asked
        print("xpmlp: the sweep that started this run has ended; not starting it", file=sys.stderr)
        sys.exit(130)
