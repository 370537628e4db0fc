"""`xpmlp sweep --executor ray` on a real local Ray instance, one for the whole module (Ray
takes 10-20 s to start here): the same run directories as the local executor, with the
workers writing in place and with the files sent back to the driver, through a worker
killed mid-run, a Ctrl-C on the driver and reruns.  The grid: three 3-epoch runs of mlp0-sce
on the real MNIST (about a second of training each)."""
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import real_mnist_dir

from xpmlp import rundir
from xpmlp.config import TrainError
from xpmlp.sweep import run_sweep
from xpmlp.sweep.ray_executor import RayExecutor, group_work_dirs, work_dir
from xpmlp.training.stack import group_state

# Where Ray is not installed (a [test]-only install, the GPU image) the module is skipped
# with this reason, not an error at collection.
ray = pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra): the Ray executor is not tested here")

GRID = """
out = "{out}"
[defaults]
model = "mlp0-sce"
epochs = 3
batch_size = 100
device = "cpu"
[grid]
lr = {lrs}
"""
LRS = [0.01, 0.05, 0.1]


def run_names(epochs=3):
    """Each learning rate's run directory name in a grid of ``epochs`` epochs."""
    return {0.01: f"mlp0-sce_epochs={epochs}", 0.05: f"mlp0-sce_epochs={epochs}_lr=0.05",
            0.1: f"mlp0-sce_epochs={epochs}_lr=0.1"}


RUNS = run_names()
TWO = [0.01, 0.1]  # most tests run two: one at a time on each of the instance's two CPUs
TIME_KEYS = {"train_time_s", "partial_time_s"}  # the only things two runs of a grid point may differ in


def write_config(directory, lrs=LRS, epochs=3):
    path = Path(directory) / "grid.toml"
    path.write_text(GRID.replace("{out}", (Path(directory) / "runs").as_posix()).replace("{lrs}", str(lrs))
                    .replace("epochs = 3", f"epochs = {epochs}"))
    return path


def cli(*args, cwd, **kwargs):
    """`python -m xpmlp ARGS` in ``cwd`` (never the repository root, whose xpmlp/ would shadow
    the installed package)."""
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "xpmlp", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for the module; its address, for drivers in other processes.
    Its workers inherit this environment: the data directory, and quiet warnings."""
    saved = {k: os.environ.get(k) for k in ("XPMLP_DATA_DIR", "PYTHONWARNINGS")}
    os.environ.update(XPMLP_DATA_DIR=str(real_mnist_dir()), PYTHONWARNINGS="ignore")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The grid through the local executor: the reference every Ray sweep must equal."""
    root = tmp_path_factory.mktemp("local")
    code, out, err = finish(cli("sweep", write_config(root), "--jobs", "2", cwd=root))
    assert code == 0, out + err
    return root / "runs"


def sweep_here(config, stack=False, **ray_options):
    """run_sweep through Ray in this process, on the module's instance: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_sweep([str(config)], executor=RayExecutor(**ray_options),
                         data_dir=str(real_mnist_dir()), stack=stack)
    return code, out.getvalue()


def assert_same_runs(got_root, want_root, lrs=LRS, runs=RUNS):
    """Every run directory holds the same files with the same contents, times aside: the
    records, summary and config as JSON, the checkpoint's arrays bit for bit."""
    assert sorted(p.name for p in got_root.iterdir() if p.name != ".stacks") == sorted(runs[lr] for lr in lrs)
    for name in (runs[lr] for lr in lrs):
        got, want = got_root / name, want_root / name
        names = sorted(p.name for p in want.iterdir() if p.name in rundir.RESULT_FILES)
        assert sorted(p.name for p in got.iterdir() if p.name in rundir.RESULT_FILES) == names, got
        assert _records(got) == _records(want), got
        assert _without_times(rundir.read_summary(got)) == _without_times(rundir.read_summary(want))
        assert _without_times(rundir.read_json(got / rundir.CONFIG), "data_dir") == \
            _without_times(rundir.read_json(want / rundir.CONFIG), "data_dir")
        with np.load(got / rundir.CHECKPOINT) as g, np.load(want / rundir.CHECKPOINT) as w:
            assert sorted(g.files) == sorted(w.files)
            for key in w.files:
                if key == "state":
                    assert _without_times(json.loads(g[key].tobytes())) == _without_times(json.loads(w[key].tobytes()))
                else:
                    np.testing.assert_array_equal(g[key], w[key], err_msg=f"{got}: {key}")
        assert rundir.lock_holder(got) is None


def _records(run_dir):
    return [_without_times(r) for r in rundir.read_records(run_dir)]


def _without_times(record, *more):
    return {k: v for k, v in record.items() if k not in TIME_KEYS | set(more)}


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


# ---------------------------------------------------------------- the same results as local

@pytest.fixture(scope="module")
def ray_runs(cluster, tmp_path_factory):
    """The grid through Ray, the workers writing in place: (config, runs root, exit status, stdout)."""
    root = tmp_path_factory.mktemp("ray")
    config = write_config(root)
    code, out = sweep_here(config)
    return config, root / "runs", code, out


def test_ray_sweep_equals_the_local_one(ray_runs, local_runs):
    config, runs, code, out = ray_runs
    assert code == 0, out
    assert "sweep: 3 runs, 0 already done, 0 to resume; on a local Ray instance, 1 CPU per run" in out
    assert "3 of 3 runs finished" in out and "FAILED" not in out
    for name in RUNS.values():  # one line per change, each with the grid's state after it
        assert sum(line.startswith(f"start  {runs / name} on ") for line in out.splitlines()) == 1, out
        assert f"completed {runs / name}  [done " in out
    assert out.splitlines()[-2].endswith("[done 3, running 0, queued 0, failed 0]")
    assert "queued 2" in out.splitlines()[1]  # two CPUs: the third run waits its turn
    assert_same_runs(runs, local_runs)


def test_rerun_of_a_finished_ray_sweep_does_nothing(ray_runs):
    config, runs, code, _ = ray_runs
    assert code == 0
    before = _snapshot(runs)
    code, out = sweep_here(config)
    assert code == 0, out
    assert "sweep: 3 runs, 3 already done, 0 to resume" in out and "start" not in out
    assert _snapshot(runs) == before, "a finished run was touched"


@pytest.mark.parametrize("shared_fs", [True, False], ids=["shared-fs", "no-shared-fs"])
def test_stacked_groups_are_ray_tasks_too(cluster, local_runs, tmp_path, shared_fs):
    """With --stack, a group of grid points (one program) is the unit of work: one task;
    without a shared filesystem it trains in a copy on its worker and sends the files back."""
    config = write_config(tmp_path, TWO)
    code, out = sweep_here(config, stack=True, shared_fs=shared_fs)
    assert code == 0, out
    assert sum(line.startswith("start  ") for line in out.splitlines()) == 1, out
    assert out.count("(stacked in ") == 2 and "2 of 2 runs finished" in out
    assert_same_runs(tmp_path / "runs", local_runs, TWO)
    (group,) = (tmp_path / "runs" / ".stacks").iterdir()
    assert rundir.lock_holder(group) is None and not work_dir(group.absolute()).exists()
    before = _snapshot(tmp_path / "runs")
    code, out = sweep_here(config, stack=True, shared_fs=shared_fs)  # again: nothing to do
    assert code == 0 and "2 already done" in out and "start" not in out, out
    assert _snapshot(tmp_path / "runs") == before


# ---------------------------------------------------------------- faults

def _wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _epoch_one_done(directory, epochs=3):
    log = Path(directory) / "train.log"
    return log.exists() and f"epoch   1/{epochs}" in log.read_text()


@pytest.mark.parametrize("shared_fs", [True, False], ids=["shared-fs", "no-shared-fs"])
def test_a_worker_killed_mid_run_is_retried_and_its_run_resumes(cluster, tmp_path, shared_fs):
    """SIGKILL the Ray worker that trains a run, in its second epoch: Ray retries the task,
    the run resumes from its checkpoint, and every run ends as the local sweep's did; with
    the workers writing in place, and with the files sent back to the driver.  8 epochs, so
    that the run is still training when its first checkpoint reaches the driver (with 3, on a
    busy machine, a run sent back its files and finished before the kill came)."""
    epochs, names = 8, run_names(8)
    (tmp_path / "local").mkdir()
    local = cli("sweep", write_config(tmp_path / "local", TWO, epochs=epochs), "--jobs", "2", cwd=tmp_path / "local")
    runs = tmp_path / "runs"
    victim = runs / names[0.01]
    work = victim if shared_fs else work_dir(victim.absolute())
    driver = cli("sweep", write_config(tmp_path, TWO, epochs=epochs), "--executor", "ray", "--address", cluster,
                 *([] if shared_fs else ["--no-shared-fs"]), cwd=tmp_path)
    try:
        # in its second epoch, with its first checkpoint on the driver's side (sent back, or written in place)
        _wait_for(lambda: _epoch_one_done(work, epochs) and (victim / rundir.CHECKPOINT).exists(),
                  f"epoch 1 of {work}")
        trainer = rundir.lock_holder(work)  # the run's `xpmlp train`; its parent is the Ray worker
        assert trainer, "the run ended before it could be killed"
        worker = int(Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(worker, signal.SIGKILL)
        code, out, err = finish(driver)
    finally:
        driver.kill()
    assert code == 0, out + err
    assert f"start  {victim} on " in out
    assert "attempt 2: its last worker was lost" in out, out
    assert "2 of 2 runs finished" in out and "Traceback" not in err
    if not shared_fs:
        assert "files sent back to this machine" in out
        for lr in TWO:
            assert not work_dir((runs / names[lr]).absolute()).exists(), "a worker's copy was left behind"
    log = (victim / "train.log").read_text()
    first, second = log.split("training mlp0-sce")[1:]  # started twice: the second time...
    assert "epoch   1/8" in first and "epoch   1/8" not in second, log  # ...from its checkpoint
    assert "epoch   8/8" in second and "completed" in second, log
    code, out, err = finish(local)
    assert code == 0, out + err
    assert_same_runs(runs, tmp_path / "local" / "runs", TWO, runs=names)  # ...and ended as if never stopped


@pytest.mark.parametrize("shared_fs", [True, False], ids=["shared-fs", "no-shared-fs"])
@pytest.mark.parametrize("stop", ["SIGKILL the worker", "Ctrl-C the driver"])
def test_a_stacked_group_survives_a_stop(cluster, tmp_path, stop, shared_fs):
    """Stop a group that trains in place or in its worker's copy, after a group checkpoint:
    SIGKILL its worker (Ray retries the task, which resumes from the driver's copy), or
    Ctrl-C the driver (the group checkpoints and sends its files back; the same command
    again resumes it).  Either way the runs end as a local sweep's did.  8 epochs, so the
    group is still training when it is stopped."""
    epochs, names = 8, run_names(8)
    (tmp_path / "local").mkdir()
    local = cli("sweep", write_config(tmp_path / "local", TWO, epochs=epochs), "--jobs", "2", cwd=tmp_path / "local")
    runs, config = tmp_path / "runs", write_config(tmp_path, TWO, epochs=epochs)
    driver = cli("sweep", config, "--executor", "ray", "--address", cluster, "--stack",
                 *([] if shared_fs else ["--no-shared-fs"]), cwd=tmp_path)
    try:
        _wait_for(lambda: (runs / ".stacks").is_dir() and any(
            (g / rundir.GROUP_CHECKPOINT).exists() for g in (runs / ".stacks").iterdir()), "a group checkpoint")
        (group,) = (runs / ".stacks").iterdir()
        copy = group if shared_fs else group_work_dirs(group.absolute(), [(runs / names[lr]).absolute() for lr in TWO])[0]
        worker = rundir.lock_holder(copy)  # the task trains the group (or its copy) in its own process
        assert worker, "the group ended before it could be stopped"
        if stop == "SIGKILL the worker":
            os.kill(worker, signal.SIGKILL)
        else:
            driver.send_signal(signal.SIGINT)
        code, out, err = finish(driver)
    finally:
        driver.kill()
    assert "Traceback" not in err and not work_dir(group.absolute()).exists(), out + err
    if stop == "SIGKILL the worker":
        assert code == 0, out + err
        assert "attempt 2: its last worker was lost" in out and "2 of 2 runs finished" in out, out
    else:
        assert code == 130, out + err
        assert f"interrupted {group}" in out, out
        state = group_state(group)
        assert state["status"] == "interrupted" and 0 < state["epoch"] < epochs, state
        assert all(rundir.lock_holder(d) is None for d in [group, *(runs / n for n in names.values())])
        code, out = sweep_here(config, stack=True, shared_fs=shared_fs)
        assert code == 0 and "2 of 2 runs finished" in out, out
    code, out, err = finish(local)
    assert code == 0, out + err
    assert_same_runs(runs, tmp_path / "local" / "runs", TWO, runs=names)


def test_ctrl_c_stops_every_run_resumably_and_a_rerun_finishes_them(cluster, tmp_path):
    # Three runs of 8 epochs: the signal comes at the end of a first epoch, and the runs
    # must still be under way when the cancel reaches them (about 0.3 s later on an idle
    # machine; an epoch takes about as long).  The third waits for a CPU.
    epochs, names = 8, run_names(8)
    (tmp_path / "local").mkdir()
    local = cli("sweep", write_config(tmp_path / "local", epochs=epochs), "--jobs", "2", cwd=tmp_path / "local")
    config = write_config(tmp_path, epochs=epochs)
    runs = tmp_path / "runs"
    driver = cli("sweep", config, "--executor", "ray", "--address", cluster, cwd=tmp_path)
    try:
        _wait_for(lambda: any(_epoch_one_done(runs / name, epochs) for name in names.values()),
                  "a run's first epoch")
        driver.send_signal(signal.SIGINT)
        code, out, err = finish(driver, timeout=120)
    finally:
        driver.kill()
    assert code == 130, out + err
    assert "cancelling" in out and "sweep interrupted; run the same command again to resume" in err
    assert "Traceback" not in err
    status = {name: rundir.read_summary(runs / name).get("status") for name in names.values()}
    assert "interrupted" in status.values(), (status, out)  # stopped mid-run, with a checkpoint
    for name, state in status.items():
        assert rundir.lock_holder(runs / name) is None
        if state == "interrupted":
            assert f"interrupted {runs / name}" in out
            assert (runs / name / rundir.CHECKPOINT).exists()
        elif state is None:  # cancelled in the queue, or stopped while its `xpmlp train` started up
            # (on a loaded machine the second run's process may still be importing when the
            # first run's epoch ends and the signal comes)
            assert (f"cancelled {runs / name} (not started)" in out
                    or f"stopped {runs / name} while it started (rerun the sweep to start it)" in out), out

    code, out = sweep_here(config)
    unfinished = sum(state != "completed" for state in status.values())
    assert code == 0, out
    assert f"{sum(s == 'interrupted' for s in status.values())} to resume" in out
    assert f"{unfinished} of {unfinished} runs finished" in out
    code, out, err = finish(local)
    assert code == 0, out + err
    assert_same_runs(runs, tmp_path / "local" / "runs", runs=names)


# ---------------------------------------------------------------- mistakes: one line, exit 2

def _one_line_error(proc, tmp_path, needle):
    code, out, err = finish(proc, timeout=120)
    assert code == 2, out + err
    assert err.startswith("xpmlp: error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "something was written"


def _port_with_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, needle", [
    (f"127.0.0.1:{_port_with_nothing_listening()}", "no Ray cluster answers there"),
    ("no-such-host.invalid:6379", "unknown host no-such-host.invalid"),
    ("somewhere", "expected HOST:PORT"),
    ("ray://somewhere:10001", "Ray Client addresses are not supported"),
], ids=["nothing-listening", "unknown-host", "no-port", "ray-client"])
def test_a_bad_address_is_one_line(tmp_path, address, needle):
    proc = cli("sweep", write_config(tmp_path), "--executor", "ray", "--address", address, cwd=tmp_path)
    _one_line_error(proc, tmp_path, needle)


def test_without_ray_installed_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None  # as if not installed\n"
            "from xpmlp.cli import main; sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()))
    proc = subprocess.Popen([sys.executable, "-c", code, "sweep", str(write_config(tmp_path)), "--executor", "ray"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _one_line_error(proc, tmp_path, "pip install 'xpmlp[ray]'")


@pytest.mark.parametrize("flags, needle", [
    (["--executor", "ray", "--jobs", "2"], "--jobs is for the local executor"),
    (["--address", "auto"], "need --executor ray"),
    (["--executor", "ray", "--gpus-per-run", "0.5", "--device", "cpu"], "not --device cpu"),
])
def test_settings_that_do_not_fit_the_executor(tmp_path, capsys, flags, needle):
    from xpmlp.cli import main
    assert main(["sweep", str(write_config(tmp_path)), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(cpus_per_run=0), "--cpus-per-run must be positive"),
    (dict(gpus_per_run=-1), "must not be negative"),
    (dict(gpus_per_run=1.5), "only whole numbers"),
])
def test_bad_resources(kwargs, needle):
    with pytest.raises(TrainError, match=needle):
        RayExecutor(**kwargs)


def test_gpus_per_run_means_cuda_and_cpus_per_run_the_cores():
    assert RayExecutor(gpus_per_run=0.25).device(None) == "cuda"
    assert RayExecutor(gpus_per_run=1).device("cuda") == "cuda"
    assert RayExecutor().device("cpu") == "cpu" and RayExecutor().device(None) is None
    assert RayExecutor(cpus_per_run=0.5).cores() == 1
    assert RayExecutor(cpus_per_run=2.5).cores() == 2


def test_the_library_and_the_local_sweep_never_import_ray(tmp_path):
    code = ("import sys, xpmlp, xpmlp.cli, xpmlp.sweep\n"
            f"xpmlp.sweep.run_sweep([{str(write_config(tmp_path))!r}], dry_run=True, executor=xpmlp.sweep.RayExecutor())\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60, capture_output=True)
