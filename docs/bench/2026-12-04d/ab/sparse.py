import time, sys, numpy as np, numba
sys.path.insert(0, "/work/main")
from backends.numpy_kernels import sgd_step
from xpmlp.data import load_mnist
jit = numba.njit(nogil=True, error_model="numpy")

@jit
def to_csr(x, c):
    n, f = x.shape
    indptr = np.zeros(n + 1, np.int64)
    for r in range(n):
        k = 0
        for p in range(f):
            if x[r, p] != c: k += 1
        indptr[r + 1] = indptr[r] + k
    ind = np.empty(indptr[-1], np.int32); val = np.empty(indptr[-1], x.dtype)
    for r in range(n):
        k = indptr[r]
        for p in range(f):
            if x[r, p] != c:
                ind[k] = p; val[k] = x[r, p] - c; k += 1
    return indptr, ind, val

@jit
def colsum(W, cs):
    cs[:] = 0
    for p in range(W.shape[0]):
        row = W[p]
        for j in range(cs.shape[0]):
            cs[j] += row[j]

@jit
def fwd(indptr, ind, val, rows, c, W, cs, out):
    n = out.shape[1]
    colsum(W, cs)
    for b in range(rows.shape[0]):
        r = rows[b]
        o = out[b]
        for j in range(n): o[j] = c * cs[j]
        for e in range(indptr[r], indptr[r + 1]):
            s = val[e]; w = W[ind[e]]
            for j in range(n): o[j] += s * w[j]

@jit
def wgrad_update(indptr, ind, val, rows, c, dZ, W, V, lr, mom, wd, count, start, bidx, bval, db, g):
    B, n = dZ.shape
    f = W.shape[0]
    # db = column sums of dZ
    db[:] = 0
    for b in range(B):
        for j in range(n): db[j] += dZ[b, j]
    count[:] = 0
    for b in range(B):
        r = rows[b]
        for e in range(indptr[r], indptr[r + 1]): count[ind[e]] += 1
    start[0] = 0
    for p in range(f): start[p + 1] = start[p] + count[p]
    count[:] = 0
    for b in range(B):
        r = rows[b]
        for e in range(indptr[r], indptr[r + 1]):
            p = ind[e]; k = start[p] + count[p]; bidx[k] = b; bval[k] = val[e]; count[p] += 1
    for p in range(f):
        for j in range(n): g[j] = c * db[j]
        for k in range(start[p], start[p + 1]):
            s = bval[k]; d = dZ[bidx[k]]
            for j in range(n): g[j] += s * d[j]
        w = W[p]; v = V[p]
        for j in range(n):
            vi = mom * v[j] + (g[j] + wd * w[j]); v[j] = vi; w[j] = w[j] - lr * vi

@jit
def gather(x, rows, xb):
    for b in range(rows.shape[0]):
        src = x[rows[b]]; dst = xb[b]
        for j in range(dst.shape[0]): dst[j] = src[j]

def main(B, H, reps=300):
    d = load_mnist("/work/shared/data/mnist", download=False, progress=False)
    x = d.train_x; c = np.float32(-128/255)
    vals, counts = np.unique(x, return_counts=True); print("mode", vals[counts.argmax()], "density", 1 - counts.max()/x.size)
    indptr, ind, val = to_csr(x, c)
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((784, H)) * 0.05).astype(np.float32); V = np.zeros_like(W)
    cs = np.empty(H, np.float32); out = np.empty((B, H), np.float32); xb = np.empty((B, 784), np.float32)
    dZ = rng.standard_normal((B, H)).astype(np.float32) * 0.01
    count = np.empty(784, np.int64); start = np.empty(785, np.int64); bidx = np.empty(B * 784, np.int32); bval = np.empty(B * 784, np.float32)
    db = np.empty(H, np.float32); g = np.empty(H, np.float32); G = np.empty_like(W)
    lr, mom, wd = np.float32(0.01), np.float32(0.9), np.float32(1e-4)
    rows = rng.integers(0, 60000, B)
    # correctness
    gather(x, rows, xb); fwd(indptr, ind, val, rows, c, W, cs, out)
    print("fwd maxrel", np.abs(out - xb @ W).max() / np.abs(xb @ W).max())
    W2, V2 = W.copy(), V.copy()
    wgrad_update(indptr, ind, val, rows, c, dZ, W2, V2, lr, mom, wd, count, start, bidx, bval, db, g)
    G = xb.T @ dZ; Wd, Vd = W.copy(), V.copy(); sgd_step(Wd.ravel(), G.ravel(), Vd.ravel(), lr, mom, wd)
    print("upd maxabs dv", np.abs(V2 - Vd).max(), np.abs(Vd).max())
    def dense():
        gather(x, rows, xb); np.matmul(xb, W, out=out); np.matmul(xb.T, dZ, out=G); sgd_step(W.ravel(), G.ravel(), V.ravel(), lr, mom, wd)
    def sparse():
        fwd(indptr, ind, val, rows, c, W, cs, out); wgrad_update(indptr, ind, val, rows, c, dZ, W, V, lr, mom, wd, count, start, bidx, bval, db, g)
    def dense_f(): gather(x, rows, xb); np.matmul(xb, W, out=out)
    def sparse_f(): fwd(indptr, ind, val, rows, c, W, cs, out)
    res = {}
    for rnd in range(5):
        for name, fn in (("dense", dense), ("sparse", sparse), ("dense_fwd", dense_f), ("sparse_fwd", sparse_f)):
            t = time.perf_counter()
            for i in range(reps):
                rows = rng.integers(0, 60000, B)
                fn()
            res.setdefault(name, []).append((time.perf_counter() - t) / reps * 1e6)
    for k, v in res.items(): print(B, H, k, "%.1f us" % np.median(v))

for B, H in ((100, 256), (10, 256), (100, 2048), (100, 10), (100, 64)):
    main(B, H)
