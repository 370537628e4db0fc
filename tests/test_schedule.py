"""--lr-schedule: the optimizer's rate set by the loop before each epoch, for stacked models
each its own; in the config and the records; a resume takes the rates it would have."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_own_data import FAST, run, write_npz

from xpmlp import data, rundir
from xpmlp.config import TrainConfig, TrainError, lr_at
from xpmlp.training.stack import StackTrainer
from xpmlp.training.train import Trainer


def epochs_of(run_dir):
    return [{k: v for k, v in r.items() if k != "train_time_s"}
            for r in rundir.read_records(run_dir) if r["kind"] == "epoch"]


def params(run_dir):
    return rundir.load_checkpoint(Path(run_dir))[0]


def test_rates():
    step = TrainConfig(lr=0.1, lr_schedule="step:2:0.5", epochs=6)
    assert [lr_at(step, e) for e in range(1, 7)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    cosine = TrainConfig(lr=0.1, lr_schedule="cosine", epochs=4)
    assert [lr_at(cosine, e) for e in range(1, 5)] == pytest.approx(
        [0.1 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)])
    assert lr_at(TrainConfig(lr=0.1), 9) == 0.1
    for bad in ("step", "step:0:0.5", "step:2:1.5", "step:2:x", "linear", "cosine:3", "step:2:0.5:1"):
        with pytest.raises(TrainError, match="--lr-schedule must be"):
            TrainConfig(lr_schedule=bad).validate()


def test_bad_schedule_is_one_line(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", write_npz(tmp_path / "m.npz"), "--lr-schedule", "step:2",
                         *FAST, "--epochs", "1", "--out", tmp_path / "run")
    assert code == 2 and "--lr-schedule must be step:EPOCHS:FACTOR" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_schedule_changes_the_rate_from_its_epoch_only(tmp_path, capsys):
    d = write_npz(tmp_path / "m.npz")
    args = ["train", "--data", d, *FAST, "--epochs", "4"]
    assert run(capsys, *args, "--out", tmp_path / "const")[0] == 0
    code, out, err = run(capsys, *args, "--lr-schedule", "step:2:0.5", "--out", tmp_path / "step")
    assert code == 0, err
    assert "  lr 0.05  train loss" in out.splitlines()[-2]
    const, step = epochs_of(tmp_path / "const"), epochs_of(tmp_path / "step")
    assert [r["lr"] for r in step] == [0.1, 0.1, 0.05, 0.05] and "lr" not in const[0]
    assert [r["train_loss"] for r in step[:2]] == [r["train_loss"] for r in const[:2]]  # the same bits
    assert step[2]["train_loss"] != const[2]["train_loss"]
    assert json.loads((tmp_path / "step/config.json").read_text())["lr_schedule"] == "step:2:0.5"


def test_resume_mid_schedule_is_bit_identical(tmp_path, capsys):
    d = write_npz(tmp_path / "m.npz")
    args = ["train", "--data", d, *FAST, "--lr-schedule", "step:1:0.5"]
    assert run(capsys, *args, "--epochs", "4", "--out", tmp_path / "whole")[0] == 0
    assert run(capsys, *args, "--epochs", "2", "--out", tmp_path / "two")[0] == 0
    code, out, err = run(capsys, "train", "--resume", tmp_path / "two", "--epochs", "4", "--quiet")
    assert code == 0, err
    assert epochs_of(tmp_path / "two") == epochs_of(tmp_path / "whole")
    for a, b in zip(params(tmp_path / "two"), params(tmp_path / "whole")):
        np.testing.assert_array_equal(a, b)


def test_a_cosine_run_is_not_extended(tmp_path, capsys):
    """Cosine anneals over the run's own length: more epochs would be another schedule."""
    d = write_npz(tmp_path / "m.npz")
    assert run(capsys, "train", "--data", d, *FAST, "--lr-schedule", "cosine", "--epochs", "2",
               "--out", tmp_path / "run")[0] == 0
    code, out, err = run(capsys, "train", "--resume", tmp_path / "run", "--epochs", "4", "--quiet")
    assert code == 2 and "anneals over its 2 epochs" in err


def test_cosine_resume_after_an_interruption_is_bit_identical(tmp_path, capsys):
    """A cosine run interrupted after epoch 2 (its checkpoint then) goes on with the rates it
    would have had: made here by keeping the checkpoint of epoch 2 of a 4-epoch run."""
    d = write_npz(tmp_path / "m.npz")
    config = TrainConfig(hidden=[16], activation="relu", loss="sce", batch_size=10, lr=0.1, epochs=4,
                         device="cpu", data=str(d), lr_schedule="cosine")
    dataset = data.load_user_data(d)
    config = config.fit_data(dataset)
    for name in ("whole", "part"):
        (tmp_path / name).mkdir()
    whole = Trainer(config, tmp_path / "whole", dataset, progress=False, log=lambda line: None)
    whole.write_config()
    whole.run()

    class StopAfter2:
        @property
        def stop(self):
            return part.state["epoch"] >= 2

    part = Trainer(config, tmp_path / "part", dataset, progress=False, log=lambda line: None)
    part.stop_flag = StopAfter2()
    part.write_config()
    part.run()
    assert part.state["status"] == "interrupted" and part.state["epoch"] == 2
    again = Trainer(config, tmp_path / "part", dataset, progress=False, log=lambda line: None, resume=True)
    again.run()
    assert epochs_of(tmp_path / "part") == epochs_of(tmp_path / "whole")
    for a, b in zip(params(tmp_path / "part"), params(tmp_path / "whole")):
        np.testing.assert_array_equal(a, b)


def test_stacked_models_each_follow_their_own_schedule(tmp_path):
    d = write_npz(tmp_path / "m.npz")
    dataset = data.load_user_data(d)
    base = TrainConfig(hidden=[16], activation="relu", loss="sce", batch_size=10, lr=0.1, epochs=3,
                       device="cpu", data=str(d)).fit_data(dataset)
    import dataclasses
    configs = [dataclasses.replace(base, lr_schedule="step:1:0.5"), dataclasses.replace(base, lr_schedule="cosine"),
               dataclasses.replace(base, lr=0.05)]
    group = StackTrainer(configs, [tmp_path / f"m{k}" for k in range(3)], dataset, tmp_path / "group",
                         progress=False, log=lambda line: None)
    group.write_config()
    group.run()
    for k, config in enumerate(configs):
        (tmp_path / f"alone{k}").mkdir()
        alone = Trainer(config, tmp_path / f"alone{k}", dataset, progress=False, log=lambda line: None)
        alone.write_config()
        alone.run()
        assert epochs_of(tmp_path / f"m{k}") == epochs_of(tmp_path / f"alone{k}")
        for a, b in zip(params(tmp_path / f"m{k}"), params(tmp_path / f"alone{k}")):
            np.testing.assert_array_equal(a, b)
    assert [r["lr"] for r in epochs_of(tmp_path / "m0")] == [0.1, 0.05, 0.025]
    assert all("lr" not in r for r in epochs_of(tmp_path / "m2"))  # constant: records as without schedules
