"""xpmlp report RUNS... without --published: a table of a user's own runs."""
from pathlib import Path

from test_own_data import FAST, run, write_npz

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "report" / "runs"


def rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0].strip("`"): dict(zip(cells[0], row)) for row in cells[2:]}


def test_table_of_the_report_fixture_runs_shows_only_what_differs(capsys):
    names = ["mlp2-relu-sce", "mlp2-relu-sce_lr=1.0", "mlp2-relu-sce_seed=1", "mlp0-mse"]
    code, out, err = run(capsys, "report", *(FIXTURE / n for n in names))
    assert code == 0, err
    head, table = rows(out)
    assert head[:5] == ["run", "model", "lr", "seed", "status"]  # epochs, batch size...: the same in all
    assert table["mlp2-relu-sce_lr=1.0"]["lr"] == "1.0" and table["mlp2-relu-sce_seed=1"]["seed"] == "1"
    assert table["mlp0-mse"]["model"] == "mlp0-mse"
    assert "val acc (%)" not in head  # no run has a validation split


def test_own_runs_best_epochs_val_and_out(tmp_path, capsys):
    d = write_npz(tmp_path / "m.npz")
    for lr in ("0.1", "0.5"):
        assert run(capsys, "train", "--data", d, *FAST, "--lr", lr, "--val", "20", "--epochs", "3",
                   "--out", tmp_path / f"lr={lr}")[0] == 0
    code, out, err = run(capsys, "report", "--runs-under", tmp_path, "--out", tmp_path / "rep")
    assert code == 0, err
    head, table = rows(out)
    assert head[:3] == ["run", "model", "lr"] and "best val acc (%) @ epoch" in head
    from xpmlp import rundir
    for name, row in table.items():
        epochs = [r for r in rundir.read_records(tmp_path / name) if r["kind"] == "epoch"]
        best = max(epochs, key=lambda r: (r["test_acc"], -r["epoch"]))
        assert row["best test acc (%) @ epoch"] == f"{100 * best['test_acc']:.2f} @ {best['epoch']}"
        assert row["epochs done"] == "3"
    assert (tmp_path / "rep" / "runs.md").read_text().endswith(out.split(str(tmp_path / "rep"))[0])


def test_report_mistakes_are_one_line(tmp_path, capsys):
    for argv, words in ((["report", tmp_path], "holds a run"),
                        (["report", FIXTURE / "mlp0-mse", "--published", "x.toml"], "--published needs --out"),
                        (["report", FIXTURE / "mlp0-mse", "--copy-runs"], "go with --published")):
        code, out, err = run(capsys, *argv)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
