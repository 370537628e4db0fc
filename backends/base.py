"""The Backend interface shared by every array namespace."""
import numpy as np


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and how to fix it."""


class Backend:
    """An array namespace plus the device it computes on.

    ``xp`` is the namespace the layers compute with.  ``asarray`` (host to
    device) and ``to_numpy`` (device to host) are the only places data crosses
    between host and device.  ``has_out_buffers`` says whether the namespace has
    the NumPy-style extras (``out=``, in-place views) that the buffered and fused ops use.
    """

    name = "base"
    has_out_buffers = False
    # The fused kernels where the backend has them (numpy_kernels.py, cupy_kernels.py): plain
    # callables that xpmlp's fused ops (xpmlp/ops.py) call where a kernel can run.
    kernels = None

    def __init__(self, xp, device="cpu"):
        self.xp = xp
        self.device = device

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return np.asarray(a)

    def take_rows(self, a, indices, out=None):
        """Rows ``indices`` of ``a``, written into ``out`` when given (the batch gather)."""
        xp = self.xp
        return xp.take(a, indices, axis=0) if out is None else xp.take(a, indices, axis=0, out=out)

    def synchronize(self):
        """Wait for queued device work; a no-op on the CPU."""

    def dtype(self, name):
        """Map 'float32' / 'float64' (or a NumPy dtype) to this namespace's dtype."""
        return getattr(self.xp, np.dtype(name).name)

    def describe(self):
        """A short dict saying what ran: recorded in run directories and benchmarks."""
        return {"backend": self.name, "device": str(self.device)}

    def __repr__(self):
        return f"<Backend {self.name} on {self.device}>"
