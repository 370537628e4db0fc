"""Windows and macOS, simulated on Linux (no other OS is at hand).

Windows: ``fcntl`` and ``resource`` cannot be imported, ``os.fchmod`` and the affinity calls
are absent, and ``msvcrt.locking`` (byte-range locks, exclusive, dropped with the process)
stands in for flock; the stand-in keeps its contract on POSIX record locks.  The code
under test runs in a subprocess that starts with SIMULATED_WINDOWS, so nothing of this
process's Linux leaks in.  macOS: ``sys.platform`` is "darwin", no affinity calls.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import pytest
from helpers import real_mnist_dir

from xpmlp import bench

SIMULATED_WINDOWS = textwrap.dedent("""
    import fcntl as _fcntl, os, sys, types
    # The standard library's own msvcrt probes first: they take it for Windows itself.
    import getpass, multiprocessing.spawn, subprocess

    def _locking(fd, mode, nbytes):  # msvcrt.locking: nbytes from the file position
        start = os.lseek(fd, 0, os.SEEK_CUR)
        if mode == 0:  # LK_UNLCK
            return _fcntl.lockf(fd, _fcntl.LOCK_UN, nbytes, start)
        try:
            _fcntl.lockf(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB, nbytes, start)
        except OSError:
            raise PermissionError(13, "Permission denied") from None  # what LK_NBLCK raises

    sys.modules["msvcrt"] = types.SimpleNamespace(locking=_locking, LK_UNLCK=0, LK_NBLCK=2)
    for _name in ("fcntl", "resource"):
        sys.modules[_name] = None  # import raises ImportError
    for _name in ("fchmod", "sched_getaffinity", "sched_setaffinity"):
        if hasattr(os, _name):
            delattr(os, _name)
""")


def windows_python(code, *, wait=True, **kwargs):
    """``code`` in a new Python that starts as a simulated Windows one."""
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()))
    args = [sys.executable, "-c", SIMULATED_WINDOWS + textwrap.dedent(code)]
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def windows_xpmlp(*args, **kwargs):
    return windows_python(f"import xpmlp.cli; sys.exit(xpmlp.cli.main({[str(a) for a in args]!r}))", **kwargs)


TRAIN = ["train", "--model", "mlp0-sce", "--batch-size", "600", "--epochs", "1", "--device", "cpu", "--quiet"]


def test_the_simulation_is_windows_like():
    result = windows_python("""
        for name in ("fcntl", "resource"):
            try:
                __import__(name)
            except ImportError:
                print("no", name)
        print(hasattr(os, "fchmod"), hasattr(os, "sched_getaffinity"))
    """)
    assert result.stdout.split("\n")[:3] == ["no fcntl", "no resource", "False False"], result.stdout + result.stderr


def test_every_command_imports_on_windows():
    result = windows_python("""
        import xpmlp.cli, xpmlp.bench, xpmlp.sweep, xpmlp.rundir, xpmlp.training.stack, xpmlp.training.train
        assert xpmlp.rundir.fcntl is None
        sys.exit(xpmlp.cli.main(["--help"]))
    """)
    assert result.returncode == 0 and "train" in result.stdout, result.stdout + result.stderr


def test_every_test_module_collects_on_windows():
    """A Windows user can run the suite: no test module imports a POSIX-only module (fcntl,
    pty, termios, resource) at its top; the tests that need one skip themselves."""
    tests = os.path.dirname(os.path.abspath(__file__))
    result = windows_python(f"""
        import glob, importlib, pytest
        for _name in ("pty", "termios"):
            sys.modules[_name] = None
        sys.path.insert(0, {tests!r})
        failed = []
        for path in sorted(glob.glob(os.path.join({tests!r}, "test_*.py"))):
            name = os.path.basename(path)[:-3]
            try:
                importlib.import_module(name)
            except pytest.skip.Exception:  # a module that skips itself (an optional dependency)
                pass
            except Exception as exc:  # noqa: BLE001 - each failure is reported
                failed.append(f"{{name}}: {{exc!r}}")
        print("\\n".join(failed) or "all collected")
    """)
    assert result.stdout.strip() == "all collected", result.stdout + result.stderr


def test_windows_trains_and_holds_its_lock_with_msvcrt(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = windows_python(f"""
        import time
        from xpmlp.rundir import hold_run_dir
        with hold_run_dir({str(run)!r}):
            print("held", flush=True)
            time.sleep(300)
    """, wait=False)
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()
        refused = windows_xpmlp(*TRAIN, "--out", run)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert f"in use by another process (pid {holder.pid})" in lines[0]
        os.kill(holder.pid, signal.SIGKILL)  # the lock dies with its process
        holder.wait(10)
    finally:
        holder.kill()
        holder.communicate()
    trained = windows_xpmlp(*TRAIN, "--out", run)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "summary.json", "checkpoint.npz", "metrics.jsonl"):
        # written without os.fchmod, they get a plain open()'s mode, as metrics.jsonl does
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(run.glob(".*.tmp"))


def test_windows_lock_holder_sees_a_live_holder_and_not_a_dead_one(tmp_path):
    result = windows_python(f"""
        import multiprocessing, time
        from xpmlp.rundir import hold_run_dir, lock_holder

        def hold(path, ready):
            with hold_run_dir(path):
                ready.set()
                time.sleep(300)

        if __name__ == "__main__":
            ready = multiprocessing.get_context("fork").Event()
            child = multiprocessing.get_context("fork").Process(target=hold, args=({str(tmp_path)!r}, ready))
            child.start()
            ready.wait(30)
            seen = lock_holder({str(tmp_path)!r})
            child.kill()
            child.join()
            print(seen == child.pid, lock_holder({str(tmp_path)!r}))
    """)
    assert result.stdout.split() == ["True", "None"], result.stdout + result.stderr


def test_windows_bench_runs_pinned_nowhere_and_without_an_rss():
    result = windows_python("""
        from xpmlp import bench
        bench.N_TRAIN, bench.SETTLE_S = 1000, 0.0  # ten steps an epoch
        r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, pin=True)
        print(r["pinned_core"], r["threads"], r["peak_rss_mb"])
        print(bench.format_table(r))
    """)
    assert result.returncode == 0, result.stderr
    first, table = result.stdout.split("\n", 1)
    assert first == "None 1 None"
    assert "one thread each, not pinned" in table and "peak_rss_mb n/a" in table


# ---------------------------------------------------------------- bench

@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(bench, "N_TRAIN", 1000)
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)


@pytest.mark.parametrize("platform, unit", [("linux", 2**10), ("darwin", 1)])
def test_peak_rss_is_in_mib_whatever_the_unit_of_ru_maxrss(monkeypatch, platform, unit):
    usage = types.SimpleNamespace(ru_maxrss=300 * 2**20 // unit)  # 300 MiB
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: usage)
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", platform)
    assert bench._peak_memory_mb(types.SimpleNamespace(name="numpy")) == ("peak_rss_mb", 300)


def test_without_resource_the_peak_rss_is_not_known(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)
    assert bench._peak_memory_mb(types.SimpleNamespace(name="numpy")) == ("peak_rss_mb", None)
    assert bench._mb(None) == "n/a"


def test_pin_where_the_os_cannot_pin_runs_one_thread_each_and_says_so(small, monkeypatch):
    # macOS and Windows have no os.sched_getaffinity / sched_setaffinity
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "sched_setaffinity")
    r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, pin=True)
    assert r["pinned_core"] is None and r["threads"] == 1 and r["peer_threads"] == 1
    assert "one thread each, not pinned" in bench.format_table(r)
    assert r["peak_rss_mb"] > 0


# ---------------------------------------------------------------- installing

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("os_name, bin_dir", [("Windows_NT", "Scripts"), ("", "bin")])
def test_make_calls_the_venvs_programs_where_the_os_puts_them(tmp_path, os_name, bin_dir):
    """`make -n` prints the commands a fresh clone would run (-B: as if nothing were built)."""
    if shutil.which("make") is None:
        pytest.skip("no make here")
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-n", "-B", "-C", str(REPO), f"VENV={venv}", f"OS={os_name}", "test", "train"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, OS=os_name))
    assert result.returncode == 0, result.stderr
    for program in ("python -m pip install", "xpmlp data", "python -m pytest", "xpmlp train"):
        assert f"{venv}/{bin_dir}/{program}" in result.stdout, program
    other = "bin" if bin_dir == "Scripts" else "Scripts"
    assert f"{venv}/{other}/" not in result.stdout


@pytest.mark.parametrize("platform, cupy", [("linux", True), ("win32", True), ("darwin", False)])
def test_cuda_extras_install_cupy_only_where_its_wheels_exist(platform, cupy):
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in ("cuda12", "cuda13"):
        (requirement,) = (Requirement(r) for r in extras[extra])
        assert requirement.name.startswith("cupy-cuda")
        assert requirement.marker.evaluate({"sys_platform": platform}) is cupy, (extra, platform)


# ---------------------------------------------------------------- a sweep's runs

@pytest.mark.parametrize("platform, sent", [("linux", [signal.SIGINT]), ("darwin", [signal.SIGINT]), ("win32", [])])
def test_a_sweep_interrupts_its_runs_with_sigint_except_on_windows(monkeypatch, platform, sent):
    """Windows' send_signal has no SIGINT (it raises); the console's Ctrl-C reaches the runs there."""
    from xpmlp import processes as sweep

    class Run:
        def send_signal(self, sig):
            if sys.platform == "win32":
                raise ValueError(f"Unsupported signal: {sig}")
            signals.append(sig)

    signals = []
    monkeypatch.setattr(sys, "platform", platform)
    sweep.interrupt(Run())
    assert signals == sent


def test_without_the_parent_death_signal_a_run_ends_with_its_killed_sweep(tmp_path):
    """macOS and Windows have no PR_SET_PDEATHSIG: the run (here with it switched off) watches
    the stdin pipe its sweep holds, and on the sweep's kill -9 checkpoints and stops."""
    from test_faults import alive, wait_for

    run = tmp_path / "run"
    run_code = ("import sys, xpmlp.processes; xpmlp.processes._PDEATHSIG = False\n"
                "from xpmlp.cli import main; sys.exit(main(sys.argv[1:]))")
    train = ["train", "--model", "mlp2-relu-sce", "--epochs", "40", "--device", "cpu", "--quiet", "--out", str(run)]
    sweep_code = textwrap.dedent(f"""
        import sys, time
        from xpmlp import processes as sweep
        proc = sweep.start_run([sys.executable, "-c", {run_code!r}, *{train!r}], open({str(tmp_path / 'log')!r}, "a"),
                               sweep.run_env(1))
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()))
    driver = subprocess.Popen([sys.executable, "-c", sweep_code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        child = int(driver.stdout.readline())
        wait_for(lambda: (run / "metrics.jsonl").exists() or not alive(child), 120, "the run to train")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        driver.kill()
        driver.communicate()
    try:
        wait_for(lambda: not alive(child), 60, "the run to end with its sweep")
    finally:
        if alive(child):  # the test failed: leave no orphan behind
            os.kill(child, signal.SIGKILL)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] < 40, summary
    assert (run / "checkpoint.npz").exists()
