"""A whole training step of an MLP (ReLU or Sigmoid hidden layers) compiled with Numba:
the CPU's answer to XLA's compiled epoch.

One call runs any number of steps (gather, forward, loss and accuracy, backward, SGD)
with no Python between the operations.  The matrix products go to NumPy's own BLAS,
called through its CBLAS ``?gemm`` with the arguments ``np.matmul`` gives it, so they
return the same bits as the array code (find_gemm: LP64 or ILP64, as OpenBLAS, MKL or
Accelerate name it; else a BLAS xpmlp can load, whose bits may differ); every
elementwise pass is fused into the loop over the rows the product just wrote, while they
are still in cache.

A step is two phases, each of one task or of parts that threads can take:
  rows      gather, h = act(a @ W + b) layer by layer, the loss terms and gradient
            (softmax cross-entropy, or sigmoid + Euclidean), g_prev = (g @ W^T) * act'(h):
            all row by row, so the batch's rows split in parts that never meet;
  features  each layer's dW = a^T g, db = column sums of g and its SGD update, split by the
            rows of W (the layer's input features), which only the thread owning them reads
            or writes; and the step's mean loss and accuracy from the per-row terms.  On a
            small batch in more parts than threads: each part's gradient is then still
            in cache for its update (compiled.py, SMALL_BATCH).
Where the first layers are large (compiled.py, COLUMNS_MIN_BYTES), their products go by
their outputs' columns instead, a phase each (_phases: the gather, their forward products,
the rows phase for the rest, their backward products, the features), so that each thread
packs its share of W, not all of it.
A task waits only for the tasks of the previous phase; tasks are claimed, not assigned
(``_claim``), so a helper thread that is late or descheduled holds nothing back: the
calling thread takes every task nobody has claimed, and waits only for a task in progress;
a wait longer than any task takes gives the core away (the task's thread may be waiting
for it: measured, a step on two threads beside a busy process 1.4x faster).
The parts are cut where the products return the same bits as a whole product (checked
by compiled.py), so one thread and P give the same training, bit for bit.
Hidden layers are ReLU or Sigmoid.  Numba's scalar exp is a call per element (~20x
slower than NumPy's vectorised one), so Sigmoid hidden layers use an exp of our own
(``_exp_nonpositive``): a polynomial with no calls and no branches, which LLVM vectorises.
It agrees with NumPy's to a few units in the last place, not bit for bit.  The output
Sigmoid of a Euclidean network keeps the scalar exp: ten columns, and the bits the
compiled step has always given those networks.
"""
import ctypes
import ctypes.util
import dataclasses
import decimal
import importlib
import math
import os

import numpy as np

from .numpy_kernels import (
    column_sums,
    euclidean_row,
    jit,
    numba,
    sgd_step,
    sigmoid_backward,
    softmax_xent_row,
    vector_jit,
)

if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
else:  # numpy_kernels.load() gives no kernels without Numba: nothing here is called
    def intrinsic(fn):
        return fn

# CBLAS enumerations (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Loss and hidden-activation codes of the compiled step
SOFTMAX_XENT, SIGMOID_EUCLIDEAN = 0, 1
RELU, SIGMOID = 0, 1
LINEAR = 2  # the last layer's: bias_act adds the bias alone
# The kinds of a step's phases (_phases)
GATHER, FORWARD, ROWS, BACKWARD, FEATURES = 0, 1, 2, 3, 4
# The words of the ``sync`` array two threads share: (call generation << 32) | next task
# to claim, and the number of tasks done.
CLAIM, DONE = 0, 1
# Looks at the done count before a waiting thread gives its core away: ~0.3-1 ms, longer than
# a task takes when its thread runs.
SPINS_BEFORE_PAUSE = 200_000


@dataclasses.dataclass(frozen=True)
class Gemm:
    """A CBLAS ``?gemm`` the compiled step calls: its address, whether its integers are 64-bit
    (ILP64) or 32-bit (LP64), its name and library, and whether that library is NumPy's own
    (then the compiled products are the array path's, bit for bit)."""
    address: int
    ilp64: bool
    symbol: str
    library: str
    numpys: bool

    @property
    def arg(self):
        """As the compiled code takes it (``gemm``)."""
        return (self.address, self.ilp64)

    def __str__(self):
        return f"{self.symbol} of {os.path.basename(self.library)}"


def _symbols(letter):
    """(name, ilp64) of CBLAS ``?gemm`` as BLAS builds export it; ilp64 None: an unsuffixed
    name, 64-bit only where the build says so (_unsuffixed_ilp64)."""
    return [(f"scipy_cblas_{letter}gemm64_", True),  # scipy-openblas64: NumPy's PyPI wheels
            (f"cblas_{letter}gemm64_", True),  # OpenBLAS ILP64 (distributions, conda's 64-bit)
            (f"cblas_{letter}gemm_64", True),  # MKL's ILP64 names
            (f"cblas_{letter}gemm$NEWLAPACK$ILP64", True),  # Accelerate (macOS >= 13.3): NumPy's macOS wheels
            (f"scipy_cblas_{letter}gemm", False),  # scipy-openblas32
            (f"cblas_{letter}gemm$NEWLAPACK", False),  # Accelerate, LP64
            (f"cblas_{letter}gemm", None)]  # OpenBLAS LP64, MKL (conda), reference CBLAS, older Accelerate


def _unsuffixed_ilp64(handle, path):
    """Whether an unsuffixed ``cblas_?gemm`` takes 64-bit integers: an OpenBLAS says so in
    its config (USE64BITINT); MKL's single library when told by MKL_INTERFACE_LAYER."""
    for name in ("openblas_get_config", "scipy_openblas_get_config"):
        try:
            config = handle[name]
        except AttributeError:
            continue
        config.restype = ctypes.c_char_p
        return b"USE64BITINT" in (config() or b"")
    mkl = "mkl" in os.path.basename(path).lower()
    return mkl and os.environ.get("MKL_INTERFACE_LAYER", "").upper().startswith("ILP64")


def _gemm_in(path, letter, numpys):
    """The Gemm of library ``path``, or None (not loadable, or no CBLAS ?gemm in it)."""
    try:
        handle = ctypes.CDLL(path)
    except OSError:
        return None
    for name, ilp64 in _symbols(letter):
        try:
            fn = handle[name]
        except AttributeError:
            continue
        ilp64 = _unsuffixed_ilp64(handle, path) if ilp64 is None else ilp64
        return Gemm(ctypes.cast(fn, ctypes.c_void_p).value, ilp64, name, path, numpys)
    return None


def numpys_blas():
    """Paths of the BLAS NumPy uses, as far as this process can tell: the BLAS libraries
    loaded now (threadpoolctl, so thread limits apply to them), those NumPy's wheel bundles
    first (conda's or a distribution's NumPy links one elsewhere); Accelerate before all
    where NumPy was built on it (threadpoolctl does not list it)."""
    from threadpoolctl import threadpool_info

    # Where NumPy's wheels keep the BLAS they bundle: numpy.libs beside numpy (Linux,
    # Windows), numpy/.dylibs (macOS).  Not all of site-packages: other wheels bundle theirs.
    package = os.path.dirname(np.__file__)
    own = tuple(os.path.normcase(folder + os.sep) for folder in (package, package + ".libs"))
    loaded = [lib["filepath"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    paths = sorted(loaded, key=lambda path: not os.path.normcase(path).startswith(own))
    try:
        built_on = np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]
    except (AttributeError, KeyError, TypeError):
        built_on = ""
    accelerate = ctypes.util.find_library("Accelerate") if "accelerate" in str(built_on).lower() else None
    return ([accelerate] if accelerate else []) + paths


def reachable_blas():
    """Paths of BLAS libraries xpmlp can load itself: the scipy-openblas wheels, where installed."""
    paths = []
    for module in ("scipy_openblas64", "scipy_openblas32"):
        try:
            wheel = importlib.import_module(module)
        except ImportError:
            continue
        paths.append(os.path.join(wheel.get_lib_dir(), wheel.get_library(fullname=True)))
    return paths


def _threads_as_numpys(path):
    """Give the library at ``path``, loaded just now, as many threads as NumPy's BLAS has:
    a thread limit entered before it was loaded (xpmlp's policy: threads.py) missed it, and
    it would start with one thread a core."""
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController().select(user_api="blas").lib_controllers
    others = [lib.num_threads for lib in blas if lib.filepath != path]
    if others:
        ThreadpoolController().select(filepath=path).limit(limits=min(others))  # kept: not restored


def find_gemm(dtype):
    """(Gemm, None): the ``?gemm`` of NumPy's own BLAS for ``dtype``, else of a BLAS xpmlp
    can load (numpys False); or (None, why) where there is none."""
    letter = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}[np.dtype(dtype)]
    numpys = numpys_blas()
    for own, paths in ((True, lambda: numpys), (False, reachable_blas)):
        for path in paths():  # reachable_blas only if needed: importing a wheel loads its library
            gemm = _gemm_in(path, letter, own)
            if gemm is not None:
                if not own:
                    _threads_as_numpys(path)
                return gemm, None
    seen = ", ".join(os.path.basename(path) for path in numpys) or "none found"
    return None, (f"no CBLAS {letter}gemm in NumPy's BLAS ({seen}) nor in one xpmlp can load "
                  "(pip install scipy-openblas32 gives one)")


def _gemm_call(bits):
    """An intrinsic: cblas_?gemm(RowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
    0, c, ldc) through the function pointer ``address``, its sizes ``bits``-bit integers
    (64: ILP64, 32: LP64; on some ABIs, Apple's arm64 among them, a wrong width is not
    just a wasted half).  An indirect call, so the compiled code holds no address and
    Numba can cache it on disk (a ctypes function argument cannot be)."""
    @intrinsic
    def call(typingctx, address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
        def codegen(context, builder, signature, args):
            i32, size, ptr = ir.IntType(32), ir.IntType(bits), ir.IntType(8).as_pointer()
            size_type = types.int64 if bits == 64 else types.int32
            real = context.get_value_type(signature.args[6])

            def cast(i, to):  # argument i as the C type ``to`` (enums: int32; sizes: ``bits``)
                return context.cast(builder, args[i], signature.args[i], to)

            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, size, size, size, real, ptr, size, ptr, size,
                                                    real, ptr, size])
            fn = builder.inttoptr(cast(0, types.uintp), fnty.as_pointer())
            a, b, c = (builder.inttoptr(cast(i, types.uintp), ptr) for i in (7, 9, 11))
            builder.call(fn, [i32(_ROW_MAJOR), cast(1, types.int32), cast(2, types.int32),
                              cast(3, size_type), cast(4, size_type), cast(5, size_type), args[6],
                              a, cast(8, size_type), b, cast(10, size_type), real(0), c, cast(12, size_type)])
            return context.get_dummy_value()

        return types.void(address, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc), codegen

    return call


_call_gemm64, _call_gemm32 = _gemm_call(64), _gemm_call(32)


def _item_pointer(context, builder, array_type, array, index_type, index):
    array = context.make_array(array_type)(context, builder, array)
    index = context.cast(builder, index, index_type, types.intp)
    return cgutils.get_item_pointer(context, builder, array_type, array, [index], wraparound=False)


@intrinsic
def _atomic_load(typingctx, array, index):
    """array[index] of an int64 array, read atomically: a spin loop sees other threads' writes."""
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(array, index), codegen


@intrinsic
def _atomic_add(typingctx, array, index, value):
    """array[index] += value atomically (int64); returns the old value."""
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], signature.args[2], types.int64),
                                  "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def _atomic_cas(typingctx, array, index, expected, new):
    """array[index] = new if it equals expected, atomically (int64); returns the old value."""
    def codegen(context, builder, signature, args):
        ptr = _item_pointer(context, builder, signature.args[0], args[0], signature.args[1], args[1])
        old = builder.cmpxchg(ptr, context.cast(builder, args[2], signature.args[2], types.int64),
                              context.cast(builder, args[3], signature.args[3], types.int64), "seq_cst", "seq_cst")
        return builder.extract_value(old, 0)

    return types.int64(array, index, expected, new), codegen


@jit
def _claim(sync, generation, total):
    # The next task of this call (generation) nobody has claimed, or -1 when none is left
    # or the call is over (a late helper finds a newer generation and leaves).
    while True:
        word = _atomic_load(sync, CLAIM)
        task = word & 0xFFFFFFFF
        if word >> 32 != generation or task >= total:
            return -1
        if _atomic_cas(sync, CLAIM, word, word + 1) == word:
            return task


@intrinsic
def _call_pause(typingctx, address):
    # The OS call at ``address`` (pause_address), as _gemm_call calls the GEMM: the
    # compiled code holds no address, so Numba can cache it.
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        builder.call(builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.uintp),
                                      fnty.as_pointer()), [])
        return context.get_dummy_value()

    return types.void(address), codegen


def pause_address():
    """The address of the OS call that gives this thread's core to another thread that is
    ready to run (sched_yield; SwitchToThread on Windows), or 0 where there is none."""
    try:
        pause = ctypes.WinDLL("kernel32").SwitchToThread if os.name == "nt" else ctypes.CDLL(None).sched_yield
    except (OSError, AttributeError):
        return 0
    return ctypes.cast(pause, ctypes.c_void_p).value or 0


@jit
def _wait_done(sync, count, pause):
    # Spin until ``count`` tasks are done: a task takes ~0.1-1 ms, too short to sleep for.
    # A wait longer than any task's (SPINS_BEFORE_PAUSE looks) means the task's thread is
    # off its core, maybe for this one: from then on each look gives the core away.
    spins = 0
    while _atomic_load(sync, DONE) < count:
        spins += 1
        if spins > SPINS_BEFORE_PAUSE and pause != 0:
            _call_pause(pause)


@jit
def matmul(gemm, a, trans_a, b, trans_b, out):
    # out = op(a) @ op(b), op = transpose where asked, for arrays whose rows are contiguous
    # (row slices, column slices): the call np.matmul makes for such (transposed) operands.
    # gemm: (address, ilp64), Gemm.arg.
    address, ilp64 = gemm
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    size = out.itemsize
    ta, tb = _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS
    lda, ldb, ldc = a.strides[0] // size, b.strides[0] // size, out.strides[0] // size
    if ilp64:
        _call_gemm64(address, ta, tb, m, n, k, out.dtype.type(1), a.ctypes.data, lda, b.ctypes.data, ldb,
                     out.ctypes.data, ldc)
    else:
        _call_gemm32(address, ta, tb, m, n, k, out.dtype.type(1), a.ctypes.data, lda, b.ctypes.data, ldb,
                     out.ctypes.data, ldc)


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




def _ln2_parts():
    """ln 2 as hi + lo in float64: hi with its last 32 bits of mantissa zero, so n * hi is
    exact for any exponent n here; lo the rest, from a 40-digit ln 2."""
    hi = np.array(math.log(2)).view(np.int64) & ~np.int64(0xFFFFFFFF)
    hi = float(np.array(hi).view(np.float64))
    with decimal.localcontext() as context:
        context.prec = 40
        return hi, float(decimal.Decimal(2).ln() - decimal.Decimal(hi))


def _ln2_parts32():
    """ln 2 as hi + lo in float32: hi with its last 8 bits of mantissa zero (n * hi exact
    for |n| < 256), lo the rest."""
    hi = np.array(np.float32(math.log(2))).view(np.int32) & ~np.int32(0xFF)
    hi = np.array(hi).view(np.float32)[()]
    return hi, np.float32(math.log(2) - float(hi))


LN2_HI, LN2_LO = _ln2_parts()
LOG2E = 1 / math.log(2)
# e^r = sum r^k / k!: for |r| <= ln2 / 2 the terms past r^13 are below 2e-17 (float64);
# past r^7, below 6e-9, under float32's rounding (TAYLOR32).
TAYLOR = tuple(1 / math.factorial(k) for k in range(14))
# The same in float32, for float32 arrays: twice the vector lanes of float64.
LN2_HI32, LN2_LO32 = _ln2_parts32()
LOG2E32, TAYLOR32 = np.float32(LOG2E), tuple(np.float32(c) for c in TAYLOR[:8])
LOWEST32, HALF32, ONE32 = np.float32(-104.0), np.float32(0.5), np.float32(1.0)


@intrinsic
def _double_from_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 ``bits`` (a bitcast, which vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(context.cast(builder, args[0], signature.args[0], types.int64), ir.DoubleType())

    return types.float64(bits), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(context.cast(builder, args[0], signature.args[0], types.int32), ir.FloatType())

    return types.float32(bits), codegen


@vector_jit
def _exp_nonpositive32(x):
    # _exp_nonpositive in float32 (to r^7; below -104, where e^x rounds to 0, x is -104).
    x = x if x > LOWEST32 else LOWEST32
    n = np.floor(x * LOG2E32 + HALF32)
    r = (x - n * LN2_HI32) - n * LN2_LO32
    c = TAYLOR32
    p = ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
    k = np.int32(n)
    half = k >> 1
    return p * _float32_from_bits((half + 127) << 23) * _float32_from_bits((k - half + 127) << 23)


@vector_jit
def _exp_nonpositive(x):
    # e^x for x <= 0 in float64:
    # x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series, 2^n built from its bits
    # as 2^(n/2) 2^(n - n/2), so that results below 2^-1022 come out subnormal, as NumPy's.
    # Below -746 (e^x rounds to 0) x is taken as -746, and so is NaN (the caller puts it back).
    x = x if x > -746.0 else -746.0
    n = np.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    c = TAYLOR
    p = c[13] * r + c[12]
    for k in (11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1):
        p = p * r + c[k]
    half = np.int64(n) >> 1
    rest = np.int64(n) - half
    return (p * r + c[0]) * _double_from_bits((half + 1023) << 52) * _double_from_bits((rest + 1023) << 52)


@vector_jit
def sigmoid_vectorised(h):
    # Eq. (8) in place, from e^-|x| (no overflow), in h's dtype; NaN stays NaN.  The row
    # loop has no calls, so LLVM vectorises it (float32: 2.1x the float64 arithmetic).
    for r in range(h.shape[0]):
        _sigmoid_row(h[r])


@vector_jit
def _sigmoid_row(row):
    # sigmoid_vectorised on one row.
    if row.itemsize == 4:
        for c in range(row.shape[0]):
            x = row[c]
            e = _exp_nonpositive32(-abs(x))
            s = (ONE32 if x >= 0 else e) / (ONE32 + e)
            row[c] = s if x == x else x
    else:
        for c in range(row.shape[0]):
            x = row[c]
            e = _exp_nonpositive(-abs(x))
            s = (1.0 if x >= 0 else e) / (1.0 + e)
            row[c] = s if x == x else x


@vector_jit
def bias_act(h, r_lo, r_hi, c_lo, c_hi, b, act):
    # h = act(h + b) in place on the block [r_lo, r_hi) x [c_lo, c_hi) of the batch's h: the
    # bias (Eq. 4, its own rounding), then ReLU (Eq. 6), Sigmoid (Eq. 8) or nothing (LINEAR).
    # A row slice at a time: a C array's is contiguous, so its loop vectorises (a 2-D column
    # slice's would not).
    bias = b[c_lo:c_hi]
    for r in range(r_lo, r_hi):
        row = h[r, c_lo:c_hi]
        for c in range(row.shape[0]):
            t = row[c] + bias[c]
            row[c] = 0 if act == RELU and t <= 0 else t
        if act == SIGMOID:
            _sigmoid_row(row)


@vector_jit
def act_backward(g, h, r_lo, r_hi, c_lo, c_hi, act):
    # g = dL/d(pre-activation) from dL/dh in place on a block of the batch, as bias_act: the
    # ReLU mask (Eq. 7) or g h (1 - h) (Eq. 9, numpy_kernels.sigmoid_backward's arithmetic).
    one = h.dtype.type(1)
    for r in range(r_lo, r_hi):
        g_row, h_row = g[r, c_lo:c_hi], h[r, c_lo:c_hi]
        for c in range(g_row.shape[0]):
            if act == RELU:
                if not h_row[c] > 0:
                    g_row[c] = 0
            else:
                g_row[c] = g_row[c] * h_row[c] * (one - h_row[c])


@jit
def copy_row(src, dst):
    # dst[:] = src (cast to dst's dtype), as a plain loop: Numba's slice assignment first
    # checks whether the two overlap, which made the batch's gather 1.5x slower than
    # np.take (45 against 31 ms an epoch of 600 batches of 100 MNIST rows, one core).
    for c in range(dst.shape[0]):
        dst[c] = src[c]


@jit
def copy_rows(src, dst):
    # dst[:] = src for 2-D arrays, a row at a time (copy_row).
    for r in range(dst.shape[0]):
        copy_row(src[r], dst[r])


@jit
def _gather(x, y, idx, s, lo, hi, xb, yb):
    # The batch rows [lo, hi) of step s.
    batch = xb.shape[0]
    for r in range(lo, hi):
        row = idx[s * batch + r]
        copy_row(x[row], xb[r])
        yb[r] = y[row]


@jit
def _forward_columns(gemm, k, lo, hi, Ws, bs, hs, xb, act):
    # Layer k's outputs [lo, hi) for the whole batch: h = act(a @ W[:, lo:hi] + b[lo:hi]).
    a = xb if k == 0 else hs[k - 1]
    matmul(gemm, a, False, Ws[k][:, lo:hi], False, hs[k][:, lo:hi])
    bias_act(hs[k], 0, hs[k].shape[0], lo, hi, bs[k], act)


@jit
def _backward_columns(gemm, k, lo, hi, Ws, hs, gs, act):
    # Layer k - 1's output gradient [lo, hi) for the whole batch: (g @ W[lo:hi]^T) * act'(h).
    matmul(gemm, gs[k], False, Ws[k][lo:hi], True, gs[k - 1][:, lo:hi])
    act_backward(gs[k - 1], hs[k - 1], 0, gs[k - 1].shape[0], lo, hi, act)


@jit
def _rows(gemm, x, y, idx, s, lo, hi, Ws, bs, hs, gs, xb, yb, loss_code, act, row_loss, row_hit,
          whole_in, whole_out, first):
    # Phase one of step s for the batch rows [lo, hi): gather, forward, loss terms and
    # gradient, backward down to the first layer's output gradient.  From layer ``first``
    # on where the layers before it went by columns (their own phases, the gather's before
    # them), and backward down to layer first - 1's output gradient.  With ``whole_in`` (a
    # batch-sized array of this part's own), the last layer's product is the whole batch's,
    # this part's rows in it: where no cut keeps its bits (a part's product would take
    # another BLAS kernel), the whole product's rows do, and the rows of other parts
    # (stale values here) change nothing in ours.
    batch = xb.shape[0]
    last = len(Ws) - 1
    if first == 0:
        _gather(x, y, idx, s, lo, hi, xb, yb)
    a = xb[lo:hi] if first == 0 else hs[first - 1][lo:hi]
    for k in range(first, last + 1):
        h = hs[k][lo:hi]
        if k == last and whole_in.shape[0] > 0:
            copy_rows(a, whole_in[lo:hi])
            matmul(gemm, whole_in, False, Ws[k], False, whole_out)
            copy_rows(whole_out[lo:hi], h)
        else:
            matmul(gemm, a, False, Ws[k], False, h)
        bias_act(hs[k], lo, hi, 0, h.shape[1], bs[k], act if k < last else LINEAR)
        a = h
    out, g = hs[last], gs[last]
    if loss_code == SOFTMAX_XENT:
        for r in range(lo, hi):
            row_loss[r], row_hit[r] = softmax_xent_row(out, yb, g, r, batch)
    else:
        one = out.dtype.type(1)
        sigmoid(out[lo:hi])
        for r in range(lo, hi):
            row_loss[r], row_hit[r] = euclidean_row(out, yb, g, one, out.dtype.type(batch), r)
        sigmoid_backward(out[lo:hi], g[lo:hi], g[lo:hi], one)  # in place
    for k in range(last, max(first, 1) - 1, -1):
        matmul(gemm, gs[k][lo:hi], False, Ws[k], True, gs[k - 1][lo:hi])
        act_backward(gs[k - 1], hs[k - 1], lo, hi, 0, gs[k - 1].shape[1], act)


@jit
def _features(gemm, j, feature_bounds, column_bounds, xb, Ws, grad_Ws, grad_bs, hs, gs,
              params, grads, velocity, offsets, lr, momentum, weight_decay):
    # Phase two, part j: every layer's weight-gradient rows and bias-gradient columns of this
    # part, and their SGD update (nobody reads W once phase one is done).  The last layer
    # first: the first layer's W, the largest, is then the one still in cache when the next
    # step's first product reads it (~1% of a one-thread epoch of mlp2, measured).
    for k in range(len(Ws) - 1, -1, -1):
        fan_in, fan_out = Ws[k].shape
        f_lo, f_hi = feature_bounds[k, j], feature_bounds[k, j + 1]
        c_lo, c_hi = column_bounds[k, j], column_bounds[k, j + 1]
        a = xb if k == 0 else hs[k - 1]
        if f_hi > f_lo:  # a layer cut in fewer parts than the phase has none in the last ones
            matmul(gemm, a[:, f_lo:f_hi], True, gs[k], False, grad_Ws[k][f_lo:f_hi])
        column_sums(gs[k], grad_bs[k], c_lo, c_hi)
        w, b = offsets[k], offsets[k] + fan_in * fan_out  # layer k's W, then its b, in the flat buffers
        for lo, hi in ((w + f_lo * fan_out, w + f_hi * fan_out), (b + c_lo, b + c_hi)):
            sgd_step(params[lo:hi], grads[lo:hi], velocity[lo:hi], lr, momentum, weight_decay)


@jit
def _phases(row_parts, feature_parts, by_columns, column_parts):
    # A step's phases, in order: (kinds, layers, starts), starts[i] the tasks of the step
    # before phase i (and the step's total last).  With the first ``by_columns`` layers by
    # columns: the gather, their forward products, the rows (the rest of the forward, the
    # loss, the backward down to their last's output gradient), their backward products
    # (layer k: layer k - 1's output gradient), the features; else rows, then features.
    count = 2 if by_columns == 0 else 2 * by_columns + 2
    kinds, layers, starts = np.empty(count, np.int64), np.zeros(count, np.int64), np.zeros(count + 1, np.int64)
    i = 0
    if by_columns > 0:
        kinds[0], starts[1], i = GATHER, row_parts, 1
        for k in range(by_columns):
            kinds[i], layers[i], starts[i + 1], i = FORWARD, k, starts[i] + column_parts, i + 1
    kinds[i], layers[i], starts[i + 1], i = ROWS, by_columns, starts[i] + row_parts, i + 1
    for k in range(by_columns - 1, 0, -1):
        kinds[i], layers[i], starts[i + 1], i = BACKWARD, k, starts[i] + column_parts, i + 1
    kinds[i], starts[i + 1] = FEATURES, starts[i] + feature_parts
    return kinds, layers, starts


@jit
def steps(gemm, pause, x, y, idx, Ws, bs, grad_Ws, grad_bs, hs, gs, xb, yb, loss_code, act,
          params, grads, velocity, offsets, lr, momentum, weight_decay, losses, accs,
          row_loss, row_hit, row_bounds, feature_bounds, column_bounds, whole_ins, whole_outs,
          forward_columns, backward_columns, sync, generation, wait):
    """len(losses) SGD steps on consecutive batches of rows ``idx`` of (x, y), in tasks (P
    row parts, Q >= P feature parts, R column parts a step's phase) claimed through
    ``sync``; call it from each thread taking part, with the same arguments, and ``wait``
    True in the one that needs the result.
    pause: the address of the OS call a long wait makes (pause_address), 0 for none.
    Returns the number of tasks this call ran.

    Ws, bs, grad_Ws, grad_bs: views into the flat params and grads; layer k's W and b
    are params[offsets[k]:offsets[k + 1]].  act: the hidden layers' activation (RELU,
    SIGMOID).  hs[k]: layer k's output (after its activation),
    gs[k]: dL/d(layer k's pre-activation output); xb, yb: the batch; row_loss, row_hit:
    each row's loss term and hit.  Part j: the batch rows [row_bounds[j], row_bounds[j + 1]),
    layer k's input features [feature_bounds[k, j], feature_bounds[k, j + 1]) and its outputs
    as column_bounds[k] say (P + 1 row bounds, Q + 1 feature and column bounds a layer, 0
    first and the size last; a layer's feature parts past its last are empty).  whole_ins,
    whole_outs: (P, batch, n) arrays where part j computes the last layer's product whole
    (on whole_ins[j], into whole_outs[j]: see _rows), else (1, 0, 0).
    forward_columns: (C, R + 1) bounds of the outputs of the first C layers, which then go by
    columns in R parts a phase (_phases), and backward_columns: (C - 1, R + 1), of their
    output gradients; C = 0: none (the wide layers' split: compiled.py, COLUMNS_MIN_BYTES)."""
    batch = xb.shape[0]
    row_parts, feature_parts = row_bounds.shape[0] - 1, feature_bounds.shape[1] - 1
    by_columns = forward_columns.shape[0]
    kinds, layers, starts = _phases(row_parts, feature_parts, by_columns, forward_columns.shape[1] - 1)
    per_step = starts[-1]
    total = losses.shape[0] * per_step
    ran = 0
    while True:
        task = _claim(sync, generation, total)
        if task < 0:
            break
        ran += 1
        s, j = task // per_step, task % per_step
        phase = 0
        while starts[phase + 1] <= j:
            phase += 1
        j -= starts[phase]
        _wait_done(sync, s * per_step + starts[phase], pause)  # the previous phases' tasks
        kind, k = kinds[phase], layers[phase]
        if kind == GATHER:
            _gather(x, y, idx, s, row_bounds[j], row_bounds[j + 1], xb, yb)
        elif kind == FORWARD:
            _forward_columns(gemm, k, forward_columns[k, j], forward_columns[k, j + 1], Ws, bs, hs, xb, act)
        elif kind == BACKWARD:
            _backward_columns(gemm, k, backward_columns[k - 1, j], backward_columns[k - 1, j + 1], Ws, hs, gs, act)
        elif kind == ROWS:
            lo, hi = row_bounds[j], row_bounds[j + 1]
            w = j if whole_ins.shape[1] > 0 else 0  # (1, 0, 0): no whole product
            _rows(gemm, x, y, idx, s, lo, hi, Ws, bs, hs, gs, xb, yb, loss_code, act, row_loss, row_hit,
                  whole_ins[w], whole_outs[w], by_columns)
        else:
            _features(gemm, j, feature_bounds, column_bounds, xb, Ws, grad_Ws, grad_bs, hs, gs,
                      params, grads, velocity, offsets, lr, momentum, weight_decay)
            if j == 0:  # the mean loss and accuracy, the terms added in row order
                total_loss, hits = 0.0, 0
                for r in range(batch):
                    total_loss += row_loss[r]
                    hits += row_hit[r]
                losses[s] = total_loss / batch if loss_code == SOFTMAX_XENT else total_loss / (2 * batch)
                accs[s] = hits / batch
        _atomic_add(sync, DONE, 1)
    if wait:
        _wait_done(sync, total, pause)
    return ran


def exact_cut(gemm, dtype, size, products, multiple=4, columns=False):
    """Where to cut ``size`` rows of a product's output in two so that each half's product
    gives the same bits as the whole one, for every product (k, n, trans_a, trans_b) of
    ``size`` rows: the cut nearest the middle, among multiples of ``multiple`` in the middle
    half, or None.  BLAS kernels work in blocks of rows, so only some cuts keep the sums
    in the same order (OpenBLAS on AVX-512 here: multiples of 12); the order of a kernel's
    arithmetic does not depend on the data, so random data shows it.  With ``columns``:
    the output's ``size`` columns, of products (k, n, trans_a, trans_b) of n rows."""
    arrays = _trials(gemm, dtype, size, products, columns)
    middle = size // 2
    for cut in sorted(range(multiple, size, multiple), key=lambda c: abs(c - middle)):
        if not size // 4 <= cut <= size - size // 4:
            break
        if all(_halves_equal(gemm, cut, *arrays_k) for arrays_k in arrays):
            return cut
    return None


def _trials(gemm, dtype, size, products, columns=False):
    """(a, b, trans_a, trans_b, whole product, columns) on random data for each product (k,
    n, trans_a, trans_b) of ``size`` rows; with ``columns``, of ``size`` columns and n rows."""
    rng = np.random.default_rng(0)
    arrays = []
    for k, n, trans_a, trans_b in products:
        m, n = (n, size) if columns else (size, n)
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        whole = np.empty((m, n), dtype=dtype)
        matmul(gemm, a, trans_a, b, trans_b, whole)
        arrays.append((a, b, trans_a, trans_b, whole, columns))
    return arrays


def _halves_equal(gemm, cut, a, b, trans_a, trans_b, whole, columns):
    return _parts_equal(gemm, [0, cut, whole.shape[1 if columns else 0]], a, b, trans_a, trans_b, whole, columns)


def _parts_equal(gemm, bounds, a, b, trans_a, trans_b, whole, columns):
    parts = np.empty_like(whole)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if columns:  # the output's columns [lo, hi): op(b)'s
            matmul(gemm, a, trans_a, b[lo:hi] if trans_b else b[:, lo:hi], trans_b, parts[:, lo:hi])
        else:
            matmul(gemm, a[:, lo:hi] if trans_a else a[lo:hi], trans_a, b, trans_b, parts[lo:hi])
    return np.array_equal(parts, whole)


def exact_bounds(gemm, dtype, size, products, parts, multiple=4, columns=False):
    """[0, c_1, ..., size]: ``size`` rows cut in ``parts`` parts, each giving the bits of the
    whole product for every product (as exact_cut), or None.  Two parts: exact_cut's cut.
    More: each cut the nearest to its share (i size / parts), among multiples of
    ``multiple`` within half a share of it, that splits the whole exactly; then the parts
    checked together."""
    if parts == 1:
        return [0, size]
    if parts == 2:
        cut = exact_cut(gemm, dtype, size, products, multiple, columns)
        return None if cut is None else [0, cut, size]
    arrays = _trials(gemm, dtype, size, products, columns)
    share = size / parts
    bounds = [0]
    for i in range(1, parts):
        near = sorted(range(multiple, size, multiple), key=lambda c: abs(c - i * share))
        cut = next((c for c in near if abs(c - i * share) <= share / 2 and c > bounds[-1]
                    and all(_halves_equal(gemm, c, *arrays_k) for arrays_k in arrays)), None)
        if cut is None:
            return None
        bounds.append(cut)
    bounds.append(size)
    return bounds if all(_parts_equal(gemm, bounds, *arrays_k) for arrays_k in arrays) else None


class MLPSteps:
    """``steps`` bound to a Gemm (find_gemm) for one dtype: call it with steps' other
    arguments; ``cut(size, products)`` and ``bounds(size, products, parts)`` are exact_cut
    and exact_bounds for that gemm.  LOSS_CODES and
    ACTIVATION_CODES: the ``loss_code`` and ``act`` of each network it compiles, by name."""

    LOSS_CODES = {"softmax_xent": SOFTMAX_XENT, "sigmoid_euclidean": SIGMOID_EUCLIDEAN}
    ACTIVATION_CODES = {"relu": RELU, "sigmoid": SIGMOID}

    def __init__(self, gemm, dtype):
        self.source = gemm  # the Gemm, for what the run records
        self.gemm, self.dtype = gemm.arg, np.dtype(dtype)
        self.pause = pause_address()

    def __call__(self, *args):
        return steps(self.gemm, self.pause, *args)

    def cut(self, size, products):
        return exact_cut(self.gemm, self.dtype, size, products)

    def bounds(self, size, products, parts, columns=False):
        return exact_bounds(self.gemm, self.dtype, size, products, parts, columns=columns)


def mlp_steps(dtype):
    """(the compiled training step for ``dtype``, bound to the gemm find_gemm finds, None),
    or (None, why there is none)."""
    if numba is None:
        return None, "Numba is not installed"
    gemm, why = find_gemm(dtype)
    return (None, why) if gemm is None else (MLPSteps(gemm, dtype), None)


def compiled_before():
    """Whether Numba's disk cache holds the compiled step and the fused kernels already (else
    the first step compiles them: ~10 s).  True where it cannot tell (Numba's cache layout
    is its own: read through its private attributes, guarded)."""
    from .numpy_kernels import sgd_step as kernel
    try:
        return all(os.path.exists(fn._cache._cache_file._index_path) for fn in (steps, kernel))
    except AttributeError:
        return True
