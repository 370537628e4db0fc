"""`xpmlp bench`: what it measures and reports, on a shrunken workload.  No timing is
asserted here (that is the benchmark's job); only that every contender ran and that the
reported numbers are consistent with one another."""
import json
import math

import numpy as np
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
       (["--busy", "-1"], ["--busy", "non-negative"]), (["--threads", "two"], ["--threads", "two"]), (["--dtype", "float16"], ["--dtype"])]


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


def test_busy_processes_run_during_the_block_and_are_ended_after_it(monkeypatch):
    started = []
    real_popen = bench.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    with pytest.raises(RuntimeError):  # ended on the way out, also when the block fails
        with bench.busy_processes(2):
            assert len(started) == 2 and all(p.poll() is None for p in started)
            raise RuntimeError
    assert all(p.poll() is not None for p in started)


def test_busy_times_every_contender_again_under_load(small):
    r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, threads=1, busy=1)
    assert r["busy_processes"] == 1
    assert set(r["busy"]) >= {"ours", "gemm", "gather", "sgd"}
    assert r["ratio_busy"] == pytest.approx(r["busy"]["ours"] / r["epoch_s"])
    assert "busy process" in bench.format_table(r)


def test_pin_runs_everyone_on_one_core_with_one_thread_and_unpins_after(small):
    before = bench.os.sched_getaffinity(0)
    r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, pin=True)
    assert r["pinned_core"] in before and r["threads"] == 1 and r["peer_threads"] == 1
    assert f"pinned to core {r['pinned_core']}" in bench.format_table(r)
    assert bench.os.sched_getaffinity(0) == before


def test_without_a_pin_or_threads_ours_follow_the_policy_and_peers_their_default(small, monkeypatch):
    monkeypatch.setenv("XPMLP_THREADS", "2")
    r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False)
    assert (r["threads"], r["peer_threads"], r["pinned_core"]) == (2, None, None)


def test_the_compiled_step_and_the_array_path_are_both_timed(small):
    pytest.importorskip("numba")  # the [fast] extra; CI installs it
    r = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, threads=1)
    assert r["compiled_step"] and r["array_path_epoch_s"] > 0
    no_kernels = bench.run(device="cpu", epochs=1, torch_peer=False, jax_peer=False, threads=1, kernels=False)
    assert not no_kernels["compiled_step"]  # the buffered ops have no compiled step: one path
    assert no_kernels["array_path_epoch_s"] is None


@pytest.mark.parametrize("error, equal", [(0.0, True), (1e-3, False)])
def test_jax_check_compares_its_first_losses_with_ours_from_the_same_weights(small, monkeypatch, error, equal):
    """JAX itself is in the [peers] extra, not in CI: a stand-in with JAX's interface receives
    what JAX would (our initial weights, our first permutation) and answers with the losses
    our own array path gives for them, off by ``error``."""
    from xpmlp import bench_jax

    calls = []

    def fake_jax_epoch(weights, x_host, y_host, batch, lr, momentum, weight_decay):
        model = bench.build_model(bench.MODEL, backend="numpy", seed=0)
        for layer, (W, b) in zip([l for l in model.layers if hasattr(l, "W")], weights):
            np.testing.assert_array_equal(layer.W, W)  # our initial weights
        stepper = bench.Stepper(model, bench.SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay))
        losses = np.zeros(bench.N_TRAIN // batch, dtype=np.float32)

        def run(perm):
            calls.append(perm)
            for i in range(losses.size):
                stepper.step(x_host, y_host, perm[i * batch:(i + 1) * batch], losses, losses.copy(), i)
            return losses * (1 + error), losses

        return run, "stand-in"

    monkeypatch.setattr(bench_jax, "jax_epoch", fake_jax_epoch)
    r = bench.run(device="cpu", epochs=1, torch_peer=False, threads=1)
    np.testing.assert_array_equal(calls[0], np.random.default_rng(0).permutation(bench.N_TRAIN))
    assert r["jax_check"]["losses_equal"] is equal, r["jax_check"]
    assert r["jax_check"]["max_rel_diff"] == pytest.approx(error, rel=1e-3, abs=1e-7)
    assert r["jax_epoch_s"] > 0 and r["ratio_jax"] == pytest.approx(r["epoch_s"] / r["jax_epoch_s"])
    assert r["versions"]["jax"] == "stand-in"
    assert "JAX's first" in bench.format_table(r)


def test_the_pause_before_each_timed_epoch_is_short_on_a_gpu(monkeypatch):
    """The CPU contenders' thread pools need 0.5 s to wind down; a GPU's need none, and the
    one-shot GPU check's stacked bench must fit its cap: the pause given is the one slept."""
    import types
    assert bench.settle_s(types.SimpleNamespace(name="cupy")) == bench.CUDA_SETTLE_S < 0.1
    assert bench.settle_s(types.SimpleNamespace(name="numpy")) == bench.SETTLE_S
    slept = []
    monkeypatch.setattr(bench.time, "sleep", slept.append)
    bench._time_interleaved({"a": (lambda: None, lambda: None)}, epochs=3, settle=bench.CUDA_SETTLE_S)
    assert slept == [bench.CUDA_SETTLE_S] * 3
