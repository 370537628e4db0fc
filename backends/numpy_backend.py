"""NumPy on the host CPU."""
import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    fast = True

    def __init__(self):
        super().__init__(np, "cpu")

    def to_numpy(self, a):
        return np.asarray(a)

    def describe(self):
        return {"backend": self.name, "device": "cpu", "numpy": np.__version__}
