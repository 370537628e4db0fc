"""NumPy on the host CPU."""
import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    has_out_buffers = True

    def __init__(self):
        super().__init__(np, "cpu")
        self._kernels = False
        self._steps = {}

    @property
    def kernels(self):
        """Numba-fused kernels, loaded on first use; None without Numba."""
        if self._kernels is False:
            from .numpy_kernels import load
            self._kernels = load()
        return self._kernels

    def mlp_steps(self, dtype):
        """(the compiled training step (numpy_step.py) for ``dtype``, None), or (None, why
        there is none: no Numba, no GEMM it can call)."""
        if self.kernels is None:
            return None, "Numba is not installed"
        dtype = np.dtype(dtype)
        if dtype not in self._steps:  # built once per backend: finding the gemm loads libraries
            from .numpy_step import mlp_steps
            self._steps[dtype] = mlp_steps(dtype)
        return self._steps[dtype]

    def compiles_first(self):
        """Whether the first step will compile the CPU kernels (Numba's cache is cold)."""
        if self.kernels is None:
            return False
        from .numpy_step import compiled_before
        return not compiled_before()

    def take_rows(self, a, indices, out=None):
        # mode="clip" skips the buffered bounds check that mode="raise" does with out=;
        # the indices are a permutation, always in range.
        return np.take(a, indices, axis=0, out=out, mode="clip")

    def describe(self):
        found = {"backend": self.name, "device": "cpu", "numpy": np.__version__}
        if self.kernels is not None:
            import numba
            found["numba"] = numba.__version__
        return found
