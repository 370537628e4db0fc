"""Which GEMM the compiled step calls (numpy_step.find_gemm), on any BLAS: NumPy's own
(LP64 or ILP64, as OpenBLAS, MKL and Accelerate name it), else one xpmlp can load (the
scipy-openblas32 wheel: an LP64 OpenBLAS), else none, and then one line saying which
step training takes instead; config.json records the step either way."""
import ctypes
import importlib.util
import json

import numpy as np
import pytest
from helpers import real_mnist_dir
from threadpoolctl import threadpool_info, threadpool_limits

import xpmlp
from xpmlp import cli
from xpmlp.config import TrainConfig
from xpmlp.data import load_mnist
from xpmlp.training import compiled
from xpmlp.training.train import Trainer

pytestmark = pytest.mark.skipif(xpmlp.get_backend("numpy").kernels is None,
                                reason="needs Numba (the [fast] extra; CI installs it)")
numpy_step = pytest.importorskip("xpmlp.backends.numpy_step")


@pytest.fixture
def fresh_notices(monkeypatch):
    """compiled.py says each notice once per process: as if this were a new one."""
    monkeypatch.setattr(compiled, "_said", set())


def test_numpys_own_gemm_is_found_with_its_integer_width():
    gemm, why = numpy_step.find_gemm(np.float32)
    assert why is None and gemm.numpys and "sgemm" in gemm.symbol
    blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
    assert gemm.ilp64 == ("USE64BITINT" in blas.get("openblas configuration", "")), blas


C_FUNCTION = ctypes.CDLL(None)["abs"]  # a real one, before the tests replace ctypes.CDLL


class FakeLibrary:
    """A shared library exporting ``names`` (each a real C function, for ctypes.cast) and,
    with ``config``, an OpenBLAS config string."""

    def __init__(self, names, config=None):
        self.names, self.config = names, config

    def __getitem__(self, name):
        if name in ("openblas_get_config", "scipy_openblas_get_config") and self.config is not None:
            return lambda: self.config
        if name not in self.names:
            raise AttributeError(name)
        return C_FUNCTION


@pytest.mark.parametrize("path, names, config, env, symbol, ilp64", [
    ("libscipy_openblas64_.so", ["scipy_cblas_sgemm64_"], None, "", "scipy_cblas_sgemm64_", True),
    ("libscipy_openblas.so", ["scipy_cblas_sgemm"], None, "", "scipy_cblas_sgemm", False),
    ("libopenblas64_.so", ["cblas_sgemm64_", "cblas_sgemm"], None, "", "cblas_sgemm64_", True),
    ("Accelerate", ["cblas_sgemm", "cblas_sgemm$NEWLAPACK", "cblas_sgemm$NEWLAPACK$ILP64"], None, "",
     "cblas_sgemm$NEWLAPACK$ILP64", True),
    ("Accelerate", ["cblas_sgemm", "cblas_sgemm$NEWLAPACK"], None, "", "cblas_sgemm$NEWLAPACK", False),
    ("libmkl_rt.so.2", ["cblas_sgemm", "cblas_sgemm_64"], None, "", "cblas_sgemm_64", True),
    ("libmkl_rt.so.2", ["cblas_sgemm"], None, "", "cblas_sgemm", False),
    ("libmkl_rt.so.2", ["cblas_sgemm"], None, "ILP64", "cblas_sgemm", True),
    ("libopenblas.so.0", ["cblas_sgemm"], b"OpenBLAS 0.3.21 DYNAMIC_ARCH", "", "cblas_sgemm", False),
    ("libopenblas.so.0", ["cblas_sgemm"], b"OpenBLAS 0.3.21 USE64BITINT DYNAMIC_ARCH", "", "cblas_sgemm", True),
    ("libblas.so.3", ["cblas_sgemm"], None, "", "cblas_sgemm", False),  # reference CBLAS
    ("libnothing.so", ["sgemm_"], None, "", None, None),  # Fortran BLAS alone: no CBLAS to call
])
def test_gemm_names_and_integer_widths_of_each_blas(monkeypatch, path, names, config, env, symbol, ilp64):
    monkeypatch.setattr(numpy_step.ctypes, "CDLL", lambda p: FakeLibrary(names, config))
    monkeypatch.setenv("MKL_INTERFACE_LAYER", env)
    gemm = numpy_step._gemm_in(path, "s", numpys=True)
    assert (gemm and gemm.symbol, gemm and gemm.ilp64) == (symbol, ilp64)


def test_numpys_own_blas_comes_before_other_loaded_ones(monkeypatch):
    import threadpoolctl

    package = numpy_step.os.path.dirname(np.__file__)
    site = numpy_step.os.path.dirname(package)
    others = [f"{site}/scipy_openblas32/lib/libscipy_openblas.so", f"{site}/torch/lib/libmkl.so"]  # not NumPy's
    own = f"{package}.libs/libscipy_openblas64_.so"
    monkeypatch.setattr(threadpoolctl, "threadpool_info",
                        lambda: [{"user_api": "blas", "filepath": p} for p in others + [own]] + [
                            {"user_api": "openmp", "filepath": "/lib/libgomp.so"}])
    assert numpy_step.numpys_blas() == [own] + others
    # NumPy built on Accelerate (its macOS wheels): that first, though threadpoolctl lists it not
    monkeypatch.setitem(np.__config__.CONFIG["Build Dependencies"]["blas"], "name", "accelerate")
    accelerate = "/System/Library/Frameworks/Accelerate.framework/Accelerate"
    monkeypatch.setattr(numpy_step.ctypes.util, "find_library", lambda name: {"Accelerate": accelerate}.get(name))
    assert numpy_step.numpys_blas() == [accelerate, own] + others


def epoch_one(tmp_path, name, data):
    """(summary, config.json) of one epoch of mlp1-relu-sce on the real MNIST."""
    run = tmp_path / name
    run.mkdir()
    config = TrainConfig(model="mlp1-relu-sce", epochs=1, device="numpy").validate()
    trainer = Trainer(config, run, data, progress=False, log=lambda line: None)
    trainer.write_config()
    trainer.run()
    return json.loads((run / "summary.json").read_text()), json.loads((run / "config.json").read_text())


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(real_mnist_dir(), progress=False)


def test_an_lp64_openblas_as_the_gemm_source_trains_as_the_array_path(tmp_path, monkeypatch, capfd, mnist,
                                                                      fresh_notices):
    if importlib.util.find_spec("scipy_openblas32") is None:  # not imported here: that loads its library
        pytest.skip("needs scipy-openblas32 (the [test] extra)")
    monkeypatch.setattr(numpy_step, "numpys_blas", lambda: [])  # NumPy's BLAS offers no GEMM we can call
    # A thread limit entered before the library is loaded (conftest starts every BLAS on one)
    with threadpool_limits(limits=2, user_api="blas"):
        gemm, _ = numpy_step.find_gemm(np.float32)
        threads = {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()}
    assert (gemm.symbol, gemm.ilp64, gemm.numpys) == ("scipy_cblas_sgemm", False, False)
    assert "scipy_openblas32" in gemm.library
    assert threads[gemm.library] == 2  # follows NumPy's
    threadpool_limits(limits=1, user_api="blas")  # back to conftest's one thread, for the runs below
    got, config = epoch_one(tmp_path, "lp64", mnist)
    assert (config["step"], config["step_gemm"]) == ("compiled", "scipy_cblas_sgemm of libscipy_openblas.so")
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("xpmlp: the compiled step calls scipy_cblas_sgemm of libscipy_openblas.so")

    monkeypatch.setattr(numpy_step, "reachable_blas", lambda: [])  # and none at all: the array path
    want, config = epoch_one(tmp_path, "array", mnist)
    assert config["step"] == "fused ops"
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key  # float32 rounding over 600 steps
    assert got["test_acc"] > 0.9  # it trained


def test_without_a_gemm_training_says_which_step_in_one_line_and_records_it(tmp_path, monkeypatch, capsys,
                                                                          fresh_notices):
    monkeypatch.setattr(numpy_step, "numpys_blas", lambda: ["libblas.so.3"])
    monkeypatch.setattr(numpy_step, "reachable_blas", lambda: [])
    monkeypatch.setenv("XPMLP_DATA_DIR", str(real_mnist_dir()))
    run = tmp_path / "run"
    code = cli.main(["train", "--model", "mlp0-sce", "--batch-size", "600", "--epochs", "1", "--device", "cpu",
                     "--quiet", "--out", str(run)])
    assert code == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["xpmlp: no compiled step: no CBLAS sgemm in NumPy's BLAS (libblas.so.3) nor in one xpmlp can "
                     "load (pip install scipy-openblas32 gives one); training takes the fused ops' step "
                     "(up to 1.6x slower)"], lines
    assert json.loads((run / "config.json").read_text())["step"] == "fused ops"


def test_the_default_run_records_the_compiled_step_and_its_gemm(tmp_path, mnist):
    _, config = epoch_one(tmp_path, "run", mnist)
    gemm, _ = numpy_step.find_gemm(np.float32)
    assert (config["step"], config["step_gemm"]) == ("compiled", str(gemm))


def test_without_numba_training_says_which_step(monkeypatch, capsys, fresh_notices):
    backend = xpmlp.get_backend("numpy")
    backend._kernels = None  # as without Numba
    model = xpmlp.build_model("mlp1-relu-sce", backend=backend)
    assert compiled.compiled_steps(model) is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("xpmlp: Numba is not installed, so training takes the buffered ops' step")
