import time, sys, numpy as np, numba
sys.path.insert(0, "/work/main")
from backends.numpy_kernels import sgd_step
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
jit = numba.njit(nogil=True, error_model="numpy")

@intrinsic
def fma(typingctx, x, y, z):
    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, args)
    return x(x, y, z), codegen

@jit
def wgrad_sgd(a, g, W, V, G, lr, mom, wd, f_lo, f_hi):
    # rows [f_lo, f_hi) of G = a^T g, each a chain of fmas over the batch from +0, and their SGD update
    B, n = g.shape
    zero = W.dtype.type(0)
    for p in range(f_lo, f_hi):
        acc = G[p]
        for j in range(n): acc[j] = zero
        for b in range(B):
            s = a[b, p]; d = g[b]
            for j in range(n): acc[j] = fma(s, d[j], acc[j])
        w = W[p]; v = V[p]
        for j in range(n):
            gj = acc[j] + zero
            vi = mom * v[j] + (gj + wd * w[j]); v[j] = vi; w[j] = w[j] - lr * vi

rng = np.random.default_rng(0)
lr, mom, wd = np.float32(0.01), np.float32(0.9), np.float32(5e-4)
for B in (1, 5, 10, 16, 20, 32, 50, 100):
    for fi, fo in ((784, 256), (256, 128), (128, 10), (2048, 1024)):
        a = rng.standard_normal((B, fi)).astype(np.float32); a[a < 0] = 0
        g = rng.standard_normal((B, fo)).astype(np.float32); g[rng.random(g.shape) < 0.3] = 0
        W = rng.standard_normal((fi, fo)).astype(np.float32); V = rng.standard_normal((fi, fo)).astype(np.float32)
        W1, V1, G1 = W.copy(), V.copy(), np.empty_like(W)
        np.matmul(a.T, g, out=G1); sgd_step(W1.reshape(-1), G1.reshape(-1), V1.reshape(-1), lr, mom, wd)
        W2, V2, G2 = W.copy(), V.copy(), np.empty_like(W)
        wgrad_sgd(a, g, W2, V2, G2, lr, mom, wd, 0, fi)
        same = np.array_equal(G1, G2) and np.array_equal(W1, W2) and np.array_equal(V1, V2)
        def blas(): np.matmul(a.T, g, out=G1); sgd_step(W1.reshape(-1), G1.reshape(-1), V1.reshape(-1), lr, mom, wd)
        def fused(): wgrad_sgd(a, g, W2, V2, G2, lr, mom, wd, 0, fi)
        res = {}
        reps = max(3, int(2e6 // (fi * fo)))
        for rnd in range(5):
            for name, fn in (("blas", blas), ("fused", fused)):
                t = time.perf_counter()
                for i in range(reps): fn()
                res.setdefault(name, []).append((time.perf_counter() - t) / reps * 1e6)
        print(B, fi, fo, "same bits" if same else "DIFF %d" % (G1 != G2).sum(), " ".join("%s %.1f" % (k, np.median(v)) for k, v in res.items()), flush=True)
