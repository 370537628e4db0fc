"""One core: the compiled step's vectorised Sigmoid against Numba's scalar exp (the same loop
with np.exp) and NumPy's exp alone, on a 100 x 256 batch of pre-activations; best of 9 x 200."""
import time

import numpy as np

from xpmlp.backends.numpy_step import sigmoid, sigmoid_vectorised


def best_us(fn, x):
    times = []
    for _ in range(9):
        h = x.copy()
        start = time.perf_counter()
        for _ in range(200):
            fn(h)
        times.append((time.perf_counter() - start) / 200)
    return min(times) * 1e6


for dtype in (np.float32, np.float64):
    x = (np.random.default_rng(0).standard_normal((100, 256)) * 4).astype(dtype)
    sigmoid_vectorised(x.copy()), sigmoid(x.copy())  # compiled (or loaded from the cache) first
    print(f"{dtype.__name__}: vectorised {best_us(sigmoid_vectorised, x):.1f} us, scalar exp {best_us(sigmoid, x):.1f} us, "
          f"NumPy exp(-|x|) alone {best_us(lambda h: np.exp(-np.abs(h)), x):.1f} us")
