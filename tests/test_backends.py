"""Choosing a backend by name, and every way the CUDA backend can be unavailable."""
import builtins
import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest

import xpmlp
from xpmlp import Backend, BackendUnavailable, get_backend

INSTALL_HINT = "pip install 'xpmlp[cuda12]'"


def cuda_state():
    """'missing' (CuPy not installed), 'no-gpu' (CuPy present, no usable device) or 'gpu'."""
    if importlib.util.find_spec("cupy") is None:
        return "missing"
    try:
        import cupy
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "no-gpu"
    except Exception:  # noqa: BLE001 - any failure to reach a device
        return "no-gpu"


needs_no_gpu = pytest.mark.skipif(cuda_state() == "gpu", reason="a CUDA GPU is present here")


@pytest.mark.parametrize("name", ["numpy", "cpu", "NumPy", " cpu "])
def test_numpy_names(name):
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.name == "numpy" and backend.xp is np
    assert backend.has_out_buffers and backend.device == "cpu"


@pytest.mark.parametrize("name", ["array-api-strict", "strict"])
def test_strict_names(name):
    pytest.importorskip("array_api_strict")
    backend = get_backend(name)
    assert backend.name == "array-api-strict" and not backend.has_out_buffers
    assert backend.xp.__name__ == "array_api_strict"


def test_backend_instance_passes_through():
    backend = get_backend("numpy")
    assert get_backend(backend) is backend


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda0", ""])
def test_unknown_name(name):
    with pytest.raises(BackendUnavailable) as info:
        get_backend(name)
    message = str(info.value)
    assert f"unknown device {name!r}" in message
    for choice in ("auto", "cpu", "numpy", "cuda", "cupy", "torch", "torch:cuda", "torch:mps", "array-api-strict"):
        assert choice in message


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(BackendUnavailable, RuntimeError)


def test_available_backends_names_every_backend():
    found = xpmlp.available_backends()
    assert set(found) == {"numpy", "array-api-strict", "cupy", "torch", "torch:cuda", "torch:mps"}
    assert isinstance(found["numpy"], Backend)
    for name, value in found.items():
        assert isinstance(value, (Backend, str)), name
        if isinstance(value, str):
            assert value   # a reason, never empty


# --- CuPy: the real package on a machine without a GPU ----------------------------------

@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cupy", "gpu"])
def test_cuda_without_gpu(name):
    with pytest.raises(BackendUnavailable) as info:
        get_backend(name)
    message = str(info.value)
    if cuda_state() == "missing":
        assert "CuPy is not installed" in message and INSTALL_HINT in message
    else:
        assert "CuPy is installed but" in message
        assert "no working NVIDIA driver" in message or "could not list devices" in message \
            or "no CUDA device" in message
        assert "--device cpu" in message
        assert info.value.__cause__ is not None or "no CUDA device" in message


@needs_no_gpu
def test_auto_falls_back_to_numpy_with_one_line_notice():
    lines = []
    backend = get_backend("auto", notice=lines.append)
    assert backend.name == "numpy"
    assert len(lines) == 1
    line = lines[0]
    assert isinstance(line, str) and "\n" not in line
    assert line.startswith("xpmlp: no usable CUDA GPU (") and line.endswith("; training on the CPU with NumPy")
    assert "CuPy" in line


@needs_no_gpu
def test_auto_notice_defaults_to_one_stderr_line(capsys):
    assert get_backend("auto").name == "numpy"
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "no usable CUDA GPU" in captured.err


# --- CuPy: simulated failures --------------------------------------------------------------

def test_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)   # ``import cupy`` now raises ImportError
    for name in ("cuda", "cuda:0", "cupy"):
        with pytest.raises(BackendUnavailable) as info:
            get_backend(name)
        message = str(info.value)
        assert "CuPy is not installed" in message
        assert INSTALL_HINT in message and "--device cpu" in message
        assert isinstance(info.value.__cause__, ImportError)
    lines = []
    assert get_backend("auto", notice=lines.append).name == "numpy"
    assert len(lines) == 1 and "CuPy is not installed" in lines[0] and "\n" not in lines[0]


def test_cupy_import_raises_other_error(monkeypatch):
    """Importing CuPy can fail with errors other than ImportError (cupy#1790)."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise RuntimeError("CUDA path could not be detected")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendUnavailable) as info:
        get_backend("cuda")
    message = str(info.value)
    assert "CuPy is installed but failed to import" in message
    assert "RuntimeError: CUDA path could not be detected" in message
    assert INSTALL_HINT in message
    assert isinstance(info.value.__cause__, RuntimeError)
    lines = []
    assert get_backend("auto", notice=lines.append).name == "numpy"
    assert len(lines) == 1 and "failed to import" in lines[0]


def fake_cupy(get_device_count):
    """A stand-in ``cupy`` module whose runtime answers ``getDeviceCount`` as given."""
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    return cupy


@pytest.mark.parametrize("error,why", [
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient", "no working NVIDIA driver"),
    ("libcuda.so.1: cannot open shared object file", "no working NVIDIA driver"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected", "no working NVIDIA driver"),
    ("cudaErrorUnknown: unknown error", "the CUDA runtime could not list devices"),
])
def test_device_count_failures(monkeypatch, error, why):
    def count():
        raise RuntimeError(error)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(count))
    with pytest.raises(BackendUnavailable) as info:
        get_backend("cuda:0")
    message = str(info.value)
    assert f"CuPy is installed but {why}" in message and error in message
    assert INSTALL_HINT in message


def test_zero_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 0))
    with pytest.raises(BackendUnavailable, match="no CUDA device is visible.*CUDA_VISIBLE_DEVICES"):
        get_backend("cuda")


def test_device_index_out_of_range(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(lambda: 2))
    with pytest.raises(BackendUnavailable, match=r"CUDA device 5 does not exist: 2 device\(s\) visible"):
        get_backend("cuda:5")


# --- no CuPy or torch import by the library -------------------------------------------

def test_import_does_not_import_cupy_or_torch(tmp_path):
    code = ("import sys, xpmlp\n"
            "assert 'cupy' not in sys.modules, 'import xpmlp imported cupy'\n"
            "m = xpmlp.build_model('mlp1-relu-sce', backend='numpy')\n"
            "xpmlp.get_backend('cpu')\n"
            "assert 'cupy' not in sys.modules, 'the numpy backend imported cupy'\n"
            "assert 'torch' not in sys.modules, 'the library imported torch'\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)


# --- host <-> device ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_round_trip(backend, dtype):
    a = (np.arange(12).reshape(3, 4) * 1.5 - 4).astype(dtype)
    on_device = backend.asarray(a)
    back = backend.to_numpy(on_device)
    assert isinstance(back, np.ndarray)
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_asarray_converts_dtype(backend):
    a = np.linspace(-1, 1, 7)
    on_device = backend.asarray(a, dtype=backend.dtype("float32"))
    assert on_device.dtype == backend.dtype("float32")
    np.testing.assert_array_equal(backend.to_numpy(on_device), a.astype(np.float32))
    assert backend.dtype(np.float64) == backend.dtype("float64")


def test_synchronize_and_describe(backend):
    assert backend.synchronize() is None
    info = backend.describe()
    assert info["backend"] == backend.name and info["device"] == str(backend.device)
    assert backend.name in repr(backend)
