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
       (["--threads", "1,x"], ["--threads"]), (["--threads", "2,2"], ["each thread count once"]),
       (["--hidden", "64"], ["--hidden needs --loss"]), (["--loss", "mse"], ["go with --hidden"]),
       (["--model", "mlp2-relu-sce", "--hidden", "64", "--activation", "relu", "--loss", "sce"], ["either --model"]),
       (["--model", "mlp9"], ["unknown model"]), (["--batch-size", "0"], ["--batch-size", "positive"]),
       (["--threads", "1,2", "--pin"], ["no --pin"]), (["--stack", "3", "--batch-size", "10"], ["--stack times"]),
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

    def fake_jax_epoch(weights, x_host, y_host, batch, lr, momentum, weight_decay, **network):
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


@pytest.mark.parametrize("net, name, widths, activation, loss", [
    (dict(model="mlp1-sigmoid-mse", batch_size=10), "mlp1-sigmoid-mse", [784, 256, 10], "sigmoid", "mse"),
    (dict(hidden=[37, 19], activation="sigmoid", loss="sce", batch_size=23), "mlp37-19-sigmoid-sce",
     [784, 37, 19, 10], "sigmoid", "sce"),
    (dict(model="mlp0-sce", batch_size=50), "mlp0-sce", [784, 10], "relu", "sce"),
])
def test_the_network_and_batch_asked_for_are_the_ones_timed(small, net, name, widths, activation, loss):
    """Ours (the compiled step and the array step) and PyTorch get the network asked for and
    its batch; the result names them."""
    pytest.importorskip("numba")
    shapes = []
    real = bench.bench_torch

    def torch_spy(backend, model, *args, **kwargs):
        shapes.append(([layer.W.shape for layer in model.layers if hasattr(layer, "W")], kwargs.get("batch")))
        return "spied"

    bench.bench_torch = torch_spy
    try:
        r = bench.run(device="cpu", epochs=1, threads=1, jax_peer=False, net=bench.workload(**net))
    finally:
        bench.bench_torch = real
    assert (r["model"], r["batch_size"]) == (name, net["batch_size"])
    assert r["network"] == {"widths": widths, "activation": activation, "loss": loss}
    assert shapes == [(list(zip(widths[:-1], widths[1:])), net["batch_size"])]
    assert r["compiled_step"] and r["array_path_epoch_s"] > 0 and r["torch_note"] == "spied"
    assert name in bench.format_table(r)


def test_torch_trains_the_same_sigmoid_euclidean_network(small):
    """PyTorch configured as ours: from our weights on one batch, the same first loss."""
    torch = pytest.importorskip("torch")
    net = bench.workload("mlp2-sigmoid-mse", batch_size=10)
    backend = bench.get_backend("cpu")
    model = net.build(backend)
    x_host, y_host = bench._host_data()
    run_epoch, _, _ = bench.bench_torch(backend, model, x_host, y_host, 1, batch=10)
    seen = []
    real_loss = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        seen.append(float(self.detach()))
        return real_loss(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        run_epoch()
    finally:
        torch.Tensor.backward = real_loss
    rows = torch.randperm(bench.N_TRAIN, generator=torch.Generator().manual_seed(0)).numpy()[:10]
    want = model.loss.forward(model.forward(x_host[rows]), y_host[rows])
    assert len(seen) == bench.N_TRAIN // 10 and seen[0] == pytest.approx(float(want), rel=1e-5)


def test_our_epoch_is_the_trainers_with_its_records(small):
    """Ours runs EpochLoop's epoch: the records of every --log-every steps go to a run
    directory; the step loop and the records are reported apart."""
    seen = []
    real = bench._BenchLoop._write_epoch

    def spy(self, k, iter_records, record):
        seen.append((len(iter_records), record["kind"], self.stepper.__class__.__name__))
        return real(self, k, iter_records, record)

    bench._BenchLoop._write_epoch = spy
    try:
        r = bench.run(device="cpu", epochs=2, threads=1, torch_peer=False, jax_peer=False,
                      net=bench.workload(log_every=3))
    finally:
        bench._BenchLoop._write_epoch = real
    iters = bench.N_TRAIN // bench.BATCH
    assert {n for n, _, _ in seen} == {len(range(0, iters, 3))} and {k for _, k, _ in seen} == {"epoch"}
    assert {s for _, _, s in seen} >= {"CompiledStepper", "Stepper"}  # ours, and the array step in the same loop
    assert r["log_every"] == 3 and r["step_loop_s"] > 0 and r["records_s"] >= 0
    assert r["records_share"] == pytest.approx(r["records_s"] / (r["step_loop_s"] + r["records_s"]))
    assert "the records (one every 3 steps)" in bench.format_table(r)


def test_a_scaling_table_runs_one_child_per_count_on_as_many_cores(monkeypatch):
    calls = []
    monkeypatch.setattr(bench.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})

    def runner(argv, cores):
        calls.append((argv, cores))
        n = len(calls)  # the rows' work halves each time
        return {"model": "m", "batch_size": 10, "dtype": "float32", "epoch_s": 2.0 ** -n, "jax_epoch_s": 0.5,
                "torch_epoch_s": None, "ratio_jax": 2.0 ** -n / 0.5, "peer_threads": None}

    r = bench.scaling([1, 2, 4, 8], ["--model", "m"], runner)
    assert [cores for _, cores in calls] == [{0}, {0, 1}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    # one core is --pin's row (one thread each); more, everyone's defaults on those cores
    assert [argv for argv, _ in calls] == [["--model", "m", "--threads", "1"]] + [["--model", "m"]] * 3
    assert r["thread_counts"] == [1, 2, 4, 8] and [row["cores"] for row in r["scaling"]] == [1, 2, 4, 4]
    assert [row["thread_count"] for row in r["scaling"]] == [1, 2, 4, 8]
    assert r["speedup"] == pytest.approx([1, 2, 4, 8])
    table = bench.format_scaling(r).splitlines()
    assert len(table) == 2 + 4 and table[-1].split()[:2] == ["8", "4"]


def test_the_scaling_table_from_the_command_line(tmp_path):
    """Two real child benches (a small network, one epoch each): the JSON holds a row each."""
    code, out, err = xpmlp("bench", "--device", "cpu", "--no-torch", "--no-jax", "--epochs", "1", "--hidden", "16",
                           "--activation", "sigmoid", "--loss", "mse", "--batch-size", "1000", "--threads", "1,2", "--json", cwd=tmp_path)
    assert code == 0, err
    r = json.loads(out)
    assert [row["peer_threads"] for row in r["scaling"]] == [1, None] and len(r["speedup"]) == 2
    assert [row["step_threads"] for row in r["scaling"]] == [1, 2] and r["scaling"][1]["threads"] == 1
    assert {row["model"] for row in r["scaling"]} == {"mlp16-sigmoid-mse"}


def test_no_kernels_on_a_backend_without_buffers_is_one_line(capsys):
    """The buffered ops need out= buffers (NumPy, CuPy); array-api-strict and torch run the
    plain ops only: one line, not the ValueError's traceback from inside the bench."""
    from xpmlp.cli import main
    assert main(["bench", "--device", "array-api-strict", "--no-kernels", "--no-torch", "--no-jax"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xpmlp: error: --no-kernels") and len(err.splitlines()) == 1, err
