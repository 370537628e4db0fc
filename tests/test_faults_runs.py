"""Run and group directories under faults that used to end silently wrong or write outside
the run: a resume asked for fewer epochs than done, a no-op resume, a closed output pipe at
Ctrl-C, a damaged group checkpoint, a crafted stack.json or metrics link, and the freeze of
a diverged stacked model (during the run and after a resume)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import FAST, assert_user_error, env, snapshot, xpmlp
from test_stack import configs, stack_trainer
from test_train import synthetic  # noqa: F401 (a fixture)

from xpmlp.training import loop


def trained(factory, name, *flags):
    """A finished run (or seeds group) made by the CLI; tests copy it before they change it."""
    cwd = factory.mktemp(name)
    rc, out, err = xpmlp("train", *FAST, *flags, "--quiet", "--out", name, cwd=cwd)
    assert rc == 0, out + err
    return cwd / name


def copy_of(directory, tmp_path):
    import shutil
    return Path(shutil.copytree(directory, tmp_path / directory.name))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    return trained(tmp_path_factory, "run", "--epochs", "3")


def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(three_epochs, tmp_path):
    run = copy_of(three_epochs, tmp_path)
    before = snapshot(run)
    line = assert_user_error(xpmlp("train", "--resume", "run", "--epochs", "2", cwd=tmp_path),
                             "--epochs 2 is fewer than the run has done (3 epochs)", "--epochs 4 or more")
    assert "total" in line
    assert snapshot(run) == before


def test_a_resume_with_nothing_left_to_do_rewrites_no_checkpoint(three_epochs, tmp_path):
    run = copy_of(three_epochs, tmp_path)
    checkpoint = (run / "checkpoint.npz").stat()
    rc, out, err = xpmlp("train", "--resume", "run", "--epochs", "3", "--quiet", cwd=tmp_path)
    assert rc == 0, out + err
    after = (run / "checkpoint.npz").stat()
    assert (after.st_mtime_ns, after.st_ino) == (checkpoint.st_mtime_ns, checkpoint.st_ino)
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 3


def test_a_resume_ending_inside_the_checkpoints_epoch_is_refused(tmp_path):
    """A checkpoint taken 3 steps into epoch 2: --epochs 1 would end before it."""
    run = tmp_path / "run"
    rc, out, err = xpmlp("train", *FAST, "--epochs", "1", "--quiet", "--out", "run", cwd=tmp_path)
    assert rc == 0, out + err
    from xpmlp import rundir
    params, velocity, state, _ = rundir.load_checkpoint(run)
    rundir.save_checkpoint(run / "checkpoint.npz", params, velocity, dict(state, pos=3),
                           {"loss": np.zeros(3, np.float32), "acc": np.zeros(3, np.float32)})
    assert_user_error(xpmlp("train", "--resume", "run", "--epochs", "1", cwd=tmp_path),
                      "1 epochs and 3 iterations", "--epochs 2 or more")


def test_ctrl_c_after_the_output_pipe_closed_still_saves_and_summarises(tmp_path):
    """``xpmlp train ... | tee log`` and Ctrl-C: tee dies with the same Ctrl-C, so the lines
    after the checkpoint meet a closed pipe; the run still ends as interrupted, exit 130."""
    proc = subprocess.Popen([sys.executable, "-m", "xpmlp", "train", *FAST, "--epochs", "200", "--quiet",
                             "--out", "run"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    first = proc.stdout.readline()
    assert first.startswith(b"training "), first
    proc.stdout.readline()  # epoch 1's line: a checkpoint exists
    proc.stdout.close()  # the reader goes away
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    from xpmlp import rundir
    assert rundir.load_checkpoint(tmp_path / "run")[2]["status"] == "interrupted"


@pytest.fixture(scope="module")
def seeds_group(tmp_path_factory):
    return trained(tmp_path_factory, "g", "--epochs", "2", "--seeds", "0-1")


def test_a_damaged_group_checkpoint_is_refused_not_started_again(seeds_group, tmp_path):
    group = copy_of(seeds_group, tmp_path)
    checkpoint = group / "stack-checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:500])
    before = snapshot(group)
    assert_user_error(xpmlp("train", "--resume", "g", cwd=tmp_path), "stack-checkpoint.npz", "unreadable checkpoint")
    assert snapshot(group) == before


@pytest.mark.parametrize("members", [["../elsewhere", "seed=1"], ["/tmp/xpmlp-not-mine", "seed=1"],
                                     ["seed=0/../../elsewhere", "seed=1"]])
def test_group_members_outside_the_group_are_refused(seeds_group, tmp_path, members):
    group = copy_of(seeds_group, tmp_path)
    description = json.loads((group / "stack.json").read_text())
    (group / "stack.json").write_text(json.dumps(dict(description, members=members)))
    before = snapshot(group)
    assert_user_error(xpmlp("train", "--resume", "g", cwd=tmp_path), "outside the group")
    assert snapshot(group) == before
    assert not (tmp_path / "elsewhere").exists() and not Path("/tmp/xpmlp-not-mine").exists()


def test_a_group_member_dropped_from_stack_json_is_one_line(seeds_group, tmp_path):
    group = copy_of(seeds_group, tmp_path)
    description = json.loads((group / "stack.json").read_text())
    description["members"] = description["members"][:1]
    description["per_model"] = {k: v[:1] for k, v in description["per_model"].items()}
    (group / "stack.json").write_text(json.dumps(description))
    assert_user_error(xpmlp("train", "--resume", "g", cwd=tmp_path), "stack-checkpoint.npz")


def test_a_metrics_link_is_not_followed(three_epochs, tmp_path):
    run = copy_of(three_epochs, tmp_path)
    outside = tmp_path / "outside" / "metrics.jsonl"
    outside.parent.mkdir()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)  # dangling: an append would create it
    assert_user_error(xpmlp("train", "--resume", "run", "--epochs", "4", "--quiet", cwd=tmp_path),
                      "metrics.jsonl is a symbolic link")
    assert not outside.exists()


# ---------------------------------------------------------------- the freeze of a diverged model

def _poison_model_1_in_epoch_1(monkeypatch):
    """Model 1's epoch-1 losses read as NaN: it is taken for diverged while its weights are
    still finite, so a missing freeze shows as weights that go on changing."""
    real = loop.EpochLoop._end_epoch

    def poisoned(self, epoch, iters, losses, accs, *rest):
        if epoch == 1:
            losses = losses.reshape(iters, -1).copy()
            losses[:, 1] = np.nan
        return real(self, epoch, iters, losses, accs, *rest)

    monkeypatch.setattr(loop.EpochLoop, "_end_epoch", poisoned)


def _slices(group_dir, k):
    with np.load(group_dir / "stack-checkpoint.npz") as npz:
        return [npz[name][k].copy() for name in sorted(npz.files) if name.startswith(("param_", "velocity_"))]


def _assert_frozen(group_dir, member_dir, k=1):
    """The diverged model's slice of the group checkpoint is its own checkpoint's, written
    when it diverged: it stopped changing."""
    with np.load(member_dir / "checkpoint.npz") as npz:
        own = [npz[name].reshape(-1) for name in sorted(npz.files) if name.startswith(("param_", "velocity_"))]
    for a, b in zip(_slices(group_dir, k), own):
        np.testing.assert_array_equal(a.reshape(-1), b)


def test_a_diverged_stacked_model_stops_changing(tmp_path, synthetic, monkeypatch):  # noqa: F811
    _poison_model_1_in_epoch_1(monkeypatch)
    cfgs = configs([dict(lr=0.05), dict(lr=0.1, seed=2), dict(lr=0.01, seed=4)], epochs=3)
    trainer = stack_trainer(cfgs, tmp_path, synthetic)
    trainer.run()
    assert trainer.member_status == ["completed", "diverged", "completed"]
    _assert_frozen(tmp_path / "group", tmp_path / "m1")
    with np.load(tmp_path / "m0" / "checkpoint.npz") as npz:  # the others went on
        assert not np.array_equal(npz["param_0"], _slices(tmp_path / "group", 1)[0])


def test_a_diverged_stacked_model_stays_frozen_after_a_resume(tmp_path, synthetic, monkeypatch):  # noqa: F811
    _poison_model_1_in_epoch_1(monkeypatch)
    cfgs = configs([dict(lr=0.05), dict(lr=0.1, seed=2), dict(lr=0.01, seed=4)], epochs=4)

    class StopAfterEpoch2:
        stop = False

    flag = StopAfterEpoch2()

    def log(line):
        if line.startswith("epoch   2/"):
            flag.stop = True

    first = stack_trainer(cfgs, tmp_path, synthetic, stop_flag=flag)
    first.log = log
    first.run()
    assert first.state["status"] == "interrupted" and first.state["epoch"] == 2
    resumed = stack_trainer(cfgs, tmp_path, synthetic, resume=True)
    resumed.run()
    assert resumed.state["epoch"] == 4
    _assert_frozen(tmp_path / "group", tmp_path / "m1")
    assert os.path.exists(tmp_path / "m1" / "summary.json")


def test_a_lock_link_is_not_followed(three_epochs, tmp_path):
    """A received run whose .lock links elsewhere: a resume must not truncate or write the target."""
    run = copy_of(three_epochs, tmp_path)
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(target)
    assert_user_error(xpmlp("train", "--resume", "run", "--epochs", "4", "--quiet", cwd=tmp_path),
                      ".lock is a symbolic link")
    assert target.read_text() == "keep me\n"


def test_a_sweep_group_whose_stack_json_names_a_stranger_is_one_line(tmp_path, capsys):
    """A hand-edited stack.json in a sweep's .stacks/ naming a run that is not a point of the
    sweep: one line, nothing trained or cleared (it used to be a KeyError)."""
    from xpmlp.config import TrainConfig, TrainError
    from xpmlp.sweep import plan_stacks, run_state
    from xpmlp.sweep.plan import load_grid
    from xpmlp.training.stack import GROUP_KEYS, PER_MODEL_KEYS
    grid = tmp_path / "grid.toml"
    grid.write_text(f'out = "{tmp_path / "runs"}"\n[defaults]\nmodel = "mlp0-sce"\nepochs = 1\n[grid]\nlr = [0.1, 0.2]\n')
    points = load_grid(grid)[0]
    todo = [(tmp_path / "runs" / name, s, run_state(tmp_path / "runs" / name)) for name, s in points]
    (group_dir, members, state), = plan_stacks(todo, None, None)[0]
    assert state == "new"
    configs = [TrainConfig(**s) for _, s in members]
    group_dir.mkdir(parents=True)
    (group_dir / "stack.json").write_text(json.dumps({
        "members": ["../../" + members[0][0].name, "../../stranger"], "shared_shuffle": True,
        "group": {k: getattr(configs[0], k) for k in GROUP_KEYS},
        "per_model": {k: [getattr(c, k) for c in configs] for k in PER_MODEL_KEYS}}))
    (group_dir / "stack-checkpoint.npz").write_bytes(b"PK damaged")  # a group to resume
    with pytest.raises(TrainError, match="names .*stranger, which is not a point of this sweep"):
        plan_stacks(todo, None, None)
    assert (group_dir / "stack-checkpoint.npz").read_bytes() == b"PK damaged"


@pytest.mark.parametrize("failure", [PermissionError(13, "Permission denied", "run/.lock"),
                                     IsADirectoryError(21, "Is a directory", "run/summary.json")])
def test_a_run_directory_that_cannot_be_written_is_one_line(three_epochs, tmp_path, monkeypatch, capsys, failure):
    """A read-only run directory (root, who runs the tests, can write anywhere: the OS's
    refusal is simulated where the resume first writes)."""
    from xpmlp import cli, rundir
    run = copy_of(three_epochs, tmp_path)

    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(rundir, "_lock_file", refuse)
    monkeypatch.setenv("XPMLP_DATA_DIR", str(env()["XPMLP_DATA_DIR"]))
    assert cli.main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"xpmlp: error: {failure.filename}: {failure.strerror}"
