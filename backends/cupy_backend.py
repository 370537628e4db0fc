"""CuPy on a CUDA GPU.  The only module in the project that imports CuPy."""
import numpy as np

from .base import Backend, BackendUnavailable

_INSTALL_HINT = ("pip install 'xpmlp[cuda12]' (CUDA 12 driver) or "
                 "pip install 'xpmlp[cuda13]' (CUDA 13 driver)")


def import_cupy():
    """Import CuPy or raise BackendUnavailable saying what is missing.

    Importing CuPy can fail with other exceptions than ImportError on a
    machine without a CUDA toolkit or driver (cupy#1790), so catch broadly
    and keep the original error as the cause.
    """
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(
            f"CuPy is not installed, so no CUDA backend is available; install it with {_INSTALL_HINT}, "
            "or use --device cpu") from exc
    except Exception as exc:  # noqa: BLE001 - see docstring
        raise BackendUnavailable(
            f"CuPy is installed but failed to import ({type(exc).__name__}: {exc}); "
            f"reinstall the CuPy build that matches your CUDA driver: {_INSTALL_HINT}") from exc
    return cupy


def device_count(cupy):
    """Number of usable CUDA devices, or BackendUnavailable naming the reason.

    With CuPy installed but no driver, the failure only appears at the first
    runtime call (scikit-learn#28280), so ask the runtime explicitly.
    """
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing libcuda
        text = str(exc)
        if "InsufficientDriver" in text or "libcuda" in text or "NoDevice" in text:
            why = "no working NVIDIA driver was found"
        else:
            why = "the CUDA runtime could not list devices"
        raise BackendUnavailable(
            f"CuPy is installed but {why} ({text.strip()}); run on a machine with an NVIDIA GPU "
            f"and driver, make sure the CuPy build matches the driver ({_INSTALL_HINT}), "
            "or use --device cpu") from exc
    if count == 0:
        raise BackendUnavailable("CuPy is installed but no CUDA device is visible "
                                 "(check CUDA_VISIBLE_DEVICES); use --device cpu")
    return count


class CupyBackend(Backend):
    name = "cupy"
    has_out_buffers = True

    def __init__(self, device_id=0):
        cupy = import_cupy()
        count = device_count(cupy)
        if not 0 <= device_id < count:
            raise BackendUnavailable(
                f"CUDA device {device_id} does not exist: {count} device(s) visible "
                f"(cuda:0 .. cuda:{count - 1})")
        self.cupy = cupy
        self.cuda_device = cupy.cuda.Device(device_id)
        self.cuda_device.use()
        super().__init__(cupy, f"cuda:{device_id}")
        from .cupy_kernels import CupyKernels
        self.kernels = CupyKernels(cupy)

    def asarray(self, a, dtype=None):
        with self.cuda_device:
            return self.cupy.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        # CuPy refuses implicit conversion (cupy#734): copy explicitly.
        if isinstance(a, self.cupy.ndarray):
            return self.cupy.asnumpy(a)
        return np.asarray(a)

    def synchronize(self):
        self.cuda_device.synchronize()

    def describe(self):
        props = self.cupy.cuda.runtime.getDeviceProperties(self.cuda_device.id)
        name = props["name"]
        return {"backend": self.name, "device": self.device,
                "device_name": name.decode() if isinstance(name, bytes) else str(name),
                "cupy": self.cupy.__version__, "numpy": np.__version__}
