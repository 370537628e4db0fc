"""--val: a seeded validation split, its metrics in the records and the line, best.npz (the
best validation accuracy's checkpoint) and eval/predict/load --checkpoint best."""
import json

import numpy as np
import pytest
from test_own_data import FAST, run, tiny_images, write_idx_dir, write_npz

import xpmlp
from xpmlp import data, rundir


def records(run_dir):
    return [r for r in rundir.read_records(run_dir) if r["kind"] == "epoch"]


def test_split_is_seeded_disjoint_and_the_same_for_every_run(tmp_path):
    whole = data.load_user_data(write_npz(tmp_path / "m.npz"))
    a, b = data.split_validation(whole, 20), data.split_validation(whole, 20)
    assert a.val_x.shape == (20, 36) and a.train_x.shape == (70, 36)
    assert np.array_equal(a.val_x, b.val_x) and np.array_equal(a.train_y, b.train_y)
    rows = {r.tobytes() for r in whole.train_x}
    assert {r.tobytes() for r in a.val_x} | {r.tobytes() for r in a.train_x} == rows  # nothing lost
    assert not {r.tobytes() for r in a.val_x} & {r.tobytes() for r in a.train_x}
    assert len(data.split_validation(whole, 0.25).val_x) == round(0.25 * 90)
    assert data.split_validation(whole, None) is whole
    with pytest.raises(data.DataError, match="holds out 90 of the 90"):
        data.split_validation(whole, 90)


def test_val_metrics_and_best_checkpoint(tmp_path, capsys):
    d = write_idx_dir(tmp_path / "tiny")
    argv = ["train", "--data", d, "--val", "20", *FAST, "--lr", "0.5"]
    code, out, err = run(capsys, *argv, "--epochs", "6", "--out", tmp_path / "run")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert all(" val loss " in line and line.index(" val ") < line.index(" test ") for line in lines)
    recs = records(tmp_path / "run")
    accs = [r["val_acc"] for r in recs]
    assert all(r["val_loss"] is not None for r in recs)
    best = int(np.argmax(accs)) + 1  # the first epoch of the best accuracy
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert (summary["best_epoch"], summary["best_val_acc"]) == (best, max(accs))
    # best.npz holds exactly the weights a run of `best` epochs ends with
    code, out, err = run(capsys, *argv, "--epochs", best, "--out", tmp_path / "short")
    assert code == 0, err
    got = rundir.load_checkpoint(tmp_path / "run" / rundir.BEST)
    want = rundir.load_checkpoint(tmp_path / "short")
    assert got[2]["epoch"] == best
    for g, w in zip(got[0], want[0]):
        np.testing.assert_array_equal(g, w)
    code, out, err = run(capsys, "eval", tmp_path / "run", "--checkpoint", "best", "--json")
    assert code == 0 and json.loads(out)["epoch"] == best and json.loads(out)["checkpoint"] == "best"
    x, y = tiny_images(30, 1)
    proba = xpmlp.load(tmp_path / "run", checkpoint="best").predict_proba(x)
    assert np.mean(np.argmax(proba, 1) == y) == pytest.approx(json.loads(out)["test_acc"])


def test_best_survives_a_resume(tmp_path, capsys):
    d = write_idx_dir(tmp_path / "tiny")
    argv = ["train", "--data", d, "--val", "0.2", *FAST, "--lr", "0.5"]
    assert run(capsys, *argv, "--epochs", "6", "--out", tmp_path / "whole")[0] == 0
    assert run(capsys, *argv, "--epochs", "3", "--out", tmp_path / "half")[0] == 0
    assert run(capsys, "train", "--resume", tmp_path / "half", "--epochs", "6", "--quiet")[0] == 0
    def trajectory(name):  # train_time_s aside
        return [(r["val_acc"], r["val_loss"], r["train_loss"]) for r in records(tmp_path / name)]
    assert trajectory("half") == trajectory("whole")
    for name in ("summary.json",):
        a, b = (json.loads((tmp_path / r / name).read_text()) for r in ("half", "whole"))
        assert (a["best_epoch"], a["best_val_acc"]) == (b["best_epoch"], b["best_val_acc"])
    for g, w in zip(rundir.load_checkpoint(tmp_path / "half" / rundir.BEST)[0],
                    rundir.load_checkpoint(tmp_path / "whole" / rundir.BEST)[0]):
        np.testing.assert_array_equal(g, w)


def test_without_val_records_and_runs_are_as_before(tmp_path, capsys):
    d = write_idx_dir(tmp_path / "tiny")
    assert run(capsys, "train", "--data", d, *FAST, "--epochs", "1", "--out", tmp_path / "run")[0] == 0
    assert set(records(tmp_path / "run")[0]) == {"kind", "epoch", "iter", "train_loss", "train_acc", "test_loss",
                                                 "test_acc", "train_time_s"}
    assert not (tmp_path / "run" / rundir.BEST).exists()
    code, out, err = run(capsys, "eval", tmp_path / "run", "--checkpoint", "best")
    assert code == 2 and "no best.npz (the run has no validation split: train with --val)" in err


@pytest.mark.parametrize("val, words", [("0", "expected a number of samples"), ("1.5", "fraction in (0, 1)"),
                                        ("ten", "expected a number of samples"), ("90", "holds out 90 of the 90"),
                                        ("85", "exceeds the 5 training samples (after the 85 held out")])
def test_bad_val_is_one_line(tmp_path, capsys, val, words):
    code, out, err = run(capsys, "train", "--data", write_npz(tmp_path / "m.npz"), "--val", val, *FAST,
                         "--epochs", "1", "--out", tmp_path / "run")
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_resume_with_other_val_is_refused(tmp_path, capsys):
    d = write_npz(tmp_path / "m.npz")
    assert run(capsys, "train", "--data", d, "--val", "20", *FAST, "--epochs", "1", "--out", tmp_path / "run")[0] == 0
    code, out, err = run(capsys, "train", "--resume", tmp_path / "run", "--val", "30", "--epochs", "2")
    assert code == 2 and "--val 30 contradicts the run's 20" in err


def test_stacked_seeds_leave_what_their_single_runs_leave(tmp_path, capsys):
    d = write_npz(tmp_path / "m.npz")
    argv = ["train", "--data", d, "--val", "20", *FAST, "--lr", "0.5", "--epochs", "5"]
    code, out, err = run(capsys, *argv, "--seeds", "0-1", "--out", tmp_path / "group")
    assert code == 0, err
    assert "val acc" in out
    for seed in (0, 1):
        assert run(capsys, *argv, "--seed", seed, "--out", tmp_path / f"alone{seed}")[0] == 0
        member, alone = tmp_path / f"group/seed={seed}", tmp_path / f"alone{seed}"
        assert [r["val_acc"] for r in records(member)] == [r["val_acc"] for r in records(alone)]
        summaries = [json.loads((p / "summary.json").read_text()) for p in (member, alone)]
        assert [(s["best_val_acc"], s["best_epoch"]) for s in summaries][0] == \
            (summaries[1]["best_val_acc"], summaries[1]["best_epoch"])
        got, want = (rundir.load_checkpoint(p / rundir.BEST) for p in (member, alone))
        assert got[2]["best_epoch"] == want[2]["best_epoch"] == summaries[1]["best_epoch"]
        for a, b in zip(got[0], want[0]):
            np.testing.assert_array_equal(a, b)
