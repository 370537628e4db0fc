"""The processes a sweep starts: their environment, their end with the sweep, and the
sweep's own handling of Ctrl-C and SIGTERM.  Used by the sweep's executors and by
``xpmlp train`` (a run started by a sweep)."""
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading

from .training.threads import blas_threads

PARENT_ENV = "XPMLP_SWEEP_PARENT"  # set for a sweep's runs: the driver's pid
PIPE_ENV = "XPMLP_SWEEP_STDIN"  # set where a run's stdin is a pipe from the driver, held open while it lives
# Linux ends a run at its sweep's death by a signal (PR_SET_PDEATHSIG); elsewhere the run
# watches the pipe (die_with_parent).
_PDEATHSIG = sys.platform.startswith("linux")


def start_run(command, log, env):
    """A sweep's run: ``command`` writing to ``log``, in a session of its own on POSIX (signals
    reach it only through us: ``interrupt``), its stdin a pipe this process holds open while
    it lives (die_with_parent)."""
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env, **{PIPE_ENV: "1"}), start_new_session=True)


def interrupt(proc):
    """Ask a sweep's run to checkpoint and stop, as Ctrl-C does: SIGINT.  Windows has no
    SIGINT to send (send_signal raises), but there the run shares our console (a new session
    means nothing on Windows), so the console's Ctrl-C has reached it already."""
    if sys.platform != "win32":
        proc.send_signal(signal.SIGINT)


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
    """In a sweep's run: get SIGTERM when the sweep that started us dies, however it dies
    (kill -9 included), so no run is left orphaned; SIGTERM ends the run like Ctrl-C, at a
    checkpoint.  Linux sends it (PR_SET_PDEATHSIG); elsewhere (macOS, Windows) a thread
    waits on the pipe the sweep gave us as stdin (start_run), which reads to its end when
    the OS closes the sweep's side, at its death."""
    parent = os.environ.pop(PARENT_ENV, None)
    piped = os.environ.pop(PIPE_ENV, None)
    if parent is None:
        return
    if _PDEATHSIG:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    elif piped:
        threading.Thread(target=_stop_at_end_of, args=(sys.stdin.buffer,), daemon=True, name="xpmlp-parent").start()
    else:  # started by an executor that gives no pipe (Ray's workers): it outlives a killed sweep
        return
    if os.getppid() != int(parent):  # it died before we asked
        print("xpmlp: the sweep that started this run has ended; not starting it", file=sys.stderr)
        sys.exit(130)


def _stop_at_end_of(stream):
    stream.read()  # nothing is ever written: this returns when the sweep's end is closed
    signal.raise_signal(signal.SIGTERM)
