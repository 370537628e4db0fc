"""Fault injection: kill -9 at chosen points, two writers on one run directory, a killed
sweep driver, torn records, a full disk, and every malformed input we know of.

Kills and full disks run the real command line (``xpmlp.cli.main``) on a small synthetic
MNIST: in a forked child that SIGKILLs itself at the chosen point, then resumed here and
compared bit for bit with an uninterrupted run.  Concurrency and sweeps use subprocesses
on the real MNIST (mlp0-sce at batch 600: a fraction of a second per epoch).
"""
import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import real_mnist_dir
from test_train import assert_same_trajectory, no_temp_files, trajectory

import xpmlp.data
from xpmlp import cli, rundir
from xpmlp.data import Mnist
from xpmlp.rundir import hold_run_dir, lock_holder
from xpmlp.training import loop, train

TRAIN_N, TEST_N, BATCH, EPOCHS = 1000, 300, 100, 3
ITERS = TRAIN_N // BATCH
ARGS = ["--model", "mlp1-relu-sce", "--batch-size", str(BATCH), "--lr", "0.05", "--device", "numpy", "--quiet"]


@pytest.fixture
def synthetic(monkeypatch):
    """The command line trains on a small synthetic MNIST (load_mnist is replaced)."""
    rng = np.random.default_rng(123)
    x = (rng.standard_normal((TRAIN_N + TEST_N, 784)) * 0.3).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((784, 10)), axis=1).astype(np.int64)
    data = Mnist(x[:TRAIN_N], y[:TRAIN_N], x[TRAIN_N:], y[TRAIN_N:])
    monkeypatch.setattr(xpmlp.data, "load_mnist", lambda *args, **kwargs: data)
    return data


def xpmlp_main(capsys, *args):
    """``xpmlp ARGS`` in this process: (exit status, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, *needles):
    code, out, err = result
    assert code == 2, f"exit status {code}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xpmlp: error: "), err
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def straight(tmp_path, synthetic, capsys):
    """An uninterrupted run of EPOCHS epochs, to compare with."""
    run = tmp_path / "straight"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", EPOCHS, "--out", run)[0] == 0
    return run


# ---------------------------------------------------------------- kill -9 at chosen points

def _kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(obj, name, n, before=None, when=None):
    """Replace obj.name by a wrapper that kills this process at its n-th call (counting only
    calls for which ``when(*args)`` holds, if given), after ``before(*args)`` when given,
    which may do part of the work first."""
    original, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        if when is None or when(*args):
            calls[0] += 1
            if calls[0] == n:
                if before is not None:
                    before(*args, **kwargs)
                _kill_self()
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)


def _on_step(n):
    """Kill this process at its n-th optimizer step (the warm-up step counts), whichever
    stepper the trainer runs: the compiled one (Numba; one step a call here) or the ops' one."""
    calls = [0]
    loop.STEPS_PER_CALL = 1
    for cls, name in ((loop.Stepper, "step"), (loop.CompiledStepper, "steps")):
        def step(self, *args, _original=getattr(cls, name)):
            calls[0] += 1
            if calls[0] == n:
                _kill_self()
            return _original(self, *args)
        setattr(cls, name, step)


def _to_checkpoint(src, dst):  # os.replace has other callers (Numba's cache)
    return Path(dst).name == rundir.CHECKPOINT


def _half_append(run_dir, records):  # a torn record: half of the bytes reach the file
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    with open(Path(run_dir) / rundir.METRICS, "ab") as f:
        f.write(data[: len(data) // 2])


def _half_savez(file, **arrays):  # a temporary checkpoint cut short
    file.write(b"PK\x03\x04" + b"\0" * 1000)
    file.flush()


# Where to kill the first run (EPOCHS epochs; each writes metrics, then a checkpoint but
# the last, then the final checkpoint and summary.json), and how the user goes on.
KILL_POINTS = {
    "before-config": (lambda: _on_call(rundir, "write_json", 1), "--out"),
    "first-epoch-no-checkpoint": (lambda: _on_step(4), "--resume"),
    "first-epoch-no-checkpoint-same-out": (lambda: _on_step(4), "--out"),
    "mid-epoch-2": (lambda: _on_step(ITERS + 4), "--resume"),
    "inside-evaluation": (lambda: _on_call(loop, "evaluate", 2), "--resume"),
    "torn-metrics-append": (lambda: _on_call(rundir, "append_metrics", 2, before=_half_append), "--resume"),
    "after-metrics-before-checkpoint": (lambda: _on_call(train.Trainer, "_checkpoint", 2), "--resume"),
    "inside-checkpoint-write": (lambda: _on_call(rundir.np, "savez", 2, before=_half_savez), "--resume"),
    "checkpoint-written-not-renamed": (lambda: _on_call(rundir.os, "replace", 2, when=_to_checkpoint), "--resume"),
    "final-checkpoint": (lambda: _on_call(train.Trainer, "_checkpoint", 3), "--resume"),
    "before-summary": (lambda: _on_call(train.Trainer, "_summary", 1), "--resume"),
}


def _train_and_die(point, run, epochs):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    KILL_POINTS[point][0]()
    cli.main(["train", *ARGS, "--epochs", str(epochs), "--out", str(run)])
    os._exit(0)  # not killed: the test fails on the exit code


def killed_run(point, run, epochs=EPOCHS):
    """Run the CLI in a forked child that kills itself at ``point``."""
    child = multiprocessing.get_context("fork").Process(target=_train_and_die, args=(point, run, epochs))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"{point}: the child was not killed (exit {child.exitcode})"


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_kill_is_bit_identical(tmp_path, straight, capsys, point):
    run = tmp_path / "run"
    killed_run(point, run)
    had_checkpoint, had_config = (run / "checkpoint.npz").exists(), (run / "config.json").exists()
    left_temp = no_temp_files(run)
    how = KILL_POINTS[point][1]
    again = ["--resume", run] if how == "--resume" else [*ARGS, "--out", run]
    code, out, err = xpmlp_main(capsys, "train", *again, "--epochs", EPOCHS, "--device", "numpy", "--quiet")
    assert code == 0, out + err
    assert "Traceback" not in err
    restarted = "starting it again from scratch" in out
    assert restarted == (had_config and not had_checkpoint), out
    if point == "torn-metrics-append":
        assert err.count("warning") == 1 and "metrics.jsonl" in err, err
    assert_same_trajectory(run, straight)
    if point in ("inside-checkpoint-write", "checkpoint-written-not-renamed"):
        assert left_temp, "the kill left no temporary file: the test proved nothing"
    assert no_temp_files(run) == [], "temporary files of the killed writer were left"


# ---------------------------------------------------------------- torn records

def test_torn_last_metrics_line_is_dropped_with_one_warning(tmp_path, synthetic, capsys):
    """Issue 15's reproduction: a finished run whose metrics.jsonl lost its last 37 bytes."""
    run = tmp_path / "run"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 2, "--out", run)[0] == 0
    straight = tmp_path / "straight"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 5, "--out", straight)[0] == 0
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-37])
    config_before = (run / "config.json").read_bytes()

    from xpmlp.report import load_run
    loaded = load_run(run)  # the report reads it too: one warning, the torn record left out
    assert [r["epoch"] for r in loaded.epochs] == [1]
    assert capsys.readouterr().err.count("dropped its last line") == 1

    code, out, err = xpmlp_main(capsys, "train", "--resume", run, "--epochs", 5, "--device", "numpy", "--quiet")
    assert code == 0, out + err
    assert err.count("xpmlp: warning:") == 1 and "metrics.jsonl" in err and "Traceback" not in err
    assert config_before != (run / "config.json").read_bytes()  # epochs 2 -> 5
    # Everything as in the uninterrupted run but the torn record (epoch 2's epoch line):
    arrays, state, records, summary = trajectory(run)
    arrays_s, state_s, records_s, summary_s = trajectory(straight)
    for key in arrays_s:
        np.testing.assert_array_equal(arrays[key], arrays_s[key], err_msg=key)
    assert (state, summary) == (state_s, summary_s)
    assert records == [r for r in records_s if (r["kind"], r["epoch"]) != ("epoch", 2)]


def test_a_bad_line_inside_metrics_is_an_error_not_a_guess(tmp_path, synthetic, capsys):
    run = tmp_path / "run"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 2, "--out", run)[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[3] = lines[3][:10] + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(xpmlp_main(capsys, "train", "--resume", run, "--epochs", 3, "--device", "numpy"),
                          "metrics.jsonl", "line 4")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_append_writes_whole_lines_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    rundir.append_metrics(tmp_path, [{"a": 1}])
    real_write = os.write

    def short_then_full(fd, data):  # the disk fills in the middle of the records
        if len(data) > 4:
            real_write(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(rundir.os, "write", short_then_full)
    with pytest.raises(rundir.DiskFull, match="metrics.jsonl.*no space left"):
        rundir.append_metrics(tmp_path, [{"b": 2}, {"c": 3}])
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'


def test_records_write_nan_and_inf_as_null_and_the_rest_as_json_does(tmp_path):
    records = [{"kind": "iter", "iter": 1, "loss": 0.1 + 0.2, "acc": 1.0, "lr": None},
               {"kind": "iter", "iter": 2, "loss": float("nan"), "acc": 0.5},
               {"kind": "epoch", "train_loss": float("inf"), "nested": [float("-inf"), 2.5, {"x": float("nan")}]}]
    rundir.append_metrics(tmp_path, records)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == json.dumps(records[0])  # byte for byte what json writes
    assert [json.loads(line) for line in lines[1:]] == [
        {"kind": "iter", "iter": 2, "loss": None, "acc": 0.5},
        {"kind": "epoch", "train_loss": None, "nested": [None, 2.5, {"x": None}]}]


# ---------------------------------------------------------------- one writer per run directory

@contextlib.contextmanager
def held_by_another_process(run_dir):
    """A forked child holds ``run_dir``'s lock while inside (then it is killed); yields the child."""
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()

    def hold():
        with hold_run_dir(run_dir):
            ready.set()
            time.sleep(120)

    child = fork.Process(target=hold)
    child.start()
    try:
        assert ready.wait(10)
        yield child
    finally:
        child.kill()
        child.join(10)


def test_second_writer_is_refused_naming_the_holder(tmp_path, synthetic, capsys):
    run = tmp_path / "run"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 1, "--out", run)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with held_by_another_process(run) as holder:
        assert lock_holder(run) == holder.pid
        assert_one_line_error(xpmlp_main(capsys, "train", "--resume", run, "--epochs", 2, "--device", "numpy"),
                              f"in use by another process (pid {holder.pid})")
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert lock_holder(run) is None  # released with its holder
    assert xpmlp_main(capsys, "train", "--resume", run, "--epochs", 2, "--device", "numpy", "--quiet")[0] == 0


def test_lock_is_released_by_kill_9(tmp_path):
    """The kernel drops a flock with its process: a kill -9 leaves no stale lock."""
    run = tmp_path / "run"
    run.mkdir()
    with held_by_another_process(run) as holder:
        assert lock_holder(run) == holder.pid
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert lock_holder(run) is None
        with hold_run_dir(run):
            assert lock_holder(run) == os.getpid()


def test_sweep_skips_a_run_another_process_holds(tmp_path, synthetic, capsys):
    """A run started by someone else (no checkpoint yet): the sweep neither deletes nor runs it."""
    from xpmlp.sweep import run_sweep
    (tmp_path / "grid.toml").write_text(f'out = "{tmp_path / "runs"}"\n[defaults]\nmodel = "mlp0-sce"\n'
                                        'epochs = 1\n[grid]\nlr = [0.01]\n')
    run = tmp_path / "runs" / "mlp0-sce_epochs=1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")  # its first epoch is under way
    with hold_run_dir(run):
        code = run_sweep([str(tmp_path / "grid.toml")])
        out = capsys.readouterr().out
        assert f"skip   {run}: in use by process {os.getpid()}" in out
        assert code == 1 and "skipped 1 in use by another process" in out
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]


# ---------------------------------------------------------------- processes: sweeps and concurrent writers

FAST = ["--model", "mlp0-sce", "--batch-size", "600", "--device", "cpu"]


def env():
    return dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()), OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def xpmlp_process(*args, cwd, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "xpmlp", *map(str, args)], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def xpmlp_run(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "xpmlp", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive(pid):
    """Running, not merely a zombie waiting for a parent (or init) to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


GRID = """out = "{out}"
[defaults]
model = "mlp0-sce"
batch_size = 600
device = "cpu"
epochs = {epochs}
[grid]
lr = [0.01, 0.1]
"""


def sweep_config(directory, out, epochs):
    path = Path(directory) / f"{out}.toml"
    path.write_text(GRID.format(out=(Path(directory) / out).as_posix(), epochs=epochs))
    return path


def sweep_runs(directory, out):
    return sorted((Path(directory) / out).iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killed_sweep_driver_leaves_no_orphans_and_a_rerun_completes(tmp_path):
    epochs = 8
    driver = xpmlp_process("sweep", sweep_config(tmp_path, "runs", epochs), "--jobs", 2, cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "runs").exists() and len(sweep_runs(tmp_path, "runs")) == 2
                 and all(lock_holder(d) for d in sweep_runs(tmp_path, "runs")), 120, "both runs to start")
        workers = [lock_holder(d) for d in sweep_runs(tmp_path, "runs")]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        driver.kill()
        driver.communicate()
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, f"the workers {workers} to end")
    assert all(lock_holder(d) is None for d in sweep_runs(tmp_path, "runs"))
    unfinished = [d for d in sweep_runs(tmp_path, "runs")
                  if json.loads((d / "summary.json").read_text() if (d / "summary.json").exists()
                                else '{"status": "none"}')["status"] != "completed"]
    assert unfinished, "the runs finished before the driver was killed: the test proved nothing"

    rerun = xpmlp_run("sweep", sweep_config(tmp_path, "runs", epochs), "--jobs", 2, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    straight = xpmlp_run("sweep", sweep_config(tmp_path, "straight", epochs), "--jobs", 2, cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    for run, ref in zip(sweep_runs(tmp_path, "runs"), sweep_runs(tmp_path, "straight")):
        assert run.name == ref.name
        assert_same_trajectory(run, ref)


def test_two_sweeps_at_once_train_each_run_once(tmp_path):
    config = sweep_config(tmp_path, "runs", 3)
    drivers = [xpmlp_process("sweep", config, "--jobs", 1, cwd=tmp_path) for _ in range(2)]
    results = [(d.wait(300), *d.communicate()) for d in drivers]
    for code, out, err in results:
        assert code in (0, 1) and "Traceback" not in out + err and "FAILED" not in out, out + err
    assert any("skip" in out for _, out, _ in results), "neither sweep saw the other"
    for run in sweep_runs(tmp_path, "runs"):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3], run
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert (run / "train.log").read_text().count("training mlp0-sce") == 1, "a run was trained twice"
    again = xpmlp_run("sweep", config, "--dry-run", cwd=tmp_path)
    assert "sweep: 2 runs, 2 already done" in again.stdout


def test_train_while_another_trains_the_same_directory(tmp_path):
    first = xpmlp_process("train", *FAST, "--epochs", 200, "--quiet", "--out", "run", cwd=tmp_path)
    try:
        wait_for(lambda: (tmp_path / "run" / "metrics.jsonl").exists(), 60, "the first run's first epoch")
        second = xpmlp_run("train", "--resume", "run", "--epochs", 300, "--device", "cpu", cwd=tmp_path)
        assert_one_line_error((second.returncode, second.stdout, second.stderr), f"(pid {first.pid})")
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: a checkpoint, status interrupted
        out, err = first.communicate(timeout=60)
    assert first.returncode == 130, out + err
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert epochs == list(range(1, len(epochs) + 1)), "records interleaved or duplicated"


# ---------------------------------------------------------------- a full disk

def _fail_checkpoint_write(monkeypatch):
    """The 2nd checkpoint (after epoch 2) meets a full disk halfway through."""
    savez, calls = np.savez, [0]

    def savez_on_a_full_disk(file, **arrays):
        calls[0] += 1
        if calls[0] == 2:
            file.write(b"PK\x03\x04" + b"\0" * 5000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return savez(file, **arrays)

    monkeypatch.setattr(rundir.np, "savez", savez_on_a_full_disk)
    return "checkpoint.npz"


def _fail_metrics_append(monkeypatch):
    """The 2nd epoch's records meet a full disk after a few bytes."""
    write, calls = os.write, [0]

    def write_on_a_full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            calls[0] += 1
            if calls[0] == 2:
                write(fd, bytes(data[:100]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(rundir.os, "write", write_on_a_full_disk)
    return "metrics.jsonl"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to find the file written")
@pytest.mark.parametrize("fail", [_fail_checkpoint_write, _fail_metrics_append], ids=["checkpoint", "metrics"])
def test_full_disk_is_one_line_and_the_run_resumes(tmp_path, straight, capsys, monkeypatch, fail):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        name = fail(patch)
        line = assert_one_line_error(xpmlp_main(capsys, "train", *ARGS, "--epochs", EPOCHS, "--out", run),
                                     f"{run / name}: no space left on device", "needs about", "free")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 1, line
    _, _, state, _ = rundir.load_checkpoint(run)  # the last good checkpoint, intact
    assert state["epoch"] == 1
    assert no_temp_files(run) == []
    # space freed: resume, and end where the uninterrupted run ended
    code, out, err = xpmlp_main(capsys, "train", "--resume", run, "--epochs", EPOCHS, "--device", "numpy", "--quiet")
    assert code == 0 and "warning" not in err, out + err  # no torn line was left to drop
    assert_same_trajectory(run, straight)


def _tmpfs_usable(directory):
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {directory}"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def test_full_disk_on_a_real_small_filesystem(tmp_path):
    """A 128 KiB tmpfs (in a private mount namespace): the first checkpoint fits, the second
    does not.  The run is copied out before the namespace ends, then resumed on a roomy disk."""
    mount = tmp_path / "small"
    mount.mkdir()
    if not _tmpfs_usable(mount):
        pytest.skip("cannot mount a tmpfs here (unshare -rm); the write-wrapper tests above cover a full disk")
    script = (f"mount -t tmpfs -o size=128k tmpfs {mount} && "
              f"{sys.executable} -m xpmlp train {' '.join(FAST)} --epochs 3 --quiet --out {mount}/run; "
              f"echo $? > {tmp_path}/rc; cp -a {mount}/run {tmp_path}/run")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=120)
    rc = int((tmp_path / "rc").read_text())
    assert_one_line_error((rc, p.stdout, p.stderr), "no space left on device", "needs about")
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    resumed = xpmlp_run("train", "--resume", "run", "--epochs", 3, "--quiet", "--device", "cpu", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    straight = xpmlp_run("train", *FAST, "--epochs", 3, "--quiet", "--out", "straight", cwd=tmp_path)
    assert straight.returncode == 0
    assert_same_trajectory(run, tmp_path / "straight")


# ---------------------------------------------------------------- malformed input: one line, exit 2, nothing left

@pytest.fixture
def finished(tmp_path, synthetic, capsys):
    """A finished 1-epoch run to damage."""
    run = tmp_path / "run"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 1, "--out", run)[0] == 0
    return run


def _edit_config(run, **changes):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, **changes)))


def _foreign_checkpoint(run):
    """The checkpoint of another model (mlp0-sce) copied over this run's (mlp1-relu-sce)."""
    other = run.parent / "other"
    assert cli.main(["train", "--model", "mlp0-sce", "--epochs", "1", "--device", "numpy", "--quiet",
                     "--out", str(other)]) == 0
    shutil.copy(other / "checkpoint.npz", run / "checkpoint.npz")


RESUME = ["train", "--resume", "{run}", "--epochs", "2", "--device", "numpy"]
EVAL = ["eval", "{run}"]
RUN_FILE_DAMAGE = {
    # name: (damage done to a finished run, command, words of the one-line error)
    "summary-not-json-resume": (lambda r: (r / "summary.json").write_text('{"status": "compl'), RESUME,
                                ["summary.json", "not valid JSON"]),
    "summary-list-resume": (lambda r: (r / "summary.json").write_text("[]"), RESUME,
                            ["summary.json", "JSON object"]),
    "config-not-json-resume": (lambda r: (r / "config.json").write_text("{"), RESUME, ["config.json", "JSON"]),
    "config-not-json-eval": (lambda r: (r / "config.json").write_text("{"), EVAL, ["config.json", "JSON"]),
    "config-list-resume": (lambda r: (r / "config.json").write_text("[]"), RESUME, ["config.json", "JSON object"]),
    "config-list-eval": (lambda r: (r / "config.json").write_text("[]"), EVAL, ["config.json", "JSON object"]),
    "config-binary-eval": (lambda r: (r / "config.json").write_bytes(b"\xff\xfe{}"), EVAL, ["config.json"]),
    "config-lr-string-resume": (lambda r: _edit_config(r, lr="0.01"), RESUME, ["config.json", "--lr", "number"]),
    "config-lr-string-eval": (lambda r: _edit_config(r, lr="0.01"), EVAL, ["config.json", "--lr", "number"]),
    "config-epochs-float-eval": (lambda r: _edit_config(r, epochs=1.5), EVAL, ["config.json", "--epochs"]),
    "foreign-checkpoint-resume": (_foreign_checkpoint, RESUME, ["checkpoint.npz", "shapes"]),
    "foreign-checkpoint-eval": (_foreign_checkpoint, EVAL, ["checkpoint.npz", "shapes"]),
}


@pytest.mark.parametrize("case", list(RUN_FILE_DAMAGE))
def test_damaged_run_files(finished, capsys, case):
    damage, command, needles = RUN_FILE_DAMAGE[case]
    damage(finished)
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    assert_one_line_error(xpmlp_main(capsys, *[str(a).replace("{run}", str(finished)) for a in command]), *needles)
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()} == before, "the run was changed"


BAD_TRAIN = {
    "seed-negative": (["--seed", "-1"], ["--seed", "-1"]),
    "hidden-huge": (["--hidden", "1000000000", "--activation", "relu", "--loss", "sce"], ["GiB"]),
    "momentum-minus-inf": (["--momentum", "-inf"], ["--momentum", "finite"]),
    "lr-minus-small": (["--lr", "-1e-3"], ["--lr"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_train_settings_leave_nothing(tmp_path, synthetic, capsys, case):
    args, needles = BAD_TRAIN[case]
    base = [a for a in ARGS if a not in ("--model", "mlp1-relu-sce")] if "--hidden" in args else ARGS
    assert_one_line_error(xpmlp_main(capsys, "train", *base, "--epochs", 1, *args, "--out", tmp_path / "out"),
                          *needles)
    assert not (tmp_path / "out").exists(), "an error left a run directory"


OK_GRID = '[defaults]\nmodel = "mlp0-sce"\nepochs = 1\n[grid]\nlr = [0.01, 0.1]\n'
BAD_SWEEPS = {
    # name: (config file contents, or a function making it; extra flags; words of the error)
    "a-directory": (lambda p: p.mkdir(), [], ["is a directory"]),
    "not-utf8": (lambda p: p.write_bytes(b"[grid]\nlr = [0.1]\n# \xff\xfe\n"), [], ["UTF-8"]),
    "defaults-not-a-table": ("defaults = 3\n[grid]\nlr = [0.1]\n", [], ["[defaults]"]),
    "grid-not-a-table": ("grid = 3\n", [], ["[grid]"]),
    "out-not-a-string": ('out = 5\n' + OK_GRID, [], ["out"]),
    "overrides-not-tables": ('overrides = [3]\n' + OK_GRID, [], ["overrides"]),
    "epochs-fractional": (OK_GRID.replace("epochs = 1", "epochs = 1.5"), [], ["--epochs", "1.5"]),
    "seed-negative": (OK_GRID + "seed = [0, -1]\n", [], ["--seed", "-1"]),
    "empty-grid-list": (OK_GRID.replace("[0.01, 0.1]", "[]"), [], ["empty", "lr"]),
    "epochs-override-zero": (OK_GRID, ["--epochs", "0"], ["--epochs"]),
    "corrupt-summary-dry-run": (OK_GRID, ["--dry-run"], ["summary.json", "not valid JSON"]),
}


@pytest.mark.parametrize("case", list(BAD_SWEEPS))
def test_bad_sweeps_are_refused_before_any_run(tmp_path, synthetic, capsys, case):
    make, flags, needles = BAD_SWEEPS[case]
    config = tmp_path / "grid.toml"
    if callable(make):
        make(config)
    else:
        config.write_text(make)
    if case == "corrupt-summary-dry-run":  # a run of the grid whose summary.json is damaged
        run = tmp_path / "runs" / "mlp0-sce_epochs=1"
        assert cli.main(["train", "--model", "mlp0-sce", "--epochs", "1", "--device", "numpy", "--quiet",
                         "--out", str(run)]) == 0
        (run / "summary.json").write_text("{")
        capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_one_line_error(xpmlp_main(capsys, "sweep", config, "--out", tmp_path / "runs", *flags), *needles)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "the sweep left files"


def test_a_second_ctrl_c_while_exiting_prints_no_traceback(tmp_path):
    """Ctrl-C in the first epoch, then another as the process exits (after the run's own
    handler is gone): one clean exit 130, not an "Exception ignored" traceback."""
    args = ["train", *FAST, "--epochs", "2", "--quiet", "--out", "run"]
    script = f"""
import os, signal, sys
from xpmlp import cli
from xpmlp.training import loop, train
calls = [0]
loop.STEPS_PER_CALL = 1
for cls, name in ((loop.Stepper, "step"), (loop.CompiledStepper, "steps")):  # whichever the trainer runs
    def step_then_ctrl_c(self, *args, _step=getattr(cls, name)):
        _step(self, *args)
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
    setattr(cls, name, step_then_ctrl_c)
code = cli.main({args!r})
os.kill(os.getpid(), signal.SIGINT)
sys.exit(code)
"""
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
    assert "interrupted in epoch 1 after" in p.stdout


def test_run_files_share_one_mode(tmp_path, synthetic, capsys):
    """Atomically written files (config, summary, checkpoint) get the mode a plain open()
    gives metrics.jsonl, not mkstemp's 0600."""
    run = tmp_path / "run"
    umask = os.umask(0o022)
    try:
        assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 1, "--out", run)[0] == 0
    finally:
        os.umask(umask)
    modes = {name: (run / name).stat().st_mode & 0o777 for name in rundir.RESULT_FILES}
    assert set(modes.values()) == {0o644}, modes
