"""Array backends: which namespace, which device, host<->device copies.

This package is the only code of the library that imports CuPy or PyTorch (each in its
own module, on first use).  Everything else receives a :class:`Backend` and does its math
through ``backend.xp``.
"""
from .base import Backend, BackendUnavailable
from .select import available_backends, get_backend

__all__ = ["Backend", "BackendUnavailable", "available_backends", "get_backend"]
