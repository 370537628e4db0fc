"""Where a one-thread step of mlp2-relu-sce (batch 100, float32) goes: each part of the
compiled step timed alone, through the same compiled functions (numpy_step.matmul calls
NumPy's OpenBLAS as the step does), then the parts in the step's order, in one process.
The difference between the sum of the parts and the sequence is what the parts cost each
other: caches (the SGD pass streams params, grads and velocity: 2.8 MB, more than this
core's 2 MB L2).  Run pinned: taskset -c 1 python one_core_parts.py (synthetic data; Python
calls between the parts add a few us a step)."""
import time

import numpy as np

from xpmlp.backends import numpy_kernels as K
from xpmlp.backends import numpy_step as S

f, B, SIZES = np.float32, 100, [(784, 256), (256, 128), (128, 10)]
rng = np.random.default_rng(0)
x, idx = rng.random((60000, 784), dtype=f), rng.permutation(60000)
P = sum(i * o + o for i, o in SIZES)
params, grads, vel = rng.standard_normal(P).astype(f) * 0.05, rng.standard_normal(P).astype(f), np.zeros(P, f)
offsets, W, dW, b, off = [], [], [], [], 0
for i, o in SIZES:  # views into the flat buffers, as the step's
    offsets.append(off)
    W.append(params[off:off + i * o].reshape(i, o))
    dW.append(grads[off:off + i * o].reshape(i, o))
    b.append(params[off + i * o:off + i * o + o])
    off += i * o + o
h = [np.empty((B, o), f) for _, o in SIZES]
g = [rng.standard_normal((B, o)).astype(f) for _, o in SIZES]
gb = [np.empty(o, f) for _, o in SIZES]
xb = np.empty((B, 784), f)
G = S.find_gemm(f)[0].arg
lr, m, wd = f(0.01), f(0.9), f(5e-4)


def gather():
    np.take(x, idx[:B], axis=0, out=xb)


def forward():
    a = xb
    for k in range(3):
        S.matmul(G, a, False, W[k], False, h[k])
        S.bias_act(h[k], 0, B, 0, h[k].shape[1], b[k], S.RELU if k < 2 else S.LINEAR)
        a = h[k]


def input_grads():
    for k in (2, 1):
        S.matmul(G, g[k], False, W[k], True, g[k - 1])
        S.act_backward(g[k - 1], h[k - 1], 0, B, 0, g[k - 1].shape[1], S.RELU)


def weight_grads():
    for k, a in zip((2, 1, 0), (h[1], h[0], xb)):
        S.matmul(G, a, True, g[k], False, dW[k])
        K.column_sums(g[k], gb[k], 0, g[k].shape[1])


def sgd():
    K.sgd_step(params, grads, vel, lr, m, wd)


def timed(fn, n=1500):
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


parts = {"gather": gather, "forward (3 products, bias, ReLU)": forward, "input gradients (2 products)": input_grads,
         "weight gradients (3 products, bias sums)": weight_grads, "SGD (all 235,146 parameters)": sgd}
alone = {name: timed(fn) for name, fn in parts.items()}
for name, us in alone.items():
    print(f"{name:42s} {us:7.1f} us a step {us * 0.6:6.1f} ms an epoch")
total = sum(alone.values())
print(f"{'sum of the parts alone':42s} {total:7.1f} us a step {total * 0.6:6.1f} ms an epoch")
seq = timed(lambda: [fn() for fn in parts.values()])
print(f"{'the parts in sequence':42s} {seq:7.1f} us a step {seq * 0.6:6.1f} ms an epoch")
no_sgd = timed(lambda: [fn() for name, fn in parts.items() if not name.startswith("SGD")])
print(f"{'the same without SGD':42s} {no_sgd:7.1f} us a step {no_sgd * 0.6:6.1f} ms an epoch")


# The weight gradients and updates layer by layer (as the compiled step's features phase),
# in three orders, and the first layer's in row blocks, each block updated while in cache.
A = [xb, h[0], h[1]]


def layer_update(k, lo=None, hi=None):
    fan_in, fan_out = W[k].shape
    lo, hi = lo or 0, hi or fan_in
    S.matmul(G, A[k][:, lo:hi], True, g[k], False, dW[k][lo:hi])
    start, end = offsets[k] + lo * fan_out, offsets[k] + hi * fan_out
    K.sgd_step(params[start:end], grads[start:end], vel[start:end], lr, m, wd)


def step_with(updates):
    def step():
        gather()
        forward()
        input_grads()
        updates()
    return step


def first_in_blocks(blocks):
    def updates():
        layer_update(2)
        layer_update(1)
        cuts = [784 * j // blocks for j in range(blocks + 1)]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            layer_update(0, lo, hi)
    return updates


print("a step, its updates layer by layer:")
for _ in range(2):
    for name, updates in [("first layer first (0, 1, 2)", lambda: [layer_update(k) for k in (0, 1, 2)]),
                          ("last layer first (2, 1, 0)", lambda: [layer_update(k) for k in (2, 1, 0)]),
                          ("2, 1, then 0 in 4 row blocks", first_in_blocks(4)),
                          ("2, 1, then 0 in 8 row blocks", first_in_blocks(8))]:
        us = timed(step_with(updates))
        print(f"  {name:40s} {us:7.1f} us a step {us * 0.6:6.1f} ms an epoch")
