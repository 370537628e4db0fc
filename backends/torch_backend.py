"""PyTorch tensors on the CPU, a CUDA GPU or an Apple GPU (MPS).  The only module in the
library that imports torch.

The layers compute through array-api-compat's torch namespace, the Array API standard
over torch, so the plain ops (xpmlp/ops.py) run as written.  Where the standard is silent,
torch's own API: the device (``_OnDevice``), host copies, synchronisation, threads.

Only the plain ops: the buffered ones call NumPy's ufunc signatures (``out=`` on every
function, Python scalars as operands, ``ndarray.sum(out=)``), which torch does not share;
each would need its own branch in the op bodies.
"""
import functools

import numpy as np

from .base import Backend, BackendUnavailable

_INSTALL_HINT = "pip install 'xpmlp[torch]'"
# The namespace functions that make a new array; the standard's default device is the CPU
# in torch, so these get the backend's device unless the caller names one.
_CREATORS = ("arange", "asarray", "empty", "eye", "full", "linspace", "ones", "zeros")


def import_torch():
    """(torch, array-api-compat's torch namespace), or BackendUnavailable saying what is missing.

    A broken CUDA build of torch can raise other errors than ImportError on import (a
    missing shared library), so catch broadly and keep the original as the cause."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(f"PyTorch is not installed, so the torch backend is not available; "
                                 f"install it with {_INSTALL_HINT}, or use --device cpu") from exc
    except Exception as exc:  # noqa: BLE001 - see docstring
        raise BackendUnavailable(f"PyTorch is installed but failed to import ({type(exc).__name__}: "
                                 f"{_first_line(exc)}); reinstall it, or use --device cpu") from exc
    try:
        from array_api_compat import torch as xp
    except ImportError as exc:
        raise BackendUnavailable(f"the torch backend needs array-api-compat: {_INSTALL_HINT}") from exc
    return torch, xp


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def torch_device(torch, name):
    """``name`` ('cpu', 'cuda', 'cuda:N', 'mps') as a torch.device that works here, or
    BackendUnavailable with the reason torch gives."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            try:  # init() raises with torch's reason (a CPU-only build, no driver, ...)
                torch.cuda.init()
                why = "torch.cuda.is_available() is False"
            except Exception as exc:  # noqa: BLE001 - AssertionError, RuntimeError, ...
                why = _first_line(exc)
            raise BackendUnavailable(f"PyTorch {torch.__version__} cannot use CUDA ({why}); "
                                     "use --device torch:cpu or --device cpu")
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise BackendUnavailable(f"CUDA device {index} does not exist: {count} device(s) visible "
                                     f"(torch:cuda:0 .. torch:cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        why = ("this PyTorch build has no MPS support" if not torch.backends.mps.is_built()
               else "MPS is built but not available: it needs macOS 12.3+ on an Apple GPU")
        raise BackendUnavailable(f"PyTorch {torch.__version__} cannot use MPS ({why}); "
                                 "use --device torch:cpu or --device cpu")
    return device


class _OnDevice:
    """array-api-compat's torch namespace with the backend's device as the default of the
    functions that create arrays (the ops call ``xp.arange(...)`` without a device)."""

    def __init__(self, xp, device):
        self._xp = xp
        for name in _CREATORS:
            setattr(self, name, functools.partial(getattr(xp, name), device=device))

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def __repr__(self):
        return f"<array-api-compat torch on {self.asarray.keywords['device']}>"


class TorchBackend(Backend):
    name = "torch"
    has_out_buffers = False  # plain ops only: see the module's docstring

    def __init__(self, device="cpu"):
        torch, xp = import_torch()
        self.torch = torch
        self.torch_device = torch_device(torch, device)
        # torch's CPU thread pool follows the project's policy while training runs
        # (xpmlp/training/threads.py: limit_blas_threads), as NumPy's BLAS does.
        super().__init__(_OnDevice(xp, self.torch_device), f"torch:{self.torch_device}")

    def asarray(self, a, dtype=None):
        if not isinstance(a, np.ndarray):
            return self.xp.asarray(a, dtype=dtype)
        # Host data: converted to ``dtype`` on the host, then sent (MPS cannot hold the float64
        # it would otherwise convert from; a GPU receives the smaller array).  from_numpy
        # shares the memory; it wants it writeable, native-endian and without negative strides.
        a = np.require(a, dtype=a.dtype.newbyteorder("="), requirements=("C", "W"))
        host = self.torch.from_numpy(a)
        return host.to(dtype=dtype or host.dtype).to(self.torch_device)

    def to_numpy(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.detach().cpu().numpy()  # on the CPU a view, as NumPy's own asarray
        return np.asarray(a)

    def dtype(self, name):
        if self.torch_device.type == "mps" and np.dtype(name) == np.float64:
            raise BackendUnavailable("MPS has no float64: use --dtype float32, or --device torch:cpu")
        return super().dtype(name)

    def synchronize(self):
        kind = self.torch_device.type
        if kind == "cuda":
            self.torch.cuda.synchronize(self.torch_device)
        elif kind == "mps":
            self.torch.mps.synchronize()

    def describe(self):
        import array_api_compat
        found = {"backend": self.name, "device": self.device, "torch": self.torch.__version__,
                 "array_api_compat": array_api_compat.__version__, "numpy": np.__version__}
        if self.torch_device.type == "cuda":
            found["device_name"] = self.torch.cuda.get_device_name(self.torch_device)
        return found
