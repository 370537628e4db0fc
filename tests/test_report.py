"""experiments/published.toml (the report's Tables 11-14) and xpmlp.report on synthetic run dirs."""
import json
import math
from pathlib import Path

import pytest

from xpmlp import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"train_loss", "train_acc", "test_loss", "test_acc"}
MODEL_NAMES = ["mlp0-mse", "mlp0-sce", "mlp1-sigmoid-mse", "mlp1-relu-mse", "mlp1-sigmoid-sce",
               "mlp1-relu-sce", "mlp2-sigmoid-mse", "mlp2-relu-mse", "mlp2-sigmoid-sce",
               "mlp2-relu-sce"]


PUBLISHED = Path(__file__).resolve().parents[1] / "experiments" / "published.toml"


@pytest.fixture(scope="module")
def pub():
    return report.load_reference(PUBLISHED)


def rows(pub, table):
    return pub["tables"][table]["rows"]


def row_by(pub, table, **kv):
    (row,) = [r for r in rows(pub, table) if all(r[k] == v for k, v in kv.items())]
    return row


# ----------------------------------------------------------------------------- published.toml
def test_published_structure(pub):
    assert pub["defaults"] == {"model": "mlp2-relu-sce", "epochs": 100, "batch_size": 100,
                               "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
                               "init_std": 0.01}
    counts = {"table11": 10, "table12": 6, "table13": 11, "table14": 10}
    keys = {"table11": "model", "table12": "lr", "table13": "momentum", "table14": "batch_size"}
    assert {t: len(pub["tables"][t]["rows"]) for t in counts} == counts
    for t, key in keys.items():
        assert pub["tables"][t]["key"] == key and pub["tables"][t]["title"]
        for row in rows(pub, t):
            extra = {"train_time_s"} if t == "table11" else set()
            extra |= {"init_std"} if row.get("model") == "mlp2-sigmoid-mse" else set()
            assert set(row) == {"label", key} | METRICS | extra, row
            for k in ("train_acc", "test_acc"):
                assert 0.0 <= row[k] <= 1.0, row
        configs = [report.row_config(pub, r) for r in rows(pub, t)]
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    assert [r["model"] for r in rows(pub, "table11")] == MODEL_NAMES


def test_published_values(pub):
    assert row_by(pub, "table11", model="mlp2-relu-sce")["test_acc"] == 0.9834
    assert row_by(pub, "table11", model="mlp0-sce")["train_time_s"] == 161
    assert row_by(pub, "table11", model="mlp1-sigmoid-sce")["test_acc"] == 0.9649
    assert row_by(pub, "table11", model="mlp2-sigmoid-mse")["init_std"] == 0.1
    assert row_by(pub, "table12", lr=1.0)["train_acc"] == 0.1025
    assert row_by(pub, "table12", lr=0.00001)["test_acc"] == 0.1606
    m1 = row_by(pub, "table13", momentum=1.0)
    assert math.isnan(m1["train_loss"]) and math.isnan(m1["test_loss"])
    assert m1["train_acc"] == 0.0987
    assert row_by(pub, "table14", batch_size=10)["test_acc"] == 0.9772
    # The default network appears in all four tables with the same numbers.
    d = {k: row_by(pub, "table11", model="mlp2-relu-sce")[k] for k in METRICS}
    for t, kv in (("table12", {"lr": 0.01}), ("table13", {"momentum": 0.9}),
                  ("table14", {"batch_size": 100})):
        assert {k: row_by(pub, t, **kv)[k] for k in METRICS} == d
    sig = row_by(pub, "table11", model="mlp2-sigmoid-mse")
    assert report.row_config(pub, sig)["init_std"] == 0.1


# ----------------------------------------------------------------------------- synthetic runs
def make_run(root, name, epochs=3, ipe=150, status="completed", only_epochs=False,
             diverge_at=None, final=None, **cfg):
    """A run dir as the trainer writes it: `epochs` epochs of `ipe` iterations each."""
    d = root / name
    d.mkdir()
    config = {"model": "mlp2-relu-sce", "epochs": 100, "batch_size": 100, "lr": 0.01,
              "momentum": 0.9, "weight_decay": 0.0005, "init_std": 0.01, "seed": 0,
              "dtype": "float32", "device": "cpu",
              "device_used": {"backend": "numpy", "device": "cpu"}, "versions": {}}
    config.update(cfg)
    (d / "config.json").write_text(json.dumps(config))
    lines, it = [], 0
    for e in range(1, epochs + 1):
        bad = diverge_at is not None and e >= diverge_at
        for _ in range(ipe):
            it += 1
            loss = None if bad else 2.3 / (1 + it / 50)
            lines.append({"kind": "iter", "epoch": e, "iter": it, "loss": loss,
                          "acc": None if bad else min(0.99, 0.1 + it / 500)})
        lines.append({"kind": "epoch", "epoch": e, "iter": it,
                      "train_loss": None if bad else 2.3 / (1 + it / 50),
                      "train_acc": None if bad else min(0.99, 0.1 + it / 500),
                      "test_loss": None if bad else 2.0 / (1 + it / 50),
                      "test_acc": None if bad else min(0.98, 0.1 + it / 520),
                      "train_time_s": 1.5 * e})
    summary = {k: lines[-1][k] for k in ("train_loss", "train_acc", "test_loss", "test_acc",
                                         "train_time_s")}
    summary.update(final or {}, epochs_completed=epochs, status=status)
    (d / "summary.json").write_text(json.dumps(summary))
    if only_epochs:
        (d / "epochs.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in lines if r["kind"] == "epoch"))
    else:
        body = "".join(json.dumps(r) + "\n" for r in lines)
        (d / "metrics.jsonl").write_text(body + '{"kind": "iter", "ep')   # half-written line
    return d


def test_load_run_both_layouts(tmp_path):
    full = report.load_run(make_run(tmp_path, "a", epochs=2, ipe=5))
    assert len(full.iters) == 10 and len(full.epochs) == 2 and full.status == "completed"
    assert full.epochs[-1]["iter"] == 10
    short = report.load_run(make_run(tmp_path, "b", epochs=2, ipe=5, only_epochs=True))
    assert short.iters == [] and len(short.epochs) == 2
    x, loss, acc = report._curve(short)
    assert x == [5, 10] and len(loss) == len(acc) == 2
    x, loss, acc = report._curve(full, window=4)          # windows of 4 iterations: 1-4, 5-8, 9-10
    assert x == [4, 8, 10] and loss[0] == pytest.approx(sum(r["loss"] for r in full.iters[:4]) / 4)


def test_match_runs(tmp_path, pub):
    runs = [report.load_run(make_run(tmp_path, "lr01", lr=0.1 + 1e-12, epochs=1, ipe=2)),
            report.load_run(make_run(tmp_path, "short", epochs=1, ipe=2, status="interrupted")),
            report.load_run(make_run(tmp_path, "sce-int", model="mlp0-sce", epochs=1, ipe=2,
                                     status="interrupted")),
            report.load_run(make_run(tmp_path, "sce-done", model="mlp0-sce", epochs=1, ipe=2)),
            report.load_run(make_run(tmp_path, "sig", model="mlp2-sigmoid-mse", epochs=1, ipe=2))]
    m = report.match_runs(pub, runs)
    by = {t: {r["label"]: (run.path.name if run else None) for r, run in p} for t, p in m.items()}
    assert by["table12"]["lr = 0.1"] == "lr01"                      # floats via isclose
    assert by["table11"]["0-layer + SCE"] == "sce-done"             # completed beats interrupted
    assert by["table11"]["2-layer + Sigmoid + MSE (std 0.1)"] is None   # init_std 0.01 != 0.1
    assert by["table11"]["2-layer + Relu + SCE"] == "short"
    assert by["table11"]["0-layer + MSE"] is None
    runs[1].config["epochs"] = 3
    m = report.match_runs(pub, runs)
    assert m["table11"][-1][1] is None
    assert report.match_runs(pub, runs, ignore=("epochs",))["table11"][-1][1] is runs[1]


def test_make_report(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    dirs = [
        make_run(root, "default", final={"test_acc": 0.9811, "train_loss": 0.0200,
                                         "train_time_s": 1562.0}),
        make_run(root, "mlp0-mse", model="mlp0-mse", only_epochs=True,
                 final={"test_acc": 0.9102, "test_loss": 0.0931}),
        make_run(root, "sig-mse", model="mlp2-sigmoid-mse", init_std=0.1),
        make_run(root, "lr0.1", lr=0.1, device="cuda:0", dtype="float64",
                 device_used={"backend": "cupy", "device": "cuda:0", "device_name": "NVIDIA H100"}),
        make_run(root, "lr1.0", lr=1.0, diverge_at=2, status="diverged", epochs=2),
        make_run(root, "mom1.0", momentum=1.0, diverge_at=1, status="diverged", epochs=1),
        make_run(root, "bs400", batch_size=400, ipe=40),
        make_run(root, "bs10", batch_size=10, ipe=1000, only_epochs=True),
        make_run(root, "stray", lr=0.05),                          # matches no row
    ]
    (root / "empty").mkdir()                                       # no config.json: skipped
    out = tmp_path / "report"
    paths = report.make_report(dirs + [root / "empty"], out, PUBLISHED)
    md = (out / "tables.md").read_text()
    assert paths[0] == out / "tables.md"
    # 1 default run fills a row in each of the four tables, + 7 other matched rows.
    assert "11 of 37 grid rows have a run" in md and "1 matched no row" in md
    for t in ("Table 11", "Table 12", "Table 13", "Table 14"):
        assert t in md
    lines = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert "98.11 (98.34, -0.23)" in lines["2-layer + Relu + SCE"]
    assert "0.0200 (0.0174, +0.0026)" in lines["2-layer + Relu + SCE"]
    assert "1562 (781, ×2)" in lines["2-layer + Relu + SCE"]
    assert "91.02 (91.09, -0.07)" in lines["0-layer + MSE"]
    assert "— (not run)" in lines["1-layer + Relu + SCE"]
    assert "— (91.80)" in lines["1-layer + Sigmoid + MSE"]
    assert "nan (nan)" in lines["momentum = 1.0"] and "(diverged)" in lines["momentum = 1.0"]
    assert "nan (2.3244)" in lines["lr = 1.0"]
    t12 = md.split("## Table 12")[1].split("## Table 13")[0]
    assert "cupy cuda:0 NVIDIA H100" in t12 and "numpy cpu" in t12 and "float32, float64" in t12
    assert "**diverged** after 2 epoch(s)" in md
    assert "numpy cpu" in md and "float32" in md and "Epochs: 100 configured, 3 completed." in md
    assert "— (not run)" in lines["batch size = 20"]
    assert "Train Time (s)" in md.split("## Table 12")[0]
    assert "Train Time (s)" not in md.split("## Table 12")[1]
    names = {p.name for p in paths[1:]}
    assert names == {"fig2_mlp2-relu-sce.png", "fig2_mlp0-mse.png", "fig2_mlp2-sigmoid-mse.png",
                     "fig3_all_models.png", "fig4_learning_rate.png", "fig5_momentum.png",
                     "fig6_batch_size.png"}
    for p in paths[1:]:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, p


def test_make_report_no_runs(tmp_path):
    paths = report.make_report([], tmp_path, PUBLISHED)
    md = paths[0].read_text()
    assert paths == [tmp_path / "tables.md"]
    assert "0 of 37 grid rows have a run" in md and md.count("— (not run)") == 37


def test_last_epochs_column_is_mean_min_max_of_test_accuracy(tmp_path):
    from xpmlp.report import Run, _tail
    epochs = [{"kind": "epoch", "epoch": e, "test_acc": a}
              for e, a in enumerate([0.5] * 5 + [0.90, 0.92, None, 0.94, 0.96, 0.98, 0.90, 0.92, 0.94, 0.96, 0.98], 1)]
    run = Run(tmp_path, {}, {}, epochs, [])
    # the last 10 evaluated epochs skip the unevaluated one and the early 0.5s
    assert _tail(run) == "94.00 [90.00, 98.00]"
    assert _tail(None) == "—"


# ----------------------------------------------------------------------------- seeds
def test_rows_with_several_seeds_get_mean_std_range_and_z(tmp_path, pub):
    root = tmp_path / "runs"
    root.mkdir()
    accs = {0: 0.9800, 1: 0.9820, 2: 0.9840}
    dirs = [make_run(root, f"s{seed}", seed=seed, final={"test_acc": acc}) for seed, acc in accs.items()]
    (root / "s2" / "summary.json").touch()   # the newest file must not change the choice
    paths = report.make_report(dirs, tmp_path / "out", PUBLISHED, figures=False)
    md = paths[0].read_text()
    row = next(ln for ln in md.split("## Table 11")[1].splitlines() if ln.startswith("| 2-layer + Relu + SCE"))
    assert "98.00 (98.34, -0.34)" in row and "`s0`" in row          # the lowest seed's run
    seeds = md.split("### Table 11: the ten networks on MNIST: over seeds")[1].split("##")[0]
    line = next(ln for ln in seeds.splitlines() if ln.startswith("| 2-layer + Relu + SCE"))
    # mean 98.20, sample std 0.20, report 98.34 -> z = +0.7
    assert "| 0, 1, 2 |" in line and "98.20 ± 0.20 [98.00, 98.40] (98.34, z +0.7)" in line
    assert report.seed_stats([1.0]) is None and report.seed_stats([1.0, float("nan")]) is None


# ----------------------------------------------------------------------------- records
def test_records_keep_what_the_tables_and_figures_need(tmp_path):
    root, out_a, out_b = tmp_path / "runs", tmp_path / "a", tmp_path / "b"
    root.mkdir()
    dirs = [make_run(root, "default", epochs=3, ipe=25),
            make_run(root, "lr1.0", lr=1.0, diverge_at=2, status="diverged", epochs=2, ipe=25),
            make_run(root, "mlp0-mse", model="mlp0-mse", only_epochs=True)]
    (root / "default" / "checkpoint.npz").write_bytes(b"not kept")
    records = report.export_records(dirs, out_a)
    assert [p.name for p in records] == ["default", "lr1.0", "mlp0-mse"]
    assert sorted(p.name for p in (out_a / "runs" / "default").iterdir()) == sorted(report.RECORD_FILES)
    assert not (out_a / "runs" / "mlp0-mse" / "curve.npy").exists()   # it had no iteration records
    for d, rec in zip(dirs, records):
        live, kept = report.load_run(d), report.load_run(rec)
        assert kept.config == live.config and kept.summary == live.summary and kept.epochs == live.epochs
    live, kept = report.load_run(dirs[0]), report.load_run(records[0])
    assert kept.iter_window == 10 and [r["iter"] for r in kept.iters][:3] == [10, 20, 30]
    assert kept.iters[-1]["iter"] == 75                                # a partial last window
    assert kept.iters[1]["loss"] == pytest.approx(
        sum(r["loss"] for r in live.iters[10:20]) / 10, rel=1e-6)
    # a diverged window with no finite value is nan, not an error
    assert math.isnan(report.load_run(records[1]).iters[-1]["loss"])
    # the same tables from the runs and from their records, byte for byte
    a = report.make_report(dirs, out_a, PUBLISHED, figures=False)[0].read_bytes()
    b = report.make_report(records, out_b, PUBLISHED)[0].read_bytes()
    assert a == b


def test_compact_curve_caps_the_number_of_points():
    iters = [{"iter": i, "loss": 1.0 / i, "acc": 0.5} for i in range(1, 60_001)]
    curve = report.compact_curve(iters, max_points=1000)
    assert len(curve) == 1000 and curve[0, 0] == 60 and curve[-1, 0] == 60_000
    assert curve[:, 2].tolist() == [0.5] * 1000
    assert len(report.compact_curve(iters[:95])) == 10                 # windows of 10, last one 5


def test_report_command_needs_reference_tables(tmp_path, capsys):
    from xpmlp.cli import main
    run = make_run(tmp_path, "default", epochs=1, ipe=2)
    assert main(["report", str(run), "--out", str(tmp_path / "o"), "--published", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no reference tables" in err[0]
    assert main(["report", str(run), "--out", str(tmp_path / "o"), "--published", str(PUBLISHED),
                 "--copy-runs"]) == 0
    assert (tmp_path / "o" / "runs" / "default" / "curve.npy").exists()
    assert "`default` (completed)" in (tmp_path / "o" / "tables.md").read_text()


# ----------------------------------------------------------------------------- committed tables
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "report"
RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


@pytest.mark.parametrize("where", [FIXTURE, RESULTS], ids=["fixture", "experiments-results"])
def test_committed_tables_are_what_their_records_rebuild(tmp_path, where):
    """`make report` must rebuild the committed tables.md byte for byte from the committed
    records alone. The fixture is small synthetic records (regenerate: see its README)."""
    runs = sorted((where / "runs").glob("*/config.json"))
    assert runs, f"no records under {where / 'runs'}"
    rebuilt = report.make_report([p.parent for p in runs], tmp_path, PUBLISHED, figures=False)[0]
    assert rebuilt.read_bytes() == (where / "tables.md").read_bytes()


def test_confusion_figure_script_names_the_networks_it_lacks(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "confusion_table11", Path(__file__).resolve().parents[1] / "experiments" / "confusion_table11.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    make_run(tmp_path, "mlp0-mse", model="mlp0-mse", epochs=1, ipe=2, only_epochs=True)   # no checkpoint
    assert script.main([str(tmp_path), str(tmp_path / "fig.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0-layer + MSE" in err[0] and "2-layer + Relu + SCE" in err[0]
    assert not (tmp_path / "fig.png").exists()
