"""A whole training step of a ReLU MLP compiled with Numba: the CPU's answer to XLA's
compiled epoch.

One call runs any number of steps (gather, forward, loss and accuracy, backward, SGD)
with no Python between the operations.  The matrix products go to NumPy's own BLAS,
called through ctypes with the arguments ``np.matmul`` gives it, so they return the same
bits as the array code; every elementwise pass is fused into the loop over the rows the
product just wrote, while they are still in cache:
  forward   h = relu(a @ W + b)                    one pass after the product
  loss      softmax cross-entropy (or sigmoid + Euclidean), gradient and accuracy, one pass
  backward  g_prev = (g @ W^T) * [h > 0] and its bias gradient, one pass
  SGD       each layer's W and b right after its last use, while its gradient is in cache
Only ReLU hidden layers are compiled: Numba's scalar exp is ~20x slower than NumPy's
vectorised one, so Sigmoid hidden layers keep the array path (see numpy_kernels.py).
"""
import ctypes
import os

import numpy as np

from .numpy_kernels import bias_grad, euclidean, jit, numba, sgd_step, sigmoid_backward, softmax_xent

if numba is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic
else:  # numpy_kernels.load() gives no kernels without Numba: nothing here is called
    def intrinsic(fn):
        return fn

# CBLAS enumerations (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Loss codes of the compiled step
SOFTMAX_XENT, SIGMOID_EUCLIDEAN = 0, 1


def numpy_gemm(dtype):
    """The address of NumPy's own BLAS ``cblas_?gemm`` (64-bit integers) for ``dtype``, or
    None where it cannot be found (a NumPy without a bundled 64-bit OpenBLAS).  The library
    is the one threadpoolctl reports under NumPy's install, so thread limits apply to it."""
    from threadpoolctl import threadpool_info

    letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}[np.dtype(dtype)]
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    for lib in threadpool_info():
        if lib.get("user_api") != "blas" or not lib["filepath"].startswith(numpy_dir):
            continue
        handle = ctypes.CDLL(lib["filepath"])
        # scipy-openblas64 (NumPy's wheels) prefixes and suffixes its symbols; others do not.
        for name in (f"scipy_cblas_{letter}gemm64_", f"cblas_{letter}gemm64_"):
            if hasattr(handle, name):
                return ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
    return None


@intrinsic
def _call_gemm(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
    """cblas_?gemm(RowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, 0, c, ldc)
    through the function pointer ``address``: an indirect call, so the compiled code holds
    no address and Numba can cache it on disk (a ctypes function argument cannot be)."""
    def codegen(context, builder, signature, args):
        i32, i64, ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        real = context.get_value_type(signature.args[6])

        def cast(i, to):  # argument i as the C type ``to`` (enums: int32; sizes: int64)
            return context.cast(builder, args[i], signature.args[i], to)

        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, ptr, i64, ptr, i64,
                                                real, ptr, i64])
        fn = builder.inttoptr(cast(0, types.uintp), fnty.as_pointer())
        a, b, c = (builder.inttoptr(cast(i, types.uintp), ptr) for i in (7, 9, 11))
        builder.call(fn, [i32(_ROW_MAJOR), cast(1, types.int32), cast(2, types.int32),
                          cast(3, types.int64), cast(4, types.int64), cast(5, types.int64), args[6],
                          a, cast(8, types.int64), b, cast(10, types.int64), real(0), c, cast(12, types.int64)])
        return context.get_dummy_value()

    return types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc), codegen


@jit
def matmul(gemm, a, trans_a, b, trans_b, out):
    # out = op(a) @ op(b) for C-contiguous a, b, out, op = transpose where asked:
    # the call np.matmul makes for a (transposed) C-contiguous operand.
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    _call_gemm(gemm, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k,
               out.dtype.type(1), a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], out.ctypes.data, n)


@jit
def bias_relu(h, b, relu):
    # h = relu(h + b) in place (Eq. 4 then Eq. 6), the + b as its own rounding.
    n, k = h.shape
    for r in range(n):
        for c in range(k):
            t = h[r, c] + b[c]
            h[r, c] = 0 if relu and t <= 0 else t


@jit
def sigmoid(h):
    # Eq. (8) from e^-|x| (no overflow), in place.
    n, k = h.shape
    one = h.dtype.type(1)
    for r in range(n):
        for c in range(k):
            x = h[r, c]
            e = np.exp(-abs(x))
            h[r, c] = (one if x >= 0 else e) / (one + e)


@jit
def relu_backward_bias_grad(g, h, grad_b):
    # g = g * [h > 0] in place (Eq. 7) and grad_b = its column sums (Eq. 5), rows in order.
    n, k = g.shape
    for c in range(k):
        grad_b[c] = 0
    for r in range(n):
        for c in range(k):
            v = g[r, c] if h[r, c] > 0 else 0
            g[r, c] = v
            grad_b[c] += v


@jit
def steps(gemm, x, y, idx, Ws, bs, grad_Ws, grad_bs, hs, gs, xb, yb, loss_code,
          params, grads, velocity, offsets, lr, momentum, weight_decay, losses, accs):
    """len(losses) SGD steps on consecutive batches of rows ``idx`` of (x, y).

    Ws, bs, grad_Ws, grad_bs: views into the flat params and grads; layer k's W and b
    are params[offsets[k]:offsets[k + 1]].  hs[k]: layer k's output (after its ReLU),
    gs[k]: dL/d(layer k's pre-activation output); xb, yb: the batch."""
    batch = xb.shape[0]
    n_layers = len(Ws)
    last = n_layers - 1
    n_t = xb.dtype.type(batch)
    for s in range(losses.shape[0]):
        for r in range(batch):  # gather
            row = idx[s * batch + r]
            xb[r, :] = x[row, :]
            yb[r] = y[row]
        a = xb
        for k in range(n_layers):  # forward
            matmul(gemm, a, False, Ws[k], False, hs[k])
            bias_relu(hs[k], bs[k], k < last)
            a = hs[k]
        if loss_code == SOFTMAX_XENT:
            loss, acc = softmax_xent(hs[last], yb, gs[last])
        else:
            sigmoid(hs[last])
            loss, acc = euclidean(hs[last], yb, gs[last], xb.dtype.type(1), n_t)
            sigmoid_backward(hs[last], gs[last], gs[last], xb.dtype.type(1))  # in place
        losses[s], accs[s] = loss, acc
        for k in range(last, -1, -1):  # backward, then this layer's SGD
            matmul(gemm, hs[k - 1] if k > 0 else xb, True, gs[k], False, grad_Ws[k])
            if k == last:
                bias_grad(gs[k], grad_bs[k])
            if k > 0:
                matmul(gemm, gs[k], False, Ws[k], True, gs[k - 1])
                relu_backward_bias_grad(gs[k - 1], hs[k - 1], grad_bs[k - 1])
            lo, hi = offsets[k], offsets[k + 1]
            sgd_step(params[lo:hi], grads[lo:hi], velocity[lo:hi], lr, momentum, weight_decay)

