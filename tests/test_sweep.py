"""Sweeps: grids from TOML, run names, and restartable runs of `python -m xpmlp train`
subprocesses on the real MNIST (mlp0-sce at batch 600: a fraction of a second per epoch)."""
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import real_mnist_dir

from xpmlp.config import TrainConfig, TrainError
from xpmlp.sweep import LocalExecutor, load_grid, run_name, run_state, run_sweep

GRID = """
out = "{out}"
[defaults]
model = "mlp0-sce"
epochs = 2
batch_size = 600
device = "cpu"
[grid]
lr = [0.01, 1e6]
"""
GOOD = run_name({"model": "mlp0-sce", "epochs": 2, "batch_size": 600, "lr": 0.01})
BAD = run_name({"model": "mlp0-sce", "epochs": 2, "batch_size": 600, "lr": 1e6})


@pytest.fixture
def sweep_env(tmp_path, monkeypatch):
    """The sweep's subprocesses start in tmp_path (never the repository root, whose xpmlp/
    would shadow the installed package), quietly, on one BLAS thread each."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XPMLP_DATA_DIR", str(real_mnist_dir()))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")  # the diverging run's overflow warnings
    return tmp_path


def write_config(directory, text=GRID, name="grid.toml", out="runs"):
    path = Path(directory) / name
    path.write_text(text.replace("{out}", Path(directory, out).as_posix()))
    return path


def sweep(config, capsys, jobs=2, **kwargs):
    kwargs.setdefault("executor", LocalExecutor(jobs))
    kwargs.setdefault("data_dir", str(real_mnist_dir()))
    code = run_sweep([str(config)], **kwargs)
    out = capsys.readouterr().out
    return code, out


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """The grid run once, to copy from: (root with grid.toml and runs/, exit status, stdout)."""
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("sweep")
    config = write_config(root)
    env = dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()), PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "xpmlp", "sweep", str(config), "--jobs", "2"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return root, p.returncode, p.stdout + p.stderr


def copy_of(finished_sweep, tmp_path):
    root, code, _ = finished_sweep
    assert code == 0
    shutil.copytree(root / "runs", tmp_path / "runs")
    return write_config(tmp_path), tmp_path / "runs"


# ---------------------------------------------------------------- running a grid

def test_sweep_runs_every_point(finished_sweep):
    root, code, out = finished_sweep
    assert code == 0, out
    assert "sweep: 2 runs, 0 already done, 0 to resume" in out
    assert "2 of 2 runs finished" in out and "FAILED" not in out and "Traceback" not in out
    runs = root / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted([GOOD, BAD])
    good, bad = summary(runs / GOOD), summary(runs / BAD)
    assert good["status"] == "completed" and good["epochs_completed"] == 2 and good["test_acc"] > 0.8
    assert bad["status"] == "diverged" and bad["train_loss"] is None  # diverging is a result, not a failure
    for run in (GOOD, BAD):
        config = json.loads((runs / run / "config.json").read_text())
        assert config["batch_size"] == 600 and config["model"] == "mlp0-sce"
        assert (runs / run / "train.log").read_text().count("training mlp0-sce") == 1


def test_rerun_skips_finished_runs(finished_sweep, sweep_env, capsys):
    config, runs = copy_of(finished_sweep, sweep_env)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in runs.rglob("*")}
    code, out = sweep(config, capsys)
    assert code == 0
    assert "sweep: 2 runs, 2 already done, 0 to resume" in out
    assert "start" not in out
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in runs.rglob("*")}
    assert after == before, "a finished run was touched"


def test_rerun_resumes_an_interrupted_run(finished_sweep, sweep_env, capsys):
    config, runs = copy_of(finished_sweep, sweep_env)
    run = runs / GOOD
    # as left by Ctrl-C after epoch 1: summary "interrupted", the checkpoint at epoch 1
    straight_metrics = (run / "metrics.jsonl").read_text().splitlines()
    s = summary(run)
    s.update(status="interrupted", epochs_completed=1)
    (run / "summary.json").write_text(json.dumps(s))
    config_json = json.loads((run / "config.json").read_text())
    _cut_to_epoch_one(run, config_json)
    (run / "marker").write_text("a restart from scratch would delete this")
    assert run_state(run) == "resume"

    code, out = sweep(config, capsys)
    assert code == 0, out
    assert "sweep: 2 runs, 1 already done, 1 to resume" in out
    assert f"start  {run} (resume)" in out
    assert (run / "marker").exists(), "the interrupted run was started over, not resumed"
    s = summary(run)
    assert s["status"] == "completed" and s["epochs_completed"] == 2
    assert (run / "train.log").read_text().count("training mlp0-sce") == 2
    # The same records as the straight run; approximately, since the epoch-1 checkpoint was
    # made in this process, whose BLAS may use another number of threads than the sweep's.
    got = [json.loads(m) for m in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(m) for m in straight_metrics]
    assert [(r["kind"], r["epoch"], r["iter"]) for r in got] == [(r["kind"], r["epoch"], r["iter"]) for r in want]
    for g, w in zip(got, want):
        for key in set(w) - {"kind", "epoch", "iter", "train_time_s"}:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g, w)


def _cut_to_epoch_one(run, config_json):
    """Replace the run's final checkpoint with the one it wrote after epoch 1, by training
    epoch 1 again in-process (bit-identical: tested in test_train.py)."""
    import tempfile

    from xpmlp.data import load_mnist
    from xpmlp.training.train import Trainer
    fields = {k: v for k, v in config_json.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**dict(fields, model="mlp0-sce", epochs=1, device="numpy"))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(cfg, tmp, load_mnist(real_mnist_dir(), download=False, progress=False),
                progress=False, log=lambda s: None).run()
        shutil.copy(Path(tmp) / "checkpoint.npz", run / "checkpoint.npz")
        (run / "metrics.jsonl").write_text((Path(tmp) / "metrics.jsonl").read_text())


def test_quick_trial_then_full_sweep_extends(sweep_env, capsys):
    """`--epochs 1` for a quick look, then the real sweep: the runs are extended to the
    grid's 2 epochs, not taken as done."""
    config = write_config(sweep_env)
    code, out = sweep(config, capsys, epochs=1)
    assert code == 0, out
    runs = sweep_env / "runs"
    assert summary(runs / GOOD)["epochs_completed"] == 1
    assert summary(runs / BAD)["status"] == "diverged"

    code, out = sweep(config, capsys)
    assert code == 0, out
    assert "sweep: 2 runs, 1 already done, 1 to resume" in out  # diverged is done at any length
    s = summary(runs / GOOD)
    assert s["status"] == "completed" and s["epochs_completed"] == 2
    assert json.loads((runs / GOOD / "config.json").read_text())["epochs"] == 2


def test_a_failing_run_is_reported_and_the_others_finish(finished_sweep, sweep_env, capsys):
    config, runs = copy_of(finished_sweep, sweep_env)
    broken = runs / GOOD
    (broken / "summary.json").unlink()  # killed before its summary: resumed from the checkpoint...
    data = (broken / "checkpoint.npz").read_bytes()
    (broken / "checkpoint.npz").write_bytes(data[: len(data) // 2])  # ...which is corrupt
    shutil.rmtree(runs / BAD)  # must still run, and finish
    code, out = sweep(config, capsys)
    assert code == 1
    assert f"FAILED {broken}" in out and "1 of 2 runs finished" in out
    assert str(broken) in out.splitlines()[-1]
    assert summary(runs / BAD)["status"] == "diverged"
    log = (broken / "train.log").read_text()
    assert "unreadable checkpoint" in log and "Traceback" not in log
    assert not (broken / "summary.json").exists()


def test_dry_run_lists_without_running(sweep_env, capsys):
    config = write_config(sweep_env)
    code, out = sweep(config, capsys, dry_run=True)
    assert code == 0
    assert "sweep: 2 runs, 0 already done, 0 to resume" in out
    assert sum(line.startswith("  new") for line in out.splitlines()) == 2
    assert not (sweep_env / "runs").exists()


# ---------------------------------------------------------------- grids and names

def test_run_name():
    assert run_name({"model": "mlp2-relu-sce"}) == "mlp2-relu-sce"
    assert run_name({}) == "mlp2-relu-sce"
    assert run_name({"model": "mlp0-sce", "lr": 0.1}) == "mlp0-sce_lr=0.1"
    assert run_name({"model": "mlp0-sce", "lr": 0.01, "momentum": 0.9}) == "mlp0-sce"  # the defaults
    # sorted, and only what changes the result: not device, data_dir, logging or TensorBoard
    assert run_name({"model": "mlp0-sce", "momentum": 0.5, "batch_size": 20, "device": "cuda",
                     "data_dir": "/x", "log_every": 10, "tensorboard": True}) == \
        "mlp0-sce_batch_size=20_momentum=0.5"
    assert run_name({"hidden": [64], "activation": "relu", "loss": "sce"}) == "mlp64-relu-sce"


def test_load_grid_with_overrides(tmp_path):
    config = write_config(tmp_path, """
out = "somewhere"
[defaults]
epochs = 3
[grid]
model = ["mlp2-sigmoid-mse", "mlp2-relu-mse"]
lr = [0.1, 0.01]
[[overrides]]
when = { model = "mlp2-sigmoid-mse" }
set = { init_std = 0.1 }
[[overrides]]
when = { model = "mlp2-relu-mse", lr = 0.1 }
set = { momentum = 0.5 }
""")
    points, out = load_grid(config)
    assert out == "somewhere"
    by_name = dict(points)
    assert len(points) == 4 and len(by_name) == 4
    assert sorted(by_name) == sorted([
        "mlp2-sigmoid-mse_epochs=3_init_std=0.1_lr=0.1", "mlp2-sigmoid-mse_epochs=3_init_std=0.1",
        "mlp2-relu-mse_epochs=3_lr=0.1_momentum=0.5", "mlp2-relu-mse_epochs=3"])
    assert by_name["mlp2-sigmoid-mse_epochs=3_init_std=0.1"] == \
        {"epochs": 3, "model": "mlp2-sigmoid-mse", "lr": 0.01, "init_std": 0.1}
    assert by_name["mlp2-relu-mse_epochs=3"] == {"epochs": 3, "model": "mlp2-relu-mse", "lr": 0.01}


@pytest.mark.parametrize("text, needle", [
    ("[defaults]\nlearning_rate = 0.1\n", "learning_rate"),
    ("[grid]\nlr = [0.1]\nbatch = [10]\n", "batch"),
    ("[grid]\nlr = [0.1]\n[[overrides]]\nwhen = { lr = 0.1 }\nset = { momentun = 0.5 }\n", "momentun"),
    ("[grid]\nlr = [0.1, -1.0]\n", "--lr"),
    ("[grid]\nmodel = ['mlp3-relu-sce']\n", "unknown model"),
    ("[grid\nlr = [0.1]\n", "grid.toml"),
    ("[grid]\nlr = 0.1\n", "must be lists"),
    ("[defaults]\nlr = '0.1'\n", "grid.toml"),
], ids=["defaults", "grid", "override", "bad-value", "bad-model", "bad-toml", "not-a-list", "wrong-type"])
def test_load_grid_rejects_mistakes(tmp_path, text, needle):
    config = write_config(tmp_path, text)
    with pytest.raises(TrainError, match=needle.replace("[", r"\[")):
        load_grid(config)


def test_missing_config(tmp_path):
    with pytest.raises(TrainError, match="not found"):
        load_grid(tmp_path / "nope.toml")


def test_same_point_in_two_configs_is_one_run(tmp_path, capsys):
    a = write_config(tmp_path, GRID.replace("lr = [0.01, 1e6]", "lr = [0.01, 0.1]"), name="a.toml")
    b = write_config(tmp_path, GRID.replace("lr = [0.01, 1e6]", "lr = [0.1, 0.001]"), name="b.toml")
    code = run_sweep([str(a), str(b)], dry_run=True)
    out = capsys.readouterr().out
    assert code == 0
    assert "sweep: 3 runs" in out
    listed = [line.split()[-1] for line in out.splitlines() if line.startswith("  new")]
    assert len(listed) == 3 and len(set(listed)) == 3
    assert sum(Path(p).name == GOOD for p in listed) == 1


def test_sweep_command_reports_a_bad_config_in_one_line(tmp_path):
    import subprocess
    import sys
    config = write_config(tmp_path, "[grid]\nlr = [0.1]\nmomentun = [0.5]\n")
    p = subprocess.run([sys.executable, "-m", "xpmlp", "sweep", str(config), "--jobs", "2"], cwd=tmp_path,
                       env=dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir())), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("xpmlp: error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "momentun" in p.stderr and "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["grid.toml"]
