"""array-api-strict: a minimal Array API namespace on the CPU.

It exists for tests: layer math that runs here uses nothing NumPy-specific, so
it also runs on CuPy.
"""
import numpy as np

from .base import Backend, BackendUnavailable


class StrictBackend(Backend):
    name = "array-api-strict"

    def __init__(self):
        try:
            import array_api_strict as xps
        except ImportError as exc:
            raise BackendUnavailable(
                "backend 'array-api-strict' needs the array-api-strict package: "
                "pip install array-api-strict") from exc
        super().__init__(xps, "cpu")

    def asarray(self, a, dtype=None):
        # array-api-strict refuses NumPy scalars of mismatched kind; go through a NumPy array.
        return self.xp.asarray(np.asarray(a), dtype=dtype)
