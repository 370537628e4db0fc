"""The training loop and its run directory: metrics, summaries, checkpoints, resume,
interruption, divergence, TensorBoard and atomic writes.

Most tests train on a tiny synthetic MNIST (fast, and enough for bit-identity); one
trains a real epoch on the real MNIST at the report's defaults.
"""
import json
import math
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import real_mnist_dir

from xpmlp import get_backend, rundir
from xpmlp.config import TrainConfig, TrainError
from xpmlp.data import Mnist, load_mnist
from xpmlp.rundir import load_checkpoint, save_checkpoint, write_json
from xpmlp.training import loop, train
from xpmlp.training.train import Trainer

TRAIN_N, TEST_N, BATCH = 1000, 300, 100
ITERS = TRAIN_N // BATCH  # iterations per epoch on the synthetic data


@pytest.fixture(scope="module")
def synthetic():
    """A small learnable stand-in for MNIST: labels from a random linear teacher."""
    rng = np.random.default_rng(123)
    x = (rng.standard_normal((TRAIN_N + TEST_N, 784)) * 0.3).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((784, 10)), axis=1).astype(np.int64)
    return Mnist(x[:TRAIN_N], y[:TRAIN_N], x[TRAIN_N:], y[TRAIN_N:])


def config(**changes):
    settings = dict(model="mlp1-relu-sce", epochs=4, batch_size=BATCH, lr=0.05, device="numpy")
    settings.update(changes)
    return TrainConfig(**settings).validate()


def trainer(cfg, run_dir, data, **kwargs):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(cfg, run_dir, data, progress=False, log=lambda line: None, **kwargs)
    t.write_config()
    return t


def train_run(cfg, run_dir, data, **kwargs):
    t = trainer(cfg, run_dir, data, **kwargs)
    t.run()
    return read_json(run_dir / "summary.json")


def read_json(path):
    def no_constants(token):  # NaN, Infinity: not JSON
        raise AssertionError(f"{path} holds the non-JSON token {token}")
    return json.loads(Path(path).read_text(), parse_constant=no_constants)


def metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():  # no epoch finished yet
        return []
    return [json.loads(line, parse_constant=lambda t: pytest.fail(f"{path}: non-JSON token {t}"))
            for line in path.read_text().splitlines()]


def trajectory(run_dir):
    """Everything a run computed: weights, velocity, RNG and position, metrics and summary,
    with the wall-clock times left out."""
    with np.load(Path(run_dir) / "checkpoint.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "state"}
        state = json.loads(npz["state"].tobytes().decode())
    for key in ("train_time_s", "partial_time_s"):
        state.pop(key, None)
    records = [{k: v for k, v in r.items() if k != "train_time_s"} for r in metrics(run_dir)]
    summary = {k: v for k, v in read_json(Path(run_dir) / "summary.json").items() if k != "train_time_s"}
    return arrays, state, records, summary


def assert_same_trajectory(run_a, run_b):
    arrays_a, state_a, records_a, summary_a = trajectory(run_a)
    arrays_b, state_b, records_b, summary_b = trajectory(run_b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert any(k.startswith("param_") for k in arrays_a) and any(k.startswith("velocity_") for k in arrays_a)
    for key in arrays_a:  # bit-identical, not merely close
        assert arrays_a[key].dtype == arrays_b[key].dtype, key
        np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)
    assert state_a == state_b
    assert records_a == records_b
    assert summary_a == summary_b


def no_temp_files(run_dir):
    """Hidden or temporary files, but for the lock file that marks the run's one writer."""
    return [p.name for p in Path(run_dir).iterdir()
            if p.name != rundir.LOCK and (p.name.startswith(".") or p.name.endswith((".tmp", ".part")))]


# ---------------------------------------------------------------- the real MNIST

def test_one_epoch_on_real_mnist_at_report_defaults(tmp_path):
    data = load_mnist(real_mnist_dir(), download=False, progress=False)
    cfg = TrainConfig(model="mlp1-relu-sce", epochs=1, device="numpy").validate()
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.init_std, cfg.dtype) == \
        (100, 0.01, 0.9, 5e-4, 0.01, "float32"), "the report's defaults changed"
    run = tmp_path / "run"
    summary = train_run(cfg, run, data)

    assert summary["status"] == "completed"
    assert summary["epochs_completed"] == 1
    assert summary["test_acc"] >= 0.90, f"one epoch reached only {summary['test_acc']:.4f} test accuracy"
    for key in ("train_acc", "test_acc"):
        assert 0 <= summary[key] <= 1, f"{key} is not a fraction: {summary[key]}"
    assert 0 < summary["test_loss"] < 1 and 0 < summary["train_loss"] < 2.31
    assert summary["train_time_s"] > 0

    saved = read_json(run / "config.json")
    for key in ("model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "init_std", "seed",
                "dtype", "device", "versions", "device_used"):
        assert key in saved, f"config.json lacks {key}"
    assert saved["model"] == "mlp1-relu-sce" and saved["epochs"] == 1 and saved["batch_size"] == 100
    assert saved["device_used"]["backend"] == "numpy"
    assert saved["versions"]["numpy"] == np.__version__

    records = metrics(run)
    iters = [r for r in records if r["kind"] == "iter"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(records) == 601 and len(iters) == 600 and len(epochs) == 1
    assert [r["iter"] for r in iters] == list(range(1, 601))
    for r in iters:
        assert set(r) == {"kind", "epoch", "iter", "loss", "acc"} and r["epoch"] == 1
        assert math.isfinite(r["loss"]) and 0 <= r["acc"] <= 1
    (ep,) = epochs
    assert set(ep) >= {"epoch", "iter", "train_loss", "train_acc", "test_loss", "test_acc", "train_time_s"}
    assert ep["epoch"] == 1 and ep["iter"] == 600
    assert ep["test_acc"] == summary["test_acc"] and ep["train_loss"] == summary["train_loss"]
    assert ep["train_loss"] == pytest.approx(np.mean([r["loss"] for r in iters]), rel=1e-5)
    assert records[-1] is ep, "the epoch record follows its iterations"
    assert no_temp_files(run) == []


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("device", ["numpy", "array-api-strict"])  # fast path and plain path
def test_resume_after_epoch_is_bit_identical(tmp_path, synthetic, device):
    straight = tmp_path / "straight"
    train_run(config(epochs=4, device=device), straight, synthetic)

    split = tmp_path / "split"
    first = train_run(config(epochs=2, device=device), split, synthetic)
    assert first["status"] == "completed" and first["epochs_completed"] == 2
    summary = train_run(config(epochs=4, device=device), split, synthetic, resume=True)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 4
    assert_same_trajectory(split, straight)


def test_extending_a_finished_run(tmp_path, synthetic):
    straight = tmp_path / "straight"
    train_run(config(epochs=2), straight, synthetic)
    run = tmp_path / "run"
    assert train_run(config(epochs=1), run, synthetic)["epochs_completed"] == 1
    summary = train_run(config(epochs=2), run, synthetic, resume=True)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["iterations"] == 2 * ITERS
    assert_same_trajectory(run, straight)


def test_resume_drops_metrics_past_the_checkpoint(tmp_path, synthetic):
    """Records a crash left after the last checkpoint are produced again, not duplicated."""
    straight = tmp_path / "straight"
    train_run(config(epochs=3), straight, synthetic)
    run = tmp_path / "run"
    train_run(config(epochs=2), run, synthetic)
    with open(run / "metrics.jsonl", "a") as f:  # as if epoch 3 was logged, then the process died
        f.write(json.dumps({"kind": "epoch", "epoch": 3, "iter": 3 * ITERS, "train_loss": 9.0}) + "\n")
    train_run(config(epochs=3), run, synthetic, resume=True)
    assert_same_trajectory(run, straight)


# ---------------------------------------------------------------- Ctrl-C

def interrupt_after(monkeypatch, t, steps, per_call=1):
    """Ctrl-C arrives after ``steps`` optimizer steps: a real SIGINT to this process, handled
    by the Trainer's own StopFlag (in the main thread; elsewhere the flag is set directly).
    The compiled stepper takes ``per_call`` steps a call (loop.STEPS_PER_CALL), and Ctrl-C
    waits for the call under way to end."""
    flags = []
    monkeypatch.setattr(loop, "STEPS_PER_CALL", per_call)

    class RecordingFlag(loop.StopFlag):
        def __enter__(self):
            flags.append(self)
            return super().__enter__()

    monkeypatch.setattr(loop, "StopFlag", RecordingFlag)
    # The stepper's step, not the optimizer's: the compiled step runs SGD inside its kernel.
    name = "steps" if hasattr(t.stepper, "steps") else "step"  # what the step loop calls
    step, count = getattr(t.stepper, name), [0]

    def counting_step(*args):
        step(*args)
        if not flags:  # the warm-up step, taken before the epochs (and the stop flag) begin
            return
        before = count[0]
        count[0] += args[3].shape[0] if name == "steps" else 1  # steps: (x, y, idx, losses, accs)
        if before < steps <= count[0]:
            if threading.current_thread() is threading.main_thread():
                signal.raise_signal(signal.SIGINT)  # runs the handler before returning
            else:
                flags[-1].stop = True
            assert flags[-1].stop, "SIGINT did not reach the Trainer's stop flag"

    setattr(t.stepper, name, counting_step)
    return count


@pytest.mark.parametrize("steps", [ITERS + 3, ITERS, 4], ids=["mid-epoch-2", "end-of-epoch-1", "mid-epoch-1"])
def test_interrupt_checkpoints_and_resume_is_bit_identical(tmp_path, synthetic, monkeypatch, steps):
    straight = tmp_path / "straight"
    train_run(config(epochs=3), straight, synthetic)

    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)
    t = trainer(config(epochs=3), run, synthetic)
    count = interrupt_after(monkeypatch, t, steps)
    t.run()  # no KeyboardInterrupt escapes
    assert count[0] == steps, "training went on after Ctrl-C"
    assert signal.getsignal(signal.SIGINT) is handler_before, "the SIGINT handler was not restored"

    summary = read_json(run / "summary.json")
    assert summary["status"] == "interrupted"
    done_epochs, pos = divmod(steps, ITERS)
    assert summary["epochs_completed"] == done_epochs
    if done_epochs == 0:  # no epoch finished: nothing to report, but valid JSON
        assert summary["test_acc"] is None and summary["train_loss"] is None
    else:
        assert summary["test_acc"] == metrics(run)[-1]["test_acc"]
    _, _, state, partial = load_checkpoint(run)
    assert state["epoch"] == done_epochs and state["pos"] == pos
    assert len(partial.get("loss", ())) == pos
    assert sum(r["kind"] == "epoch" for r in metrics(run)) == done_epochs
    assert no_temp_files(run) == []

    monkeypatch.undo()  # the resumed run is not interrupted
    summary = train_run(config(epochs=3), run, synthetic, resume=True)
    assert summary["status"] == "completed"
    assert_same_trajectory(run, straight)


def test_ctrl_c_ends_the_compiled_steps_call_under_way(tmp_path, synthetic, monkeypatch):
    """Calls of 3 steps: Ctrl-C after step 4 stops after step 6, the end of that call, and
    the checkpoint there resumes bit-identically."""
    straight = tmp_path / "straight"
    train_run(config(epochs=2), straight, synthetic)
    run = tmp_path / "run"
    t = trainer(config(epochs=2), run, synthetic)
    assert hasattr(t.stepper, "steps"), "the compiled step is the default here"
    count = interrupt_after(monkeypatch, t, 4, per_call=3)
    t.run()
    assert count[0] == 6
    assert load_checkpoint(run)[2]["pos"] == 6
    monkeypatch.undo()
    assert train_run(config(epochs=2), run, synthetic, resume=True)["status"] == "completed"
    assert_same_trajectory(run, straight)


def test_stop_flag_handles_signals():
    before_int, before_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")
    with loop.StopFlag() as flag:
        assert signal.getsignal(signal.SIGTERM) == flag._handler  # else SIGTERM would kill pytest
        signal.raise_signal(signal.SIGTERM)
        assert flag.stop
    with loop.StopFlag() as flag:
        signal.raise_signal(signal.SIGINT)
        assert flag.stop
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C means now
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before_int and signal.getsignal(signal.SIGTERM) is before_term


# ---------------------------------------------------------------- divergence

@pytest.mark.parametrize("model", ["mlp0-sce", "mlp1-relu-mse"])
def test_divergence_is_a_status_not_a_crash(tmp_path, synthetic, model):
    run = tmp_path / "run"
    with np.errstate(all="ignore"):
        summary = train_run(config(model=model, lr=1e6, epochs=5), run, synthetic)
    assert summary["status"] == "diverged"
    assert 1 <= summary["epochs_completed"] < 5, "training should stop at the diverged epoch"
    assert summary["train_loss"] is None and summary["test_loss"] is None
    # the diverged network is still evaluated: its accuracy is a fraction, not a crash
    assert 0 <= summary["test_acc"] <= 1
    for name in ("summary.json", "config.json"):
        text = (run / name).read_text()
        assert "NaN" not in text and "Infinity" not in text
    records = metrics(run)  # parses strictly
    assert records[-1]["kind"] == "epoch" and records[-1]["train_loss"] is None
    assert "NaN" not in (run / "metrics.jsonl").read_text()
    load_checkpoint(run)  # a run that diverged is done: it leaves a readable final checkpoint


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_writes_event_file(tmp_path, synthetic):
    run = tmp_path / "run"
    train_run(config(epochs=1, tensorboard=True), run, synthetic)
    events = list(run.glob("events.out.tfevents.*"))
    assert len(events) == 1, f"expected one event file in {sorted(p.name for p in run.iterdir())}"
    data = events[0].read_bytes()
    for tag in (b"train/loss_iter", b"train/loss", b"test/acc"):
        assert tag in data, f"{tag!r} not logged"


def test_no_event_file_without_tensorboard(tmp_path, synthetic):
    run = tmp_path / "run"
    train_run(config(epochs=1), run, synthetic)
    assert not list(run.glob("events*"))


# ---------------------------------------------------------------- atomic writes

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, synthetic, monkeypatch):
    run = tmp_path / "run"
    t = trainer(config(epochs=1), run, synthetic)
    t.run()
    assert no_temp_files(run) == []
    before = (run / "checkpoint.npz").read_bytes()
    params_before, _, state_before, _ = load_checkpoint(run)

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    t.model.load_state_arrays([p + 1 for p in t.model.state_arrays()])  # what would have been saved
    with pytest.raises(rundir.DiskFull, match="checkpoint.npz: no space left on device"):
        save_checkpoint(run / "checkpoint.npz", t.model.state_arrays(), t.optimizer.state(), dict(state_before, epoch=99))
    monkeypatch.undo()

    assert (run / "checkpoint.npz").read_bytes() == before
    params, _, state, _ = load_checkpoint(run)
    assert state["epoch"] == 1
    for a, b in zip(params, params_before):
        np.testing.assert_array_equal(a, b)
    assert no_temp_files(run) == []


def test_failed_json_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "completed", "loss": float("nan")})
    before = path.read_bytes()
    assert read_json(path) == {"status": "completed", "loss": None}

    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(rundir.os, "replace", fail)
    with pytest.raises(OSError):
        write_json(path, {"status": "running"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert no_temp_files(tmp_path) == []


def test_unreadable_checkpoint_is_a_train_error(tmp_path, synthetic):
    run = tmp_path / "run"
    train_run(config(epochs=1), run, synthetic)
    data = (run / "checkpoint.npz").read_bytes()
    (run / "checkpoint.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainError, match="unreadable checkpoint"):
        Trainer(config(epochs=2), run, synthetic, resume=True, progress=False, log=lambda s: None)
    (run / "checkpoint.npz").unlink()
    with pytest.raises(TrainError, match="no checkpoint"):
        Trainer(config(epochs=2), run, synthetic, resume=True, progress=False, log=lambda s: None)


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_training_on_cupy_matches_numpy(tmp_path, synthetic):
    """The whole loop on the GPU (device-resident data, gathered batches, metrics read once
    per epoch) follows the CPU's trajectory: same weights, same batch order."""
    import xpmlp
    found = xpmlp.available_backends()["cupy"]
    if isinstance(found, str):
        pytest.skip(f"cupy: {found}")
    cpu = train_run(config(epochs=2, dtype="float64", device="numpy"), tmp_path / "cpu", synthetic)
    gpu = train_run(config(epochs=2, dtype="float64", device="cupy"), tmp_path / "gpu", synthetic)
    assert gpu["status"] == "completed"
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-9, abs=1e-12), key
    cpu_ckpt, gpu_ckpt = load_checkpoint(tmp_path / "cpu")[0], load_checkpoint(tmp_path / "gpu")[0]
    for a, b in zip(gpu_ckpt, cpu_ckpt):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", ["numpy", "array-api-strict"])
def test_denormal_weights_are_flushed_once_per_epoch(tmp_path, synthetic, device):
    """A dead network's weights decay into denormals, which x86 computes ~40x slower;
    the trainer flushes them to zero at each epoch's end (normal values untouched)."""
    t = trainer(config(epochs=1, device=device), tmp_path / "run", synthetic)
    tiny = np.finfo(np.float32).smallest_normal
    W = t.backend.to_numpy(t.model.layers[0].W).copy()
    W[0, :3] = [tiny / 10, -tiny / 1000, tiny * 2]
    t.model.load_state_arrays([W] + [t.backend.to_numpy(getattr(layer, name))
                                     for layer, name in t.model.parameters()[1:]])
    t.optimizer.flush_denormals()
    W = np.asarray(t.backend.to_numpy(t.model.layers[0].W))
    assert W[0, 0] == 0 and W[0, 1] == 0 and W[0, 2] == np.float32(tiny * 2)
    calls = []
    flush = t.optimizer.flush_denormals
    t.optimizer.flush_denormals = lambda: (calls.append(1), flush())
    t.config.epochs = 3
    t.run()
    assert len(calls) == 3, "the trainer flushes once per epoch"


# ---------------------------------------------------------------- timing and the progress bar

def test_the_warm_up_step_leaves_weights_and_momenta_as_they_were(tmp_path, synthetic):
    t = trainer(config(epochs=1), tmp_path / "run", synthetic)
    t.optimizer.slots[0].velocity[...] = 0.5  # a momentum the step would change (one flat slot)
    before = ([a.copy() for a in t.model.state_arrays()], [v.copy() for v in t.optimizer.state()])
    x, y = t.backend.asarray(synthetic.train_x), t.backend.asarray(synthetic.train_y)
    t._warm_up((x, y))
    for want, got in zip(before, (t.model.state_arrays(), t.optimizer.state())):
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)


def test_epoch_time_excludes_the_warm_up(tmp_path, synthetic, monkeypatch):
    """On a GPU the first step compiles kernels: that happens before the clock starts.  A
    fake clock that only the warm-up advances shows it (no real time is measured)."""
    clock = [0.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock[0])
    warm_up = Trainer._warm_up

    def slow_warm_up(self, *args):
        clock[0] += 1000.0
        warm_up(self, *args)

    monkeypatch.setattr(Trainer, "_warm_up", slow_warm_up)
    summary = train_run(config(epochs=1), tmp_path / "run", synthetic)
    assert clock[0] == 1000.0, "the warm-up ran once"
    assert summary["train_time_s"] == 0.0


@pytest.mark.parametrize("interval, reads", [(3600.0, 0), (0.0, ITERS)])
def test_progress_bar_reads_the_device_at_most_once_per_interval(tmp_path, synthetic, monkeypatch, interval, reads):
    """Each read of a step's loss waits for the GPU, so the bar reads at most once per
    BAR_READ_INTERVAL_S, not every few steps (on the CPU, where a read is free, once per
    BAR_READ_INTERVAL_CPU_S, so that a short epoch shows its loss too)."""
    monkeypatch.setattr(loop, "BAR_READ_INTERVAL_S", 1e9)  # the CPU's own interval applies here
    monkeypatch.setattr(loop, "BAR_READ_INTERVAL_CPU_S", interval)
    shown = []
    monkeypatch.setattr(Trainer, "_show_metrics", lambda self, bar, losses, accs, i: shown.append(i))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Trainer(config(epochs=1), run_dir, synthetic, progress=True, log=lambda line: None).run()
    assert len(shown) == reads


# ---------------------------------------------------------------- the run directory module

def test_load_model_gives_the_checkpoint_weights_without_a_trainer(tmp_path, synthetic):
    run = tmp_path / "run"
    t = trainer(config(epochs=2), run, synthetic)
    t.run()
    backend = get_backend("numpy")
    model, state = rundir.load_model(run, backend)
    assert (state["epoch"], state["iter"], state["pos"]) == (2, 2 * ITERS, 0)
    for got, want in zip(model.state_arrays(), t.model.state_arrays()):
        np.testing.assert_array_equal(got, want)
    summary = read_json(run / "summary.json")
    loss_acc = train.evaluate(model, backend.asarray(synthetic.test_x), backend.asarray(synthetic.test_y))
    assert loss_acc == pytest.approx((summary["test_loss"], summary["test_acc"]))
    with pytest.raises(TrainError, match="holds no run"):
        rundir.load_model(tmp_path / "nothing", backend)


def test_records_skip_a_torn_last_line_and_truncate_to_an_epoch(tmp_path):
    rundir.append_metrics(tmp_path, [{"kind": "iter", "epoch": e, "iter": e, "loss": float("nan")}
                                     for e in (1, 2)] + [{"kind": "epoch", "epoch": 2, "iter": 2}])
    with open(tmp_path / rundir.METRICS, "a") as f:
        f.write('{"kind": "iter", "epo')  # a live run's half-written line
    records = rundir.read_records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 2] and records[0]["loss"] is None
    assert rundir.epoch_records(records) == [{"kind": "epoch", "epoch": 2, "iter": 2}]
    rundir.truncate_metrics(tmp_path, 1)
    assert rundir.read_records(tmp_path) == [{"kind": "iter", "epoch": 1, "iter": 1, "loss": None}]
    assert no_temp_files(tmp_path) == []


@pytest.mark.parametrize("cold", [True, False])
def test_a_cold_kernel_cache_is_announced_before_the_warm_up(tmp_path, synthetic, monkeypatch, cold):
    """The first run after installing [fast] compiles for ~10 s: it says so first, once."""
    from xpmlp.backends.numpy_backend import NumpyBackend
    monkeypatch.setattr(NumpyBackend, "compiles_first", lambda self: cold)
    lines = []
    (tmp_path / "run").mkdir()
    Trainer(config(epochs=1), tmp_path / "run", synthetic, progress=False, log=lines.append).run()
    said = [line for line in lines if line.startswith("compiling the CPU kernels")]
    assert said == (["compiling the CPU kernels (first run only, ~10 s)"] if cold else [])
    if cold:
        assert lines[0] == said[0], "said before the first epoch"


def test_the_kernel_cache_is_warm_once_a_step_has_compiled(tmp_path, synthetic):
    from xpmlp.backends import numpy_step
    if get_backend("numpy").kernels is None:
        pytest.skip("needs Numba")
    train_run(config(epochs=1), tmp_path / "run", synthetic)  # compiles, or finds it compiled
    assert numpy_step.compiled_before() is True
    assert get_backend("numpy").compiles_first() is False
