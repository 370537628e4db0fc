"""Stacked models: K models over a leading axis train exactly what K separate models train.

The model and optimizer against separate ones on every backend and path, step by step;
the group trainer against separate runs (run directories, divergence, Ctrl-C and resume)
on a small synthetic MNIST; and on the real MNIST, float64 to 1e-9 and float32 to 0.1 point.
"""
import json
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_tree_allclose, host, run_on
from test_train import interrupt_after

from xpmlp import SGD, build_model
from xpmlp.training.stack import StackTrainer
from xpmlp.training.train import TrainConfig, Trainer, evaluate

N, STEPS = 16, 5
# Three models with their own seeds, init stds and optimizer settings.
SEEDS, STDS = [0, 3, 7], [0.01, 0.1, 0.05]
LRS, MOMENTA, DECAYS = [0.1, 0.01, 0.3], [0.9, 0.0, 0.5], [5e-4, 0.0, 1e-3]
NAMES = pytest.mark.parametrize("name", ["mlp0-mse", "mlp1-sigmoid-mse", "mlp2-relu-sce"])


def make_batches(shape, seed=30):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        x = np.where(rng.random(shape + (N, 784)) < 0.25, rng.random(shape + (N, 784)), 0.0)
        out.append((x, rng.integers(0, 10, size=shape + (N,))))
    return out


def train_steps(name, batches, *, stacked, ops, dtype="float64", model_index=None, freeze=None):
    """``fn(backend)``: STEPS SGD steps of the three models stacked (``stacked``) or of model
    ``model_index`` alone; returns losses, accuracies and final weights and velocities."""
    def fn(backend):
        if stacked:
            model = build_model(name, backend=backend, dtype=dtype, seed=SEEDS, init_std=STDS,
                                stack=(3,), ops=ops)
            opt = SGD(model, lr=LRS, momentum=MOMENTA, weight_decay=DECAYS)
        else:
            k = model_index
            model = build_model(name, backend=backend, dtype=dtype, seed=SEEDS[k], init_std=STDS[k], ops=ops)
            opt = SGD(model, lr=LRS[k], momentum=MOMENTA[k], weight_decay=DECAYS[k])
        dt = backend.dtype(dtype)
        result = {"losses": [], "accs": []}
        for step, (x, labels) in enumerate(batches):
            if freeze is not None and step == freeze[1]:
                opt.freeze(freeze[0])
            loss, acc = model.loss.forward_with_accuracy(model.forward(backend.asarray(x, dtype=dt)),
                                                         backend.asarray(labels))
            result["losses"].append(host(backend, loss))
            result["accs"].append(host(backend, acc))
            model.backward(model.loss.backward())
            opt.step()
        result["params"] = [host(backend, a) for a in model.state_arrays()]
        result["velocity"] = [host(backend, v) for v in opt.state()]
        return result
    return fn


def model_slice(result, k):
    """Model k's part of a stacked result, in the one-model shapes (b: (1, out) -> (out,))."""
    def cut(arrays):
        return [a[k].reshape(-1) if a[k].shape[0] == 1 else a[k] for a in arrays]
    return {"losses": [v[k] for v in result["losses"]], "accs": [v[k] for v in result["accs"]],
            "params": cut(result["params"]), "velocity": cut(result["velocity"])}


def test_stacked_weights_are_each_seeds_own():
    stacked = build_model("mlp2-relu-sce", dtype="float64", seed=SEEDS, init_std=STDS, stack=(3,))
    for k in range(3):
        alone = build_model("mlp2-relu-sce", dtype="float64", seed=SEEDS[k], init_std=STDS[k])
        for a, b in zip(stacked.state_arrays(), alone.state_arrays()):
            np.testing.assert_array_equal(a[k].reshape(b.shape), b)
    with pytest.raises(ValueError, match="one seed per stacked model"):
        build_model("mlp0-sce", seed=[0, 1], stack=(3,))


@NAMES
@pytest.mark.parametrize("shuffle", ["own", "shared"])
def test_stacked_models_train_as_separate_models(backend, ops, name, shuffle):
    """Per-model batches (3, N, 784), or one batch (N, 784) all models share."""
    batches = make_batches((3,) if shuffle == "own" else ())
    stacked = run_on(backend, train_steps(name, batches, stacked=True, ops=ops))
    assert np.shape(stacked["losses"][0]) == (3,)
    for k in range(3):
        own = [(x[k], y[k]) for x, y in batches] if shuffle == "own" else batches
        alone = run_on("numpy", train_steps(name, own, stacked=False, ops="plain", model_index=k))
        assert_tree_allclose(model_slice(stacked, k), alone, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_stacked_fast_path_is_bit_identical_to_separate_fast_models(dtype):
    """On NumPy's fast path each model's slice goes through the same kernels and GEMMs as
    the model alone does: the same bits, in both precisions."""
    name, batches = "mlp2-relu-sce", make_batches(())
    stacked = run_on("numpy", train_steps(name, batches, stacked=True, ops="fused", dtype=dtype))
    for k in range(3):
        alone = run_on("numpy", train_steps(name, batches, stacked=False, ops="fused", dtype=dtype, model_index=k))
        for a, b in zip(*(list(_flat(r)) for r in (model_slice(stacked, k), alone))):
            np.testing.assert_array_equal(a, b)


def _flat(result):
    for key in ("losses", "accs", "params", "velocity"):
        yield from result[key]


def test_frozen_model_keeps_its_weights_and_the_others_are_unaffected(backend, ops):
    batches = make_batches(())
    frozen = run_on(backend, train_steps("mlp1-relu-sce", batches, stacked=True, ops=ops, freeze=(1, 2)))
    free = run_on(backend, train_steps("mlp1-relu-sce", batches[:2], stacked=True, ops=ops))
    running = run_on(backend, train_steps("mlp1-relu-sce", batches, stacked=True, ops=ops))
    for a, b in zip(model_slice(frozen, 1)["params"], model_slice(free, 1)["params"]):
        np.testing.assert_array_equal(a, b)  # not moved after freeze(1) before step 2
    for k in (0, 2):
        for a, b in zip(_flat(model_slice(frozen, k)), _flat(model_slice(running, k))):
            np.testing.assert_array_equal(a, b)


def test_evaluate_stacked_equals_each_model_alone():
    rng = np.random.default_rng(5)
    x, y = rng.random((2500, 784)), rng.integers(0, 10, 2500)
    stacked = build_model("mlp1-relu-mse", dtype="float64", seed=SEEDS, init_std=STDS, stack=(3,))
    losses, accs = evaluate(stacked, x, y)
    for k in range(3):
        alone = build_model("mlp1-relu-mse", dtype="float64", seed=SEEDS[k], init_std=STDS[k])
        assert (losses[k], accs[k]) == evaluate(alone, x, y)


# ---------------------------------------------------------------- the group trainer

# The single runs' small synthetic MNIST (a fixture), its batch and its iterations an epoch.
from test_train import BATCH, ITERS, synthetic  # noqa: E402,F401


def configs(per_model, **shared):
    settings = dict(model="mlp1-relu-sce", epochs=3, batch_size=BATCH, device="numpy")
    settings.update(shared)
    return [TrainConfig(**dict(settings, **p)).validate() for p in per_model]


def run_single(cfg, run_dir, data):
    run_dir.mkdir(parents=True)
    t = Trainer(cfg, run_dir, data, progress=False, log=lambda line: None)
    t.write_config()
    t.run()


def stack_trainer(cfgs, root, data, **kwargs):
    t = StackTrainer(cfgs, [root / f"m{k}" for k in range(len(cfgs))], data, root / "group",
                     progress=False, log=lambda line: None, **kwargs)
    if not kwargs.get("resume"):
        t.write_config()
    return t


def record(run_dir):
    """A run's record with wall-clock times left out, and the versions of the libraries its
    process had imported (CuPy, once a test in the same process imported it): metrics,
    summary, config, checkpoint arrays and state."""
    run_dir = Path(run_dir)
    metrics = [{k: v for k, v in json.loads(line).items() if k != "train_time_s"}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in json.loads((run_dir / "summary.json").read_text()).items() if k != "train_time_s"}
    config = {k: v for k, v in json.loads((run_dir / "config.json").read_text()).items() if k != "versions"}
    with np.load(run_dir / "checkpoint.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if k != "state"}
        state = json.loads(npz["state"].tobytes().decode())
    state.pop("train_time_s")
    return metrics, summary, config, arrays, state


def assert_same_record(a, b):
    ma, sa, ca, aa, sta = record(a)
    mb, sb, cb, ab, stb = record(b)
    assert ma == mb and sa == sb and ca == cb and sta == stb
    assert aa.keys() == ab.keys()
    for key in aa:
        np.testing.assert_array_equal(aa[key], ab[key], err_msg=key)


@pytest.mark.parametrize("seeds", [[0, 0, 0], [0, 5, 9]], ids=["shared-shuffle", "own-shuffles"])
def test_group_leaves_the_run_directories_of_separate_runs(tmp_path, synthetic, seeds):
    per_model = [dict(lr=lr, momentum=m, weight_decay=wd, seed=s, init_std=std)
                 for lr, m, wd, s, std in zip(LRS, MOMENTA, DECAYS, seeds, STDS)]
    cfgs = configs(per_model)
    stack_trainer(cfgs, tmp_path / "stack", synthetic).run()
    for k, cfg in enumerate(cfgs):
        run_single(cfg, tmp_path / f"single{k}", synthetic)
        assert_same_record(tmp_path / "stack" / f"m{k}", tmp_path / f"single{k}")
    assert (tmp_path / "stack" / "group" / "stack-checkpoint.npz").is_file()


def test_a_diverging_model_is_recorded_as_its_run_and_the_others_go_on(tmp_path, synthetic):
    cfgs = configs([dict(lr=0.05), dict(lr=1e6), dict(lr=0.01, seed=4)], epochs=4)
    with np.errstate(all="ignore"):
        stack_trainer(cfgs, tmp_path / "stack", synthetic).run()
        for k, cfg in enumerate(cfgs):
            run_single(cfg, tmp_path / f"single{k}", synthetic)
    statuses = [json.loads((tmp_path / "stack" / f"m{k}" / "summary.json").read_text())["status"]
                for k in range(3)]
    assert statuses == ["completed", "diverged", "completed"]
    for k in range(3):
        assert_same_record(tmp_path / "stack" / f"m{k}", tmp_path / f"single{k}")


@pytest.mark.parametrize("steps", [ITERS + 3, ITERS, 4], ids=["mid-epoch-2", "end-of-epoch-1", "mid-epoch-1"])
def test_interrupted_group_resumes_identically(tmp_path, synthetic, monkeypatch, steps):
    cfgs = configs([dict(lr=0.05), dict(lr=0.1, seed=2), dict(lr=0.01, seed=4)])
    stack_trainer(cfgs, tmp_path / "straight", synthetic).run()
    t = stack_trainer(cfgs, tmp_path / "cut", synthetic)
    count = interrupt_after(monkeypatch, t, steps)  # the single run's Ctrl-C, from test_train
    t.run()
    assert count[0] == steps
    for k in range(3):
        summary = json.loads((tmp_path / "cut" / f"m{k}" / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["epochs_completed"] == steps // ITERS
    monkeypatch.undo()
    stack_trainer(cfgs, tmp_path / "cut", synthetic, resume=True).run()
    for k in range(3):
        assert_same_record(tmp_path / "cut" / f"m{k}", tmp_path / "straight" / f"m{k}")


# ---------------------------------------------------------------- the real MNIST

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_group_matches_separate_runs_on_real_mnist(tmp_path, dtype):
    """2 epochs: float64 losses to 1e-9 relative and the same accuracies; float32 test
    accuracies within 0.1 point (on NumPy they are the same bits: see above)."""
    from helpers import real_mnist_dir

    from xpmlp.data import load_mnist
    data = load_mnist(real_mnist_dir(), download=False, progress=False)
    cfgs = configs([dict(lr=0.1), dict(lr=0.01, momentum=0.5, seed=1), dict(lr=0.05, weight_decay=0.0)],
                   epochs=2, dtype=dtype)
    stack_trainer(cfgs, tmp_path / "stack", data).run()
    for k, cfg in enumerate(cfgs):
        run_single(cfg, tmp_path / f"single{k}", data)
        got = json.loads((tmp_path / "stack" / f"m{k}" / "summary.json").read_text())
        want = json.loads((tmp_path / f"single{k}" / "summary.json").read_text())
        assert got["status"] == want["status"] == "completed"
        if dtype == "float64":
            for key in ("train_loss", "test_loss"):
                assert got[key] == pytest.approx(want[key], rel=1e-9, abs=0)
            assert (got["train_acc"], got["test_acc"]) == (want["train_acc"], want["test_acc"])
        else:
            assert abs(got["test_acc"] - want["test_acc"]) <= 0.001


# ---------------------------------------------------------------- the command line

def test_train_seeds_writes_a_run_per_seed_and_an_aggregate(tmp_path):
    from test_cli import FAST, xpmlp
    rc, out, err = xpmlp("train", *FAST, "--epochs", "1", "--seeds", "0,3", "--quiet", "--out", "seeds",
                         cwd=tmp_path)
    assert rc == 0, err
    root = tmp_path / "seeds"
    runs = [json.loads((root / f"seed={s}" / "summary.json").read_text()) for s in (0, 3)]
    assert [r["status"] for r in runs] == ["completed", "completed"]
    assert [json.loads((root / f"seed={s}" / "config.json").read_text())["seed"] for s in (0, 3)] == [0, 3]
    agg = json.loads((root / "summary.json").read_text())
    accs = [r["test_acc"] for r in runs]
    assert agg["seeds"] == [0, 3] and agg["status"] == ["completed", "completed"]
    assert agg["runs"] == ["seed=0", "seed=3"]  # relative to the summary, not to where it was run
    assert agg["test_acc"]["mean"] == pytest.approx(np.mean(accs))
    assert agg["test_acc"]["std"] == pytest.approx(np.std(accs))
    assert (agg["test_acc"]["min"], agg["test_acc"]["max"]) == (min(accs), max(accs))
    assert accs[0] != accs[1], "two seeds, two different runs"
    rc, out, err = xpmlp("eval", root / "seed=3", "--json", cwd=tmp_path)
    assert rc == 0 and json.loads(out)["test_acc"] == runs[1]["test_acc"]


@pytest.mark.parametrize("seeds, needle", [("0-4,3", "given twice"), ("4-1", "low-high"), ("x", "like 0-4"),
                                           ("0-99", "at most 64"), ("1,,2", "like 0-4"), ("-3", "like 0-4")])
def test_malformed_seed_lists(tmp_path, seeds, needle):
    from test_cli import FAST, assert_no_result, assert_user_error, xpmlp
    assert_user_error(xpmlp("train", *FAST, f"--seeds={seeds}", "--out", "x", cwd=tmp_path), "--seeds", needle)
    assert_no_result(tmp_path / "x", tmp_path)


def test_seeds_with_seed_is_a_user_error(tmp_path):
    from test_cli import FAST, assert_user_error, xpmlp
    assert_user_error(xpmlp("train", *FAST, "--seeds", "0-1", "--seed", "3", "--out", "x", cwd=tmp_path),
                      "--seed")


# ---------------------------------------------------------------- --seeds: one writer, interrupt and resume

def seeds_record(root, seeds):
    """Each seed's run record, and the aggregate summary less its times."""
    agg = json.loads((root / "summary.json").read_text())
    agg.pop("train_time_s")
    return [record(root / f"seed={s}") for s in seeds], {k: v for k, v in agg.items() if k != "runs"}


def assert_same_seeds(a, b, seeds):
    for s in seeds:
        assert_same_record(a / f"seed={s}", b / f"seed={s}")
    assert seeds_record(a, seeds)[1] == seeds_record(b, seeds)[1]


@pytest.fixture(scope="module")
def straight_seeds(tmp_path_factory):
    from test_cli import FAST, xpmlp
    cwd = tmp_path_factory.mktemp("seeds")
    rc, _, err = xpmlp("train", *FAST, "--epochs", "4", "--seeds", "0-2", "--quiet", "--out", "straight", cwd=cwd)
    assert rc == 0, err
    return cwd / "straight"


@pytest.mark.parametrize("held", [".", "seed=1"], ids=["group", "member"])
@pytest.mark.parametrize("resume", [False, True], ids=["out", "resume"])
def test_seeds_of_a_directory_another_process_holds_is_one_line(tmp_path, straight_seeds, held, resume):
    import shutil

    from test_cli import FAST, assert_user_error, snapshot, xpmlp
    from test_faults import held_by_another_process
    out = tmp_path / "seeds"
    if resume:
        shutil.copytree(straight_seeds, out)
        args = ("--resume", "seeds")
    else:
        (out / held).mkdir(parents=True, exist_ok=True)
        args = (*FAST, "--epochs", "1", "--seeds", "0-2", "--out", "seeds")
    before = snapshot(out)
    with held_by_another_process(out / held) as holder:
        assert_user_error(xpmlp("train", *args, cwd=tmp_path), f"in use by another process (pid {holder.pid})")
    assert snapshot(out) == before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_seeds_say_how_to_resume_and_resume_identically(tmp_path, straight_seeds, sig):
    import subprocess
    import sys
    import time

    from test_cli import FAST, env, xpmlp

    from xpmlp.rundir import (
        resume_command,  # the command that works where it is printed
    )
    proc = subprocess.Popen([sys.executable, "-m", "xpmlp", "train", *FAST, "--epochs", "4", "--seeds", "0-2",
                             "--quiet", "--out", "cut"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "cut" / "stack-checkpoint.npz").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))  # in epoch 2
    _, err = proc.communicate(timeout=120)
    if sig == "SIGKILL":
        assert proc.returncode == -9
    else:
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == f"xpmlp: interrupted; continue the group with: {resume_command('cut')}"
        statuses = json.loads((tmp_path / "cut" / "summary.json").read_text())["status"]
        assert statuses == ["interrupted"] * 3
    rc, _, err = xpmlp("train", "--resume", "cut", "--quiet", cwd=tmp_path)
    assert rc == 0, err
    assert_same_seeds(tmp_path / "cut", straight_seeds, [0, 1, 2])


def test_a_full_disk_at_a_group_checkpoint_is_one_line_and_the_group_resumes(tmp_path, straight_seeds, capsys,
                                                                             monkeypatch):
    """The group's 2nd checkpoint (after epoch 2) meets a full disk halfway through: one line
    naming it, the epoch-1 checkpoint intact, and once there is room again the group
    resumes and ends as if never stopped."""
    import errno

    from helpers import real_mnist_dir
    from test_cli import FAST
    from test_faults import assert_one_line_error, no_temp_files, xpmlp_main

    from xpmlp.training.stack import group_state
    monkeypatch.setenv("XPMLP_DATA_DIR", str(real_mnist_dir()))
    savez, calls, out = np.savez, [0], tmp_path / "cut"

    def savez_on_a_full_disk(file, **arrays):
        if b"member_status" in arrays.get("state", np.zeros(0, np.uint8)).tobytes():  # the group's
            calls[0] += 1
            if calls[0] == 2:
                file.write(b"PK\x03\x04" + b"\0" * 5000)
                raise OSError(errno.ENOSPC, "No space left on device")
        return savez(file, **arrays)

    with monkeypatch.context() as patch:
        patch.setattr(np, "savez", savez_on_a_full_disk)
        assert_one_line_error(xpmlp_main(capsys, "train", *FAST, "--epochs", "4", "--seeds", "0-2", "--quiet",
                                         "--out", out),
                              f"{out / 'stack-checkpoint.npz'}: no space left on device", "needs about", "free")
    assert group_state(out)["epoch"] == 1 and no_temp_files(out) == []
    code, _, err = xpmlp_main(capsys, "train", "--resume", out, "--quiet")
    assert code == 0, err
    assert_same_seeds(out, straight_seeds, [0, 1, 2])


def test_resuming_one_member_of_a_group_is_refused_and_changes_nothing(tmp_path, straight_seeds):
    """Until it finishes, a member has no checkpoint of its own (the group's holds it):
    resumed alone it would have been cleared and retrained; it is refused with the command
    that resumes its group."""
    import shutil

    from test_cli import assert_user_error, snapshot, xpmlp
    shutil.copytree(straight_seeds, tmp_path / "seeds")
    (tmp_path / "seeds" / "seed=1" / "checkpoint.npz").unlink()  # as while the group trains
    before = snapshot(tmp_path / "seeds")
    assert_user_error(xpmlp("train", "--resume", "seeds/seed=1", cwd=tmp_path),
                      "trains in the stacked group seeds, whose checkpoint it shares; "
                      "resume the group: xpmlp train --resume seeds")
    assert snapshot(tmp_path / "seeds") == before


def test_resuming_one_member_of_a_sweeps_group_is_refused(tmp_path):
    from test_cli import assert_user_error, xpmlp

    from xpmlp.training.stack import group_of
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "b").mkdir()
    group = tmp_path / "out" / ".stacks" / "g"
    group.mkdir(parents=True)
    (group / "stack.json").write_text(json.dumps({"members": ["../../a"]}))
    assert group_of(tmp_path / "out" / "a") == group and group_of(tmp_path / "out" / "b") is None
    assert_user_error(xpmlp("train", "--resume", "out/a", cwd=tmp_path),
                      "trains in the stacked group out/.stacks/g", "run the same `xpmlp sweep ... --stack` again")


def test_seeds_stopped_before_their_first_checkpoint_start_again(tmp_path, straight_seeds):
    """A group killed before its first checkpoint: --resume (or the same --out) starts it
    again from scratch, saying so, whatever records it had begun."""
    from test_cli import FAST, xpmlp

    from xpmlp.training.stack import group_configs
    configs, _ = group_configs(straight_seeds)
    out = tmp_path / "seeds"
    t = StackTrainer(configs, [out / f"seed={c.seed}" for c in configs], None, out, progress=False)
    t.write_config()
    (out / "seed=1" / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')  # a record of the killed start
    rc, said, err = xpmlp("train", "--resume", "seeds", cwd=tmp_path)
    assert rc == 0, err
    assert "no group checkpoint yet (stopped before its first one); starting it again from scratch" in said
    assert_same_seeds(out, straight_seeds, [0, 1, 2])
    rc, _, err = xpmlp("train", *FAST, "--epochs", "4", "--seeds", "0-2", "--out", "seeds", cwd=tmp_path)
    assert rc == 2 and "already holds a run; resume it with --resume seeds" in err


# ---------------------------------------------------------------- sweep --stack

STACK_GRID = """
out = "{out}"
[defaults]
model = "mlp0-sce"
epochs = 3
batch_size = 600
device = "cpu"
[grid]
lr = [0.01, 0.1, 1e6]
seed = [0, 1]
"""


def sweep_process(root, *extra):
    import os
    import subprocess
    import sys

    from helpers import real_mnist_dir
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()), PYTHONWARNINGS="ignore",
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "xpmlp", "sweep", "grid.toml", "--stack", *extra], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def stack_root(tmp_path, name):
    root = tmp_path / name
    root.mkdir()
    (root / "grid.toml").write_text(STACK_GRID.replace("{out}", "runs"))
    return root


def finish(proc):
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def member_dirs(root):
    return sorted(p for p in (root / "runs").iterdir() if p.name != ".stacks")


@pytest.fixture(scope="module")
def straight_sweep(tmp_path_factory):
    root = stack_root(tmp_path_factory.mktemp("straight"), "sweep")
    code, out = finish(sweep_process(root, "--max-stack", "4"))
    assert code == 0, out
    return root, out


def test_sweep_stack_groups_points_and_leaves_run_directories(straight_sweep, tmp_path):
    root, out = straight_sweep
    assert out.count("stack  ") == 2, out  # 6 points, at most 4 a group
    assert "sweep: 6 of 6 runs finished" in out
    runs = member_dirs(root)
    assert len(runs) == 6
    statuses = {p.name: json.loads((p / "summary.json").read_text())["status"] for p in runs}
    assert sorted(statuses.values()) == ["completed"] * 4 + ["diverged"] * 2, statuses
    # each member is the run its separate `xpmlp train` makes
    from test_cli import xpmlp
    for run in runs[:2] + [r for r in runs if statuses[r.name] == "diverged"][:1]:
        cfg = json.loads((run / "config.json").read_text())
        rc, _, err = xpmlp("train", "--model", "mlp0-sce", "--batch-size", "600", "--device", "cpu", "--epochs", "3",
                           "--lr", cfg["lr"], "--seed", cfg["seed"], "--out", tmp_path / run.name, "--quiet",
                           cwd=tmp_path)
        assert rc == 0, err
        assert_same_record(run, tmp_path / run.name)
    # a rerun finds everything done and touches nothing
    before = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*")}
    code, out = finish(sweep_process(root, "--max-stack", "4"))
    assert code == 0 and "6 already done" in out and "stack  " not in out, out
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("*")} == before


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_sweep_stack_interrupted_then_rerun_ends_identical(straight_sweep, tmp_path, sig):
    import os
    import time
    root = stack_root(tmp_path, "cut")
    proc = sweep_process(root, "--max-stack", "4")
    deadline = time.monotonic() + 300
    # stop the first group once it has checkpointed an epoch, in the middle of the next one
    while not list((root / "runs").glob(".stacks/*/stack-checkpoint.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(proc.pid, getattr(signal, sig))
    code, out = finish(proc)
    assert code == (-9 if sig == "SIGKILL" else 130), out
    code, out = finish(sweep_process(root, "--max-stack", "4"))
    assert code == 0, out
    assert "(resume)" in out, out
    straight = member_dirs(straight_sweep[0])
    assert [p.name for p in member_dirs(root)] == [p.name for p in straight]
    for got, want in zip(member_dirs(root), straight):
        assert_same_record(got, want)


def test_sweep_stack_loads_mnist_once(tmp_path, monkeypatch, capsys):
    from helpers import real_mnist_dir

    from xpmlp import data as data_module
    from xpmlp.sweep import run_sweep
    calls = []
    real_load = data_module.load_mnist

    def counting_load(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(data_module, "load_mnist", counting_load)
    (tmp_path / "grid.toml").write_text(STACK_GRID.replace("{out}", str(tmp_path / "runs"))
                                        .replace("epochs = 3", "epochs = 1").replace("lr = [0.01, 0.1, 1e6]", "lr = [0.1]")
                                        .replace("seed = [0, 1]", "batch_size = [600, 1000]"))
    with np.errstate(all="ignore"):
        assert run_sweep([str(tmp_path / "grid.toml")], stack=True, data_dir=str(real_mnist_dir())) == 0
    out = capsys.readouterr().out
    assert out.count("stack  ") == 2 and len(calls) == 1, out


@pytest.mark.parametrize("cores, want", [(1, 1), (None, None)])
def test_a_group_given_one_core_steps_on_one_thread(tmp_path, monkeypatch, capsys, cores, want):
    """A Ray task's CPUs cap a stacked group's threads, as run_env caps a run's."""
    from helpers import real_mnist_dir

    from xpmlp.sweep import load_grid, run_stack_group
    from xpmlp.training import loop
    asked = []
    real = loop.make_stepper

    def recording(model, optimizer, *args, threads=None, **kwargs):
        asked.append(threads)
        return real(model, optimizer, *args, threads=threads, **kwargs)

    monkeypatch.setattr(loop, "make_stepper", recording)
    grid = tmp_path / "grid.toml"
    grid.write_text(STACK_GRID.replace("{out}", str(tmp_path / "runs")).replace("epochs = 3", "epochs = 1")
                    .replace("lr = [0.01, 0.1, 1e6]", "lr = [0.1]").replace("seed = [0, 1]", "seed = [0]"))
    members = [(tmp_path / "runs" / name, dict(s, data_dir=str(real_mnist_dir()))) for name, s in load_grid(grid)[0]]
    assert run_stack_group(tmp_path / "group", members, "new", cores=cores) == "done"
    assert asked == [want]


def test_a_sweeps_group_resumed_on_other_data_fails_in_one_line_and_changes_nothing(tmp_path, capsys):
    """As `train --resume`: a stacked group of a sweep resumes only on the data its runs
    trained on (their shapes and SHA-256), not on other data at the same path."""
    from test_cli import snapshot

    from xpmlp.sweep import load_grid, run_stack_group, units
    data = tmp_path / "mine.npz"

    def write(seed):
        rng = np.random.default_rng(seed)
        np.savez(data, x_train=rng.random((300, 20), dtype=np.float32), y_train=rng.integers(0, 3, 300),
                 x_test=rng.random((60, 20), dtype=np.float32), y_test=rng.integers(0, 3, 60))

    write(0)
    grid = tmp_path / "grid.toml"
    grid.write_text(STACK_GRID.replace("{out}", str(tmp_path / "runs")).replace("epochs = 3", "epochs = 1")
                    .replace("batch_size = 600", "batch_size = 100").replace("lr = [0.01, 0.1, 1e6]", "lr = [0.1]"))
    members = [(tmp_path / "runs" / name, dict(s, data=str(data))) for name, s in load_grid(grid)[0]]
    assert run_stack_group(tmp_path / "group", members, "new") == "done"
    write(1)  # other data where the runs' was
    units._LOADED.clear()  # as a new sweep process, which reads the data again
    before = snapshot(tmp_path / "runs")
    assert run_stack_group(tmp_path / "group", members, "resume") == "failed"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 1 and "the run was trained on mine (300+60 samples of 20 features" in lines[0], lines
    assert snapshot(tmp_path / "runs") == before
    write(0)  # its own data again: it resumes
    units._LOADED.clear()
    assert run_stack_group(tmp_path / "group", members, "resume") == "done"


def test_sweep_stack_skips_what_another_process_holds(tmp_path, capsys):
    """A held run is left out of its group, and a held group (another sweep trains it) is
    skipped whole, touching nothing; the sweep says so and exits 1."""
    from helpers import real_mnist_dir
    from test_cli import snapshot
    from test_faults import held_by_another_process

    from xpmlp.sweep import load_grid, run_stack_group, run_sweep
    grid = tmp_path / "grid.toml"
    grid.write_text(STACK_GRID.replace("{out}", str(tmp_path / "runs")).replace("epochs = 3", "epochs = 1")
                    .replace("lr = [0.01, 0.1, 1e6]", "lr = [0.1]"))
    held, other = (tmp_path / "runs" / name for name, _ in load_grid(grid)[0])
    held.mkdir(parents=True)
    with held_by_another_process(held) as holder:
        assert run_sweep([str(grid)], stack=True, data_dir=str(real_mnist_dir())) == 1
        out = capsys.readouterr().out
        assert f"skip   {held}: in use by process {holder.pid}" in out and "skipped 1 in use" in out, out
        assert json.loads((other / "summary.json").read_text())["status"] == "completed"
        assert not (held / "config.json").exists()
        before = snapshot(tmp_path / "runs")
        settings = dict(load_grid(grid)[0][0][1], data_dir=str(real_mnist_dir()))
        assert run_stack_group(tmp_path / "group", [(held, settings)], "new") == "busy"
        assert f"in use by another process (pid {holder.pid})" in capsys.readouterr().out
        assert snapshot(tmp_path / "runs") == before


# ---------------------------------------------------------------- bench --stack

def test_bench_stack_reports_model_epochs_and_their_ratio(monkeypatch):
    from xpmlp import bench
    monkeypatch.setattr(bench, "N_TRAIN", 1000)
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    epochs = []
    real = bench.step_loop

    def step_loop(stepper, x, y, perm, batch, *args):
        epochs.append((stepper.model.stack, perm.ndim, real(stepper, x, y, perm, batch, *args)))
        return epochs[-1][-1]

    monkeypatch.setattr(bench, "step_loop", step_loop)
    r = bench.run(device="cpu", epochs=3, threads=1, stack=5)
    # a warm-up and three timed epochs of 10 steps, the stacked models sharing one shuffle
    assert [e for e in epochs if e[0] == (5,)] == [((5,), 1, 10)] * 4
    assert r["stack"] == 5
    assert r["step_threads"] == r["stacked_step_threads"] == 1  # the same threads for both sides
    assert r["stacked_model_epochs_per_s"] == pytest.approx(5 / r["stacked_epoch_s"])
    assert r["single_model_epochs_per_s"] == pytest.approx(1 / r["epoch_s"])
    assert r["ratio_stack"] == pytest.approx(r["stacked_model_epochs_per_s"] / r["single_model_epochs_per_s"])
    assert r["ratio_wide"] == pytest.approx(r["first_layer_batched_epoch_s"] / r["first_layer_wide_epoch_s"])
    assert r["peak_rss_mb"] > 0
    json.dumps(r)
    assert "ratio_stack" in bench.format_stack(r)


def test_bench_stack_needs_three_timed_epochs(tmp_path):
    from test_cli import assert_user_error, xpmlp
    assert_user_error(xpmlp("bench", "--device", "cpu", "--stack", "4", "--epochs", "2", cwd=tmp_path),
                      "--epochs 2", "at least 3")
    assert_user_error(xpmlp("bench", "--device", "cpu", "--stack", "0", cwd=tmp_path), "--stack")


@pytest.mark.gpu
def test_group_on_cupy_matches_the_group_on_numpy(tmp_path, synthetic):
    from helpers import backend_or_reason
    found = backend_or_reason("cupy")
    if isinstance(found, str):
        pytest.skip(f"cupy: {found}")
    per_model = [dict(lr=0.05), dict(lr=0.1, seed=2), dict(lr=1e6)]
    with np.errstate(all="ignore"):
        stack_trainer(configs(per_model, dtype="float64"), tmp_path / "numpy", synthetic).run()
        stack_trainer(configs(per_model, dtype="float64", device="cuda"), tmp_path / "cupy", synthetic).run()
    for k in range(3):
        got, want = (json.loads((tmp_path / dev / f"m{k}" / "summary.json").read_text()) for dev in ("cupy", "numpy"))
        assert got["status"] == want["status"]
        for key in ("train_loss", "test_loss", "test_acc"):
            assert (got[key] is None) if want[key] is None else got[key] == pytest.approx(want[key], rel=1e-9)
