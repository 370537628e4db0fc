import time, sys, numpy as np
sys.path.insert(0, "/work/main")
from backends.numpy_kernels import sgd_step
rng = np.random.default_rng(0)
B = 100
lr, mom, wd = np.float32(0.01), np.float32(0.9), np.float32(1e-4)
def setup(fi, fo):
    a = rng.standard_normal((B, fi)).astype(np.float32); g = rng.standard_normal((B, fo)).astype(np.float32)
    W = rng.standard_normal((fi, fo)).astype(np.float32); V = np.zeros_like(W); G = np.empty_like(W)
    return a, g, W, V, G
def whole(a, g, W, V, G):
    np.matmul(a.T, g, out=G); sgd_step(W.reshape(-1), G.reshape(-1), V.reshape(-1), lr, mom, wd)
def chunked(a, g, W, V, G, rows):
    for lo in range(0, W.shape[0], rows):
        hi = min(lo + rows, W.shape[0])
        np.matmul(a[:, lo:hi].T, g, out=G[lo:hi]); sgd_step(W[lo:hi].reshape(-1), G[lo:hi].reshape(-1), V[lo:hi].reshape(-1), lr, mom, wd)
for fi, fo in ((2048, 1024), (784, 2048), (784, 256)):
    arrs = setup(fi, fo)
    res = {}
    ways = [("whole", lambda: whole(*arrs))] + [(f"rows{r}", (lambda r=r: chunked(*arrs, r))) for r in (48, 96, 192, 384)]
    for rnd in range(7):
        for name, fn in ways:
            fn(); t = time.perf_counter()
            for i in range(10): fn()
            res.setdefault(name, []).append((time.perf_counter() - t) / 10 * 1e3)
    print(fi, fo, " ".join("%s %.2f" % (k, np.median(v)) for k, v in res.items()), flush=True)
