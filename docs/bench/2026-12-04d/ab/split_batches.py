# Two threads (not adaptive), mlp2-relu-sce: by columns (COLUMNS_MIN_BYTES 512 KB) against by rows (off), one thread as a base.
import sys, time, numpy as np, xpmlp
import xpmlp.training.compiled as c
from xpmlp.core.optim import SGD
from xpmlp.training.compiled import CompiledStepper
from threadpoolctl import threadpool_limits
threadpool_limits(1, user_api="blas")
rng = np.random.default_rng(0)
x = (rng.random((60000, 784)) - 0.5).astype(np.float32); y = rng.integers(0, 10, 60000)
model_name = sys.argv[1] if len(sys.argv) > 1 else "mlp2-relu-sce"
for batch in [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "10,16,20,32,50,100").split(",")]:
    steppers = {}
    for name, threads, cmb in (("one", 1, 512 * 1024), ("rows", 2, 10**12), ("columns", 2, 512 * 1024)):
        c.COLUMNS_MIN_BYTES = cmb
        model = xpmlp.build_model(model_name, backend="numpy", dtype=np.float32, seed=1, ops="fused")
        st = CompiledStepper(model, SGD(model, lr=0.01, momentum=0.9), threads=threads, adaptive=False)
        st._buffers(x, y, batch)  # the bounds, with this threshold
        steppers[name] = st
    n = 25
    idxs = [rng.permutation(60000)[:n * batch] for _ in range(20)]
    res = {}
    for rnd in range(7):
        for name, st in steppers.items():
            losses, accs = np.zeros(n, np.float32), np.zeros(n, np.float32)
            t = time.perf_counter()
            for idx in idxs:
                st.steps(x, y, idx, losses, accs)
            res.setdefault(name, []).append((time.perf_counter() - t) / (20 * n) * 1e6)
    med = {k: float(np.median(v)) for k, v in res.items()}
    cuts = steppers["columns"]._batch[-1]
    print(model_name, batch, " ".join(f"{k} {v:.1f}" for k, v in med.items()), "us a step; columns/rows %.2f" % (med["columns"] / med["rows"]),
          "| columns' row parts", None if cuts is None else len(cuts[0]) - 1, flush=True)
