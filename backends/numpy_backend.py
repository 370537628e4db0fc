"""NumPy on the host CPU."""
import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    fast = True

    def __init__(self):
        super().__init__(np, "cpu")
        self._kernels = False

    @property
    def kernels(self):
        """Numba-fused kernels, loaded on first use; None without Numba."""
        if self._kernels is False:
            from .numpy_kernels import load
            self._kernels = load()
        return self._kernels

    def take_rows(self, a, indices, out=None):
        # mode="clip" skips the buffered bounds check that mode="raise" does with out=;
        # the indices are a permutation, always in range.
        return np.take(a, indices, axis=0, out=out, mode="clip")

    def to_numpy(self, a):
        return np.asarray(a)

    def describe(self):
        found = {"backend": self.name, "device": "cpu", "numpy": np.__version__}
        if self.kernels is not None:
            import numba
            found["numba"] = numba.__version__
        return found
