"""Choosing a backend by name: the single place that maps names to backends."""
import re
import sys

from .base import BackendUnavailable

NAMES = ("auto", "cpu", "numpy", "cuda", "cuda:N", "cupy", "torch", "torch:cpu", "torch:cuda", "torch:cuda:N",
         "torch:mps", "array-api-strict")


def get_backend(name="auto", *, notice=None):
    """Return the Backend called ``name``.

    ``auto`` picks CuPy when a CUDA device works and otherwise NumPy, telling
    the user once why (``notice`` is a callable taking the line; default:
    print to stderr).
    """
    if not isinstance(name, str):
        return name  # already a Backend
    key = name.strip().lower()
    if key in ("numpy", "cpu"):
        from .numpy_backend import NumpyBackend
        return NumpyBackend()
    if key in ("array-api-strict", "strict"):
        from .strict_backend import StrictBackend
        return StrictBackend()
    match = re.fullmatch(r"torch(?::(cpu|mps|cuda(?::\d+)?))?", key)
    if match:  # "torch" alone is torch on the CPU: a GPU is always named
        from .torch_backend import TorchBackend
        return TorchBackend(match.group(1) or "cpu")
    match = re.fullmatch(r"(?:cupy|cuda|gpu)(?::(\d+))?", key)
    if match:
        from .cupy_backend import CupyBackend
        return CupyBackend(int(match.group(1) or 0))
    if key == "auto":
        from .cupy_backend import CupyBackend
        from .numpy_backend import NumpyBackend
        try:
            return CupyBackend(0)
        except BackendUnavailable as exc:
            why = re.sub(r" \(.*\)$", "", str(exc).split(";")[0])  # the reason, without CUDA's own words
            line = f"xpmlp: no usable CUDA GPU ({why}); training on the CPU with NumPy"
            (notice or (lambda s: print(s, file=sys.stderr)))(line)
            return NumpyBackend()
    raise BackendUnavailable(f"unknown device {name!r}; choose one of: {', '.join(NAMES)}")


def available_backends():
    """Map each backend name to a Backend, or to the reason it is unavailable (a str)."""
    found = {}
    for name in ("numpy", "array-api-strict", "cupy", "torch", "torch:cuda", "torch:mps"):
        try:
            found[name] = get_backend(name)
        except BackendUnavailable as exc:
            found[name] = str(exc)
    return found
