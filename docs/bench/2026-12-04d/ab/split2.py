# The wide network's products on two threads: split by batch rows (ours), by W's columns,
# or whole with OpenBLAS's two threads.  Python threads (matmul releases the GIL), BLAS 1 thread each.
import time, threading, numpy as np
from threadpoolctl import threadpool_limits
rng = np.random.default_rng(0)
B = 100
f = np.float32
a0 = rng.standard_normal((B, 784)).astype(f); W0 = rng.standard_normal((784, 2048)).astype(f)
a1 = rng.standard_normal((B, 2048)).astype(f); W1 = rng.standard_normal((2048, 1024)).astype(f)
g1 = rng.standard_normal((B, 1024)).astype(f)
h0 = np.empty((B, 2048), f); h1 = np.empty((B, 1024), f); d0 = np.empty((B, 2048), f)
def fwd_bwd(rows=slice(None), cols0=slice(None), cols1=slice(None), colsb=slice(None)):
    np.matmul(a0[rows], W0[:, cols0], out=h0[rows, cols0])
    np.matmul(a1[rows], W1[:, cols1], out=h1[rows, cols1])
    np.matmul(g1[rows], W1[colsb].T, out=d0[rows, colsb])
def two(fn_a, fn_b):
    t = threading.Thread(target=fn_a); t.start(); fn_b(); t.join()
ways = {
    "one thread": lambda: fwd_bwd(),
    "rows split": lambda: two(lambda: fwd_bwd(rows=slice(0, 48)), lambda: fwd_bwd(rows=slice(48, B))),
    "columns split": lambda: two(lambda: fwd_bwd(cols0=slice(0, 1024), cols1=slice(0, 512), colsb=slice(0, 1024)),
                                 lambda: fwd_bwd(cols0=slice(1024, 2048), cols1=slice(512, 1024), colsb=slice(1024, 2048))),
}
res = {}
with threadpool_limits(1, user_api="blas"):
    for rnd in range(7):
        for name, fn in ways.items():
            fn(); t = time.perf_counter()
            for i in range(20): fn()
            res.setdefault(name, []).append((time.perf_counter() - t) / 20 * 1e3)
with threadpool_limits(2, user_api="blas"):
    for rnd in range(7):
        fwd_bwd(); t = time.perf_counter()
        for i in range(20): fwd_bwd()
        res.setdefault("openblas 2 threads", []).append((time.perf_counter() - t) / 20 * 1e3)
for k, v in res.items(): print(f"{k:20s} {np.median(v):6.2f} ms (forward 2 products + backward 1)")
