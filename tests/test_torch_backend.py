"""The torch backend: its names, every way it can be unavailable (one line each), the
whole training loop against NumPy's, and checkpoints that move between the two.

The math of every layer, loss, network and SGD step is compared with NumPy float64 by the
cross-backend tests (the ``backend`` fixture holds torch, torch:cuda and torch:mps)."""
import builtins
import sys
import warnings

import numpy as np
import pytest
from test_faults import xpmlp_main
from test_train import (ITERS, assert_same_trajectory, config, interrupt_after, read_json, synthetic,  # noqa: F401
                        train_run, trainer)

import xpmlp
from xpmlp import BackendUnavailable, get_backend, rundir
from xpmlp.training.train import evaluate

torch = pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

HINT = "pip install 'xpmlp[torch]'"
# The torch devices the loop tests run on; a GPU absent here is skipped with torch's reason.
DEVICES = ["torch", pytest.param("torch:cuda", marks=pytest.mark.gpu), "torch:mps"]


def torch_or_skip(name):
    found = xpmlp.available_backends()[name]
    if isinstance(found, str):
        pytest.skip(f"{name}: {found}")
    return found


def one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name", ["torch", "torch:cpu", "Torch:CPU", " torch "])
def test_torch_cpu_names(name):
    backend = get_backend(name)
    assert backend.name == "torch" and backend.device == "torch:cpu" and not backend.has_out_buffers
    assert backend.torch_device == torch.device("cpu")
    assert backend.describe()["torch"] == torch.__version__


@pytest.mark.parametrize("name", ["torch:gpu", "torch:cuda:x", "torch:", "torchcpu"])
def test_unknown_torch_names(name):
    with pytest.raises(BackendUnavailable, match="unknown device") as info:
        get_backend(name)
    assert "torch:mps" in one_line(info)


def test_arrays_are_made_on_the_backends_device():
    """The namespace's creation functions default to the backend's device (the ops never
    name one); here the CPU, on a GPU machine the cross-backend tests prove the rest."""
    backend = get_backend("torch")
    for a in (backend.xp.zeros(3), backend.xp.arange(4), backend.asarray([1.0]), backend.xp.empty((2,))):
        assert isinstance(a, torch.Tensor) and a.device == backend.torch_device


def test_any_host_array_converts_without_a_warning():
    """Read-only memory (a broadcast hyperparameter, a memory-mapped file), negative strides
    and big-endian data, which torch's from_numpy refuses or warns on, are copied first."""
    backend = get_backend("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = backend.asarray(np.broadcast_to(np.float64(0.5), (3,)), dtype=backend.dtype("float32"))
        reversed_ = backend.asarray(np.arange(6.0)[::-2])
        big_endian = backend.asarray(np.arange(3, dtype=">i8"))
    assert a.dtype == torch.float32 and backend.to_numpy(a).tolist() == [0.5] * 3
    assert backend.to_numpy(reversed_).tolist() == [5.0, 3.0, 1.0]
    assert big_endian.dtype == torch.int64 and backend.to_numpy(big_endian).tolist() == [0, 1, 2]


def test_cpu_threads_follow_the_projects_policy(monkeypatch):
    """While training runs, one thread unless $XPMLP_THREADS says otherwise
    (xpmlp/training/threads.py), as NumPy's BLAS; the caller's setting comes back after."""
    from xpmlp.training.threads import limit_blas_threads
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        monkeypatch.delenv("XPMLP_THREADS", raising=False)
        with limit_blas_threads():
            assert torch.get_num_threads() == 1
        monkeypatch.setenv("XPMLP_THREADS", "2")
        with limit_blas_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- unavailable, in one line

def test_torch_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # ``import torch`` now raises ImportError
    for name in ("torch", "torch:cuda", "torch:mps"):
        with pytest.raises(BackendUnavailable) as info:
            get_backend(name)
        message = one_line(info)
        assert "PyTorch is not installed" in message and HINT in message and "--device cpu" in message
        assert isinstance(info.value.__cause__, ImportError)
    assert "torch is not installed" in xpmlp.available_backends()["torch"].lower()


def test_torch_import_raising_another_error(monkeypatch):
    """A broken CUDA build raises OSError (a missing shared library), not ImportError."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch":
            raise OSError("libcudnn.so.9: cannot open shared object file\nmore detail")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendUnavailable) as info:
        get_backend("torch")
    assert "PyTorch is installed but failed to import (OSError: libcudnn.so.9" in one_line(info)


def test_array_api_compat_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "array_api_compat", None)
    with pytest.raises(BackendUnavailable, match="needs array-api-compat") as info:
        get_backend("torch")
    assert HINT in one_line(info)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use CUDA here")
def test_cuda_unavailable_says_torchs_reason():
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # noqa: BLE001 - whatever torch says is what we must show
        reason = str(exc).strip().splitlines()[0]
    for name in ("torch:cuda", "torch:cuda:1"):
        with pytest.raises(BackendUnavailable) as info:
            get_backend(name)
        message = one_line(info)
        assert f"cannot use CUDA ({reason})" in message and "--device torch:cpu" in message


def test_cuda_reason_is_one_line_and_a_missing_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def init():
        raise RuntimeError("Found no NVIDIA driver on your system.\nPlease check that you have an NVIDIA GPU")

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(BackendUnavailable) as info:
        get_backend("torch:cuda")
    assert "cannot use CUDA (Found no NVIDIA driver on your system.)" in one_line(info)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(BackendUnavailable, match=r"CUDA device 5 does not exist: 2 device\(s\) visible"):
        get_backend("torch:cuda:5")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="torch can use MPS here")
def test_mps_unavailable_says_why():
    with pytest.raises(BackendUnavailable) as info:
        get_backend("torch:mps")
    message = one_line(info)
    assert "cannot use MPS (" in message and "--device torch:cpu" in message
    built = torch.backends.mps.is_built()
    assert ("no MPS support" in message) == (not built)


@pytest.fixture
def fake_mps(monkeypatch):
    """torch believing it has an Apple GPU: enough to build the backend (nothing is allocated)."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


def test_float64_on_mps_is_refused(fake_mps):
    backend = get_backend("torch:mps")
    assert backend.device == "torch:mps" and backend.dtype("float32") == torch.float32
    with pytest.raises(BackendUnavailable, match="MPS has no float64: use --dtype float32") as info:
        backend.dtype("float64")
    one_line(info)


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]], ids=["one-run", "seeds"])
def test_cli_refuses_float64_on_mps_before_any_file(tmp_path, capsys, fake_mps, seeds):
    out = tmp_path / "run"
    code, _, err = xpmlp_main(capsys, "train", "--model", "mlp0-sce", "--device", "torch:mps", "--dtype",
                              "float64", "--epochs", "1", "--out", out, *seeds)
    assert code == 2 and err.strip() == ("xpmlp: error: MPS has no float64: use --dtype float32, "
                                         "or --device torch:cpu")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use CUDA here")
def test_cli_without_cuda_is_one_line(tmp_path, capsys):
    code, _, err = xpmlp_main(capsys, "train", "--model", "mlp0-sce", "--device", "torch:cuda",
                              "--epochs", "1", "--out", tmp_path / "run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "cannot use CUDA" in lines[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the training loop

def dtype_for(device):
    return "float32" if device == "torch:mps" else "float64"  # MPS has no float64


def tolerance(dtype):
    return dict(rel=1e-9, abs=1e-12) if dtype == "float64" else dict(rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_training_on_torch_matches_numpy(tmp_path, synthetic, device):
    """The whole loop (device-resident data, gathered batches, metrics read once per epoch,
    evaluation) follows NumPy's trajectory: same weights, same batch order."""
    torch_or_skip(device)
    dtype = dtype_for(device)
    cpu = train_run(config(epochs=2, dtype=dtype, device="numpy"), tmp_path / "cpu", synthetic)
    on_torch = train_run(config(epochs=2, dtype=dtype, device=device), tmp_path / "torch", synthetic)
    assert on_torch["status"] == "completed" and on_torch["device"].startswith("torch:")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert on_torch[key] == pytest.approx(cpu[key], **tolerance(dtype)), key
    used = read_json(tmp_path / "torch" / "config.json")["device_used"]
    assert used["backend"] == "torch" and used["torch"] == torch.__version__
    ckpt_torch, ckpt_cpu = rundir.load_checkpoint(tmp_path / "torch")[0], rundir.load_checkpoint(tmp_path / "cpu")[0]
    for a, b in zip(ckpt_torch, ckpt_cpu):
        assert isinstance(a, np.ndarray)
        np.testing.assert_allclose(a, b, rtol=1e-9 if dtype == "float64" else 1e-4, atol=1e-12)


@pytest.mark.parametrize("first, then", [("torch", "numpy"), ("numpy", "torch")])
def test_a_checkpoint_resumes_on_the_other_backend(tmp_path, synthetic, first, then):
    """Checkpoints are host arrays: 2 epochs on one backend, resumed for 2 more on the
    other, end where 4 epochs on NumPy end (float64: the two differ by rounding only)."""
    straight = train_run(config(epochs=4, dtype="float64", device="numpy"), tmp_path / "straight", synthetic)
    run = tmp_path / "run"
    train_run(config(epochs=2, dtype="float64", device=first), run, synthetic)
    resumed = train_run(config(epochs=4, dtype="float64", device=then), run, synthetic, resume=True)
    assert resumed["epochs_completed"] == 4 and resumed["device"] == get_backend(then).device
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(rundir.load_checkpoint(run)[0], rundir.load_checkpoint(tmp_path / "straight")[0]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("then", ["torch", "numpy"])
def test_interrupted_inside_an_epoch_on_torch_resumes_on_either_backend(tmp_path, synthetic, monkeypatch, then):
    """Ctrl-C three steps into epoch 2 on torch: the checkpoint replays that epoch's shuffle
    from there.  Resumed on torch the run ends bit for bit as one never interrupted (one
    CPU thread: deterministic); resumed on NumPy, within float64 rounding."""
    straight = tmp_path / "straight"
    train_run(config(epochs=3, dtype="float64", device="torch"), straight, synthetic)
    run = tmp_path / "run"
    t = trainer(config(epochs=3, dtype="float64", device="torch"), run, synthetic)
    interrupt_after(monkeypatch, t, ITERS + 3)
    t.run()
    assert read_json(run / "summary.json")["status"] == "interrupted"
    monkeypatch.undo()  # the resumed run is not interrupted
    summary = train_run(config(epochs=3, dtype="float64", device=then), run, synthetic, resume=True)
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    if then == "torch":
        assert_same_trajectory(run, straight)
        return
    want = read_json(straight / "summary.json")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert summary[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    for a, b in zip(rundir.load_checkpoint(run)[0], rundir.load_checkpoint(straight)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", ["torch", "numpy"])
def test_a_run_evaluates_on_the_other_backend(tmp_path, synthetic, device):
    """A run trained on one backend evaluates on the other to its own summary's metrics."""
    other = "numpy" if device == "torch" else "torch"
    summary = train_run(config(epochs=1, dtype="float64", device=device), tmp_path / "run", synthetic)
    backend = get_backend(other)
    model, _ = rundir.load_model(tmp_path / "run", backend)
    assert model.backend is backend
    loss, acc = evaluate(model, backend.asarray(synthetic.test_x, dtype=model.dtype),
                         backend.asarray(synthetic.test_y))
    assert (loss, acc) == pytest.approx((summary["test_loss"], summary["test_acc"]), rel=1e-9, abs=1e-12)


def test_stacked_group_on_torch_matches_numpy(tmp_path, synthetic):
    """A --seeds / sweep --stack group trains on torch as on NumPy, member by member."""
    from test_stack import configs, stack_trainer
    per_model = [dict(lr=0.05, seed=0), dict(lr=0.1, seed=2, init_std=0.05)]
    for device in ("numpy", "torch"):
        stack_trainer(configs(per_model, dtype="float64", epochs=2, device=device), tmp_path / device,
                      synthetic).run()
    for k in range(2):
        a, b = (read_json(tmp_path / d / f"m{k}" / "summary.json") for d in ("torch", "numpy"))
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), (k, key)


def test_bench_times_the_torch_backend_against_pytorch_eager_on_its_device(monkeypatch):
    """`xpmlp bench --device torch:cpu`: ours on torch's plain ops, the peer on the same device
    (the peer reads the dtype from the host weights: a torch dtype is no NumPy dtype)."""
    from xpmlp import bench
    monkeypatch.setattr(bench, "N_TRAIN", 1000)  # ten steps an epoch, as tests/test_bench.py
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    r = bench.run(device="torch:cpu", epochs=1, threads=1)
    assert (r["backend"], r["device"], r["ops"]) == ("torch", "torch:cpu", "plain")
    assert r["torch_note"] is None and r["torch_epoch_s"] > 0 and r["epoch_s"] > 0
    assert r["ratio_torch"] == pytest.approx(r["epoch_s"] / r["torch_epoch_s"])
