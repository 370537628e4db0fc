"""`xpmlp bench`: what it measures and reports, on a shrunken workload.  No timing is
asserted here (that is the benchmark's job); only that every contender ran and that the
reported numbers are consistent with one another."""
import json
import math

import pytest
from test_cli import assert_user_error, xpmlp

from xpmlp import bench


@pytest.fixture
def small(monkeypatch):
    """Ten steps an epoch instead of 600 and no settling pause: the same code, in seconds."""
    monkeypatch.setattr(bench, "N_TRAIN", 1000)
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)


def test_every_contender_runs_and_the_ratios_are_their_quotients(small):
    pytest.importorskip("torch")  # the [oracle] extra; CI installs it
    r = bench.run(device="cpu", epochs=2, threads=1)
    for key in ("epoch_s", "torch_epoch_s", "gemm_limit_epoch_s", "gather_epoch_s", "sgd_epoch_s"):
        assert r[key] > 0 and math.isfinite(r[key]), key
    assert r["ratio_torch"] == pytest.approx(r["epoch_s"] / r["torch_epoch_s"])
    assert r["ratio_limit"] == pytest.approx(r["epoch_s"] / r["gemm_limit_epoch_s"])
    assert r["floor_epoch_s"] == pytest.approx(r["gemm_limit_epoch_s"] + r["gather_epoch_s"] + r["sgd_epoch_s"])
    assert r["ratio_floor"] == pytest.approx(r["epoch_s"] / r["floor_epoch_s"])
    assert r["peak_rss_mb"] > 0
    assert (r["backend"], r["device"], r["dtype"], r["threads"]) == ("numpy", "cpu", "float32", 1)
    assert {"numpy", "torch", "xpmlp"} <= set(r["versions"])
    json.dumps(r)  # --json prints it as it is
    table = bench.format_table(r)
    for row in ("xpmlp", "PyTorch eager", "GEMM limit", "gather", "SGD step", "floor", "ratio_torch"):
        assert row in table, row


def test_without_torch_the_peer_is_absent_not_an_error(small):
    r = bench.run(device="cpu", epochs=1, torch_peer=False, threads=1)
    assert r["torch_epoch_s"] is None and r["ratio_torch"] is None
    assert "n/a" in bench.format_table(r)


def test_no_kernels_times_the_buffered_ops_and_the_default_the_fused_ones(small, monkeypatch):
    pytest.importorskip("numba")  # the [fast] extra; CI installs it
    seen = []
    real = bench.Stepper.step

    def step(self, *args):
        seen.append(self.model.ops.name)
        return real(self, *args)

    monkeypatch.setattr(bench.Stepper, "step", step)
    r = bench.run(device="cpu", epochs=1, torch_peer=False, threads=1, kernels=False)
    assert (r["ops"], r["fused_kernels"]) == ("buffered", False) and set(seen) == {"buffered"}
    seen.clear()
    r = bench.run(device="cpu", epochs=1, torch_peer=False, threads=1)
    assert (r["ops"], r["fused_kernels"]) == ("fused", True) and set(seen) == {"fused"}


def test_interleaving_times_each_contender_every_round(small):
    calls = []
    contenders = {name: (lambda name=name: calls.append(name), lambda: None) for name in "abc"}
    medians = bench._time_interleaved(contenders, epochs=4)
    # a warm-up each, then one epoch of each per round, the order rotating
    assert "".join(calls) == "abc" + "abc" + "bca" + "cab" + "abc"
    assert set(medians) == set("abc")
    calls.clear()
    bench._time_interleaved(contenders, epochs=1, warmed=("b",))
    assert "".join(calls) == "ac" + "abc"  # b's warm-up was done by the caller


BAD = [(["--epochs", "0"], ["--epochs", "positive"]), (["--threads", "0"], ["--threads", "positive"]),
       (["--threads", "two"], ["--threads", "two"]), (["--dtype", "float16"], ["--dtype"])]


@pytest.mark.parametrize("args, needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_bench_flags(tmp_path, args, needles):
    assert_user_error(xpmlp("bench", "--device", "cpu", "--no-torch", *args, cwd=tmp_path), *needles)


@pytest.mark.parametrize("failure", ["not installed", "broken install", "no CUDA"])
def test_pytorch_that_cannot_run_on_the_device_is_left_out_with_the_reason(small, monkeypatch, failure):
    """A GPU machine may have torch without CUDA, or a torch whose import fails with more than
    ImportError: the bench leaves PyTorch out and says why instead of crashing."""
    import sys
    import types
    if failure == "not installed":
        monkeypatch.setitem(sys.modules, "torch", None)  # ``import torch`` raises ImportError
    elif failure == "broken install":
        class Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise OSError("libcudart.so.12: cannot open shared object file")
        monkeypatch.delitem(sys.modules, "torch", raising=False)
        monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    else:
        cpu_only = types.SimpleNamespace(__version__="2.13.0+cpu", version=types.SimpleNamespace(cuda=None),
                                         cuda=types.SimpleNamespace(is_available=lambda: False))
        monkeypatch.setitem(sys.modules, "torch", cpu_only)
    torch, why = bench.torch_for("cuda")
    assert torch is None
    assert {"not installed": "cannot be imported", "broken install": "OSError: libcudart",
            "no CUDA": "has no usable CUDA"}[failure] in why
    if failure != "no CUDA":  # on the CPU the whole bench runs without the peer
        r = bench.run(device="cpu", epochs=1, threads=1)
        assert r["torch_epoch_s"] is None and r["ratio_torch"] is None and r["torch_note"] == why
        assert why in bench.format_table(r)
