"""Training runs against a reference grid: tables, seed statistics, figures, compact records.

A reference file (TOML) holds tables of rows. Each row is a run config (its keys other
than `label` and the metrics, on top of [defaults]) plus the reference numbers. A table
may say how to draw it:

    [tables.t1]                       # a table of different models
    title = "..."; key = "model"
    plot = "runs"                     # one figure per run + one of all rows (with seed bands)
    run_figure = "curve_{model}.png"  # formatted with the row; run_figure_title likewise
    figure = "all.png"; figure_title = "..."
    [tables.t2]                       # a sweep
    plot = "epochs"                   # one figure, per-epoch means, a line per row

A run directory holds config.json, summary.json (absent while a run is going) and
metrics.jsonl (iteration and epoch records) or, as a committed record made by
`export_records`, epochs.jsonl (epoch records) and curve.npy (window means of the
iteration records). Several runs of a row that differ only in their seed are its seeds:
the tables give the lowest seed's numbers and, where a row has more than one, the mean,
standard deviation and range over seeds.
"""
from __future__ import annotations

import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .config import TrainError, read_toml

METRICS = ("train_time_s", "train_loss", "train_acc", "test_loss", "test_acc")
COLUMNS = {"train_time_s": "Train Time (s)", "train_loss": "Train Loss",
           "train_acc": "Train Accuracy (%)", "test_loss": "Test Loss",
           "test_acc": "Test Accuracy (%)"}
STATUS_RANK = {"completed": 0, "diverged": 1}     # anything else (interrupted, running) after
RECORD_FILES = ("config.json", "summary.json", "epochs.jsonl", "curve.npy")
NAN = float("nan")


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)   # {"kind": "epoch", ...} records
    iters: list = field(default_factory=list)    # {"iter", "loss", "acc"} records (may be empty)
    iter_window: int = 1                          # iterations averaged into each of `iters`

    @property
    def status(self) -> str:
        return self.summary.get("status") or "running/unfinished"

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def metric(self, key: str) -> float:
        """Final value of a metric: summary.json, else the last epoch record; nan if null."""
        src = self.summary if key in self.summary else (self.epochs[-1] if self.epochs else {})
        return _num(src.get(key))


def _num(v) -> float:
    return NAN if v is None else float(v)


def load_reference(path) -> dict:
    """The reference tables (e.g. a report's published numbers) from a TOML file, checked
    for the shape this module reads: anything else is a TrainError naming the file."""
    reference = read_toml(path, "reference tables")
    problem = _reference_problem(reference)
    if problem:
        raise TrainError(f"{path}: {problem}")
    return reference


def _reference_problem(reference) -> str | None:
    """What makes ``reference`` unlike the format at the top of this module, or None."""
    if not isinstance(reference.get("defaults", {}), dict):
        return "[defaults] must be a table of run settings"
    tables = reference.get("tables")
    if not isinstance(tables, dict) or not tables or not all(isinstance(t, dict) for t in tables.values()):
        return "needs [tables.NAME] tables, each with [[tables.NAME.rows]]"
    if not isinstance(reference.get("title", ""), str):
        return "title must be a string"
    for name, table in tables.items():
        rows = table.get("rows")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("label"), str)
                                                 for r in rows):
            return f"tables.{name}: rows must be a list of tables, each with a label string"
        for row in rows:
            bad = [k for k in METRICS if k in row and not _is_number(row[k])]
            if bad:
                return f"tables.{name}, row {row['label']!r}: {bad[0]} must be a number"
        if "plot" not in table:
            continue
        names = {"runs": ("figure", "figure_title", "run_figure", "run_figure_title"),
                 "epochs": ("figure", "figure_title")}.get(table["plot"])
        if names is None:
            return f"tables.{name}: plot must be 'runs' or 'epochs', not {table['plot']!r}"
        for key in names:
            if not isinstance(table.get(key), str):
                return f"tables.{name}: plot = {table['plot']!r} needs {key} (a string)"
            try:
                texts = [table[key].format(**row) for row in rows]
            except (KeyError, IndexError, ValueError, AttributeError) as exc:
                return f"tables.{name}: {key} {table[key]!r} does not format with a row ({exc!r})"
            # a figure is written into --out, never elsewhere
            if key in ("figure", "run_figure") and any(
                    Path(t).name != t or t in ("", ".", "..") for t in texts):
                return f"tables.{name}: {key} must be a file name without a directory, not {table[key]!r}"
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_run(run_dir) -> Run:
    d = Path(run_dir)
    try:  # a file that is a directory, or unreadable: one line naming it
        config, summary = rundir.read_json(d / rundir.CONFIG), rundir.read_summary(d)
        recs = rundir.read_records(d)
        curve = _read_curve(d / "curve.npy") if (d / "curve.npy").exists() else None
    except OSError as exc:
        raise TrainError(f"{exc.filename or d}: cannot read it ({exc.strerror or exc})") from None
    epochs = rundir.epoch_records(recs)
    iters = [r for r in recs if r.get("kind") == "iter"]
    window = int(config.get("log_every", 1))
    if not iters and curve is not None:
        iters = [{"iter": int(i), "loss": float(l), "acc": float(a)} for i, l, a in curve]
        window = int(curve[1, 0] - curve[0, 0]) if len(curve) > 1 else 1
    return Run(d, config, summary, epochs, iters, window)


def _read_curve(path):
    """curve.npy of a record: (n, 3) numbers, rows of (last iteration of the window, loss, acc).
    Memory-mapped first, so that a header claiming more than the file holds, or objects,
    is refused before anything is read."""
    import numpy as np

    try:
        curve = np.load(path, mmap_mode="r")
        ok = isinstance(curve, np.ndarray) and curve.dtype.kind in "iuf" and curve.ndim == 2 \
            and curve.shape[1] == 3
        curve = np.array(curve) if ok else None
    except (ValueError, EOFError) as exc:  # not an .npy, cut short, or object arrays
        raise TrainError(f"{path}: not a curve record ({exc})") from None
    if curve is None:
        raise TrainError(f"{path}: not a curve record (expected an (n, 3) array of numbers)")
    return curve


def load_runs(run_dirs) -> list[Run]:
    return [load_run(d) for d in run_dirs if (Path(d) / rundir.CONFIG).exists()]


def row_config(reference: dict, row: dict) -> dict:
    """The run config of a table row: the defaults updated with the row's config keys."""
    cfg = dict(reference.get("defaults", {}))
    cfg.update({k: v for k, v in row.items()
                if k != "label" and k not in METRICS and not k.startswith("_")})
    return cfg


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def match_seeds(reference: dict, runs, ignore=()) -> dict:
    """{table: [(row, [Run, ...]), ...]}: every run whose config equals the row's on each
    of its keys (keys in `ignore`, e.g. ("epochs",), skipped), one per seed, lowest seed
    first. Among runs of one seed the completed one wins, then diverged, then the rest;
    ties go by directory name, so the choice never depends on file times."""
    out = {}
    for name, table in reference["tables"].items():
        out[name] = []
        for row in table["rows"]:
            row = {**row, "_title": table.get("title", name)}   # a copy, for write_tables
            want = {k: v for k, v in row_config(reference, row).items() if k not in ignore}
            cands = sorted((r for r in runs if all(k in r.config and _same(r.config[k], v)
                                                   for k, v in want.items())),
                           key=lambda r: (r.seed, STATUS_RANK.get(r.summary.get("status"), 2), r.path.name))
            by_seed = {}
            for r in cands:
                by_seed.setdefault(r.seed, r)
            out[name].append((row, list(by_seed.values())))
    return out


def lowest_seeds(seeded: dict) -> dict:
    """{table: [(row, Run | None), ...]}: the lowest seed's run of each row of match_seeds."""
    return {t: [(row, rs[0] if rs else None) for row, rs in pairs] for t, pairs in seeded.items()}


def match_runs(reference: dict, runs, ignore=()) -> dict:
    """{table: [(row, Run | None), ...]}: the lowest seed's run of each row (see match_seeds)."""
    return lowest_seeds(match_seeds(reference, runs, ignore))


# ----------------------------------------------------------------------------- tables
def _fmt(key: str, v: float) -> str:
    if math.isnan(v):
        return "nan"
    if key == "train_time_s":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    return f"{v * 100:.2f}" if key.endswith("_acc") else f"{v:.4f}"


def _cell(key: str, ours: float | None, rep: float) -> str:
    if ours is None:
        return f"— ({_fmt(key, rep)})"
    s = f"{_fmt(key, ours)} ({_fmt(key, rep)}"
    if math.isfinite(ours) and math.isfinite(rep):
        if key == "train_time_s":
            s += f", ×{ours / rep:.2g}" if rep else ""
        else:
            d = ours - rep
            s += f", {d * 100:+.2f}" if key.endswith("_acc") else f", {d:+.4f}"
    return s + ")"


def seed_stats(values) -> dict | None:
    """mean, sample standard deviation, min and max of the finite values (None if fewer than 2)."""
    v = [x for x in values if math.isfinite(x)]
    if len(v) < 2:
        return None
    return {"n": len(v), "mean": statistics.fmean(v), "std": statistics.stdev(v),
            "min": min(v), "max": max(v)}


def _seed_cell(key: str, values, rep: float) -> str:
    """'mean ± std [min, max] (reference, z)': z = how many of our standard deviations the
    reference lies from our mean."""
    s = seed_stats(values)
    if s is None:
        return "—"
    scale = 100 if key.endswith("_acc") else 1
    digits = 2 if key.endswith("_acc") else 4
    cell = (f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
            f"[{s['min'] * scale:.{digits}f}, {s['max'] * scale:.{digits}f}] ({_fmt(key, rep)}")
    if math.isfinite(rep) and s["std"] > 0:
        cell += f", z {(rep - s['mean']) / s['std']:+.1f}"
    return cell + ")"


def _tail(run: Run | None, k: int = 10) -> str:
    """Test accuracy over the last k evaluated epochs, 'mean [min, max]' in %: without a
    decaying learning rate the final epoch is one noisy sample of this range."""
    accs = [e["test_acc"] for e in (run.epochs if run else []) if e.get("test_acc") is not None][-k:]
    if not accs:
        return "—"
    return f"{100 * sum(accs) / len(accs):.2f} [{100 * min(accs):.2f}, {100 * max(accs):.2f}]"


def _device(run: Run) -> str:
    used = run.config.get("device_used") or {}
    if isinstance(used, dict) and used:
        parts = [str(used[k]) for k in ("backend", "device", "device_name") if used.get(k)]
        return " ".join(parts)
    return str(run.config.get("device", "?"))


def _notes(pairs) -> list[str]:
    rs = [(row, r) for row, r in pairs if r is not None]
    if not rs:
        return ["_No run matched this table._"]
    devs = sorted({_device(r) for _, r in rs})
    dts = sorted({str(r.config.get("dtype", "?")) for _, r in rs})
    conf = sorted({str(r.config.get("epochs", "?")) for _, r in rs})
    done = sorted({int(r.summary.get("epochs_completed", len(r.epochs))) for _, r in rs})
    lines = [f"Runs: {len(rs)} of {len(pairs)} rows. Device: {', '.join(devs)}. "
             f"Dtype: {', '.join(dts)}. Epochs: {', '.join(conf)} configured, "
             f"{', '.join(map(str, done))} completed."]
    for row, r in rs:
        if r.status != "completed":
            lines.append(f"- {row['label']}: **{r.status}** after "
                         f"{r.summary.get('epochs_completed', len(r.epochs))} epoch(s) "
                         f"(`{r.path.name}`)")
    return lines


def _seed_section(title: str, keys, seeded) -> list[str]:
    """A table of mean ± std [min, max] over seeds, for the rows run with several seeds."""
    rows = [(row, rs) for row, rs in seeded if len(rs) > 1]
    if not rows:
        return []
    keys = [k for k in keys if k != "train_time_s"]
    lines = [f"### {title}: over seeds", "",
             "Each cell: **mean ± standard deviation [min, max] over seeds (report, z)**, z = "
             "(report − our mean) / our standard deviation.", "",
             "| Row | Seeds | " + " | ".join(COLUMNS[k] for k in keys) + " |",
             "|---|---|" + "---:|" * len(keys)]
    for row, rs in rows:
        cells = [_seed_cell(k, [r.metric(k) for r in rs], _num(row.get(k))) for k in keys]
        lines.append(f"| {row['label']} | {', '.join(str(r.seed) for r in rs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_tables(seeded: dict, out_dir, runs, title="Runs vs. the reference tables") -> Path:
    """tables.md: per table, the lowest seed's run of each row against the reference, and
    where rows have several seeds, their statistics. Depends only on the records read."""
    matched = lowest_seeds(seeded)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_rows = sum(len(p) for p in matched.values())
    n_hit = sum(r is not None for p in matched.values() for _, r in p)
    used = {id(r) for p in seeded.values() for _, rs in p for r in rs}
    lines = [f"# {title}", "",
             f"{n_hit} of {n_rows} grid rows have a run ({len(runs)} run directories read, "
             f"{sum(id(r) not in used for r in runs)} matched no row).", "",
             "Each cell: **ours (report, Δ = ours − report)**; accuracies in %, Δ in points; "
             "train time Δ is the ratio ours/report. `—` = not run. The last-10-epochs column "
             "gives our test accuracy's mean [min, max] over the final 10 epochs. Where a row "
             "was run with several seeds, these columns give the lowest seed's run.", ""]
    for name, pairs in matched.items():
        table_title = pairs[0][0].get("_title", name) if pairs else name
        keys = [k for k in METRICS if any(k in row for row, _ in pairs)]
        lines += [f"## {table_title}", "", "| Row | " + " | ".join(COLUMNS[k] for k in keys)
                  + " | Test Acc., last 10 epochs (%) | Run |",
                  "|---|" + "---:|" * (len(keys) + 1) + "---|"]
        for row, r in pairs:
            cells = [_cell(k, None if r is None else r.metric(k), _num(row.get(k))) for k in keys]
            run = "— (not run)" if r is None else f"`{r.path.name}` ({r.status})"
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {_tail(r)} | {run} |")
        lines += [""] + _notes(pairs) + [""] + _seed_section(table_title, keys, seeded[name])
    path = out / "tables.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _curve(run: Run, window: int = 1):
    """(x = iteration, loss, acc): iteration records averaged over `window`, else epoch records."""
    if run.iters:   # group by iteration number: records may be logged every k iterations
        groups: dict[int, list] = {}
        for r in run.iters:
            groups.setdefault((r["iter"] - 1) // window, []).append(r)
        gs = [groups[k] for k in sorted(groups)]
        return ([g[-1]["iter"] for g in gs],
                *[[_nanmean(_num(r.get(f)) for r in g) for g in gs] for f in ("loss", "acc")])
    return ([r["iter"] for r in run.epochs], [_num(r.get("train_loss")) for r in run.epochs],
            [_num(r.get("train_acc")) for r in run.epochs])


def _nanmean(vals) -> float:
    v = [x for x in vals if math.isfinite(x)]
    return sum(v) / len(v) if v else NAN


def _per_epoch(run: Run):
    """(epoch, train loss, train acc) per epoch: epoch records, else means of iteration records."""
    if run.epochs:
        return ([r["epoch"] for r in run.epochs], [_num(r.get("train_loss")) for r in run.epochs],
                [_num(r.get("train_acc")) for r in run.epochs])
    eps = sorted({r["epoch"] for r in run.iters})
    return (eps, *[[_nanmean(_num(r.get(k)) for r in run.iters if r["epoch"] == e) for e in eps]
                   for k in ("loss", "acc")])


def _label(row: dict, run: Run, loss) -> str:
    bad = run.status == "diverged" or any(not math.isfinite(v) for v in loss)
    return row["label"] + (" (diverged)" if bad else "")


def _two_panels(plt, title: str, xlabel: str):
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.suptitle(title)
    a.set(xlabel=xlabel, ylabel="loss", yscale="log", title="Loss")
    b.set(xlabel=xlabel, ylabel="accuracy (%)", title="Accuracy")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig, a, b


def _lines(a, b, x, loss, acc, *fmt, **kw):
    """Loss on panel a, accuracy (in %) on panel b; nan points leave gaps."""
    a.plot(x, loss, *fmt, **kw)
    b.plot(x, [v * 100 for v in acc], *fmt, **kw)


def _save(plt, fig, path: Path, out: list):
    for ax in fig.axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    out.append(path)


def _run_figure(plt, path: Path, title: str, r: Run, written: list):
    """One run: its training curve against iterations and its test metrics per epoch."""
    fig, a, b = _two_panels(plt, title, "iteration")
    what = "per iteration" if r.iter_window == 1 else f"mean of {r.iter_window} iterations"
    _lines(a, b, *_curve(r), lw=0.4, alpha=0.35 if r.iters else 1.0, color="tab:blue",
           label=f"train ({what})" if r.iters else "train (epoch mean)")
    if r.iters:  # the raw curve is a band of noise: draw its running mean on top
        _lines(a, b, *_curve(r, window=100), lw=1.2, color="navy", label="train (mean of 100 iterations)")
    ev = [e for e in r.epochs if (e.get("test_acc"), e.get("test_loss")) != (None, None)]
    _lines(a, b, [e["iter"] for e in ev], [_num(e.get("test_loss")) for e in ev],
           [_num(e.get("test_acc")) for e in ev], "o", ms=3, color="tab:orange", label="test (per epoch)")
    _save(plt, fig, path, written)


def _all_runs_figure(plt, path: Path, title: str, seeded, written: list):
    """Every row's training curve (mean over 100 iterations); a row with several seeds is
    drawn as the mean over seeds inside a band from their minimum to their maximum."""
    fig, a, b = _two_panels(plt, title, "iteration")
    for i, (row, rs) in enumerate(seeded):
        curves = [_curve(r, window=100) for r in rs]
        n = min(len(c[0]) for c in curves)
        x = curves[0][0][:n]
        loss = [_nanmean(c[1][j] for c in curves) for j in range(n)]
        acc = [_nanmean(c[2][j] for c in curves) for j in range(n)]
        label = _label(row, rs[0], loss) + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
        _lines(a, b, x, loss, acc, lw=1, color=f"C{i}", label=label)
        if len(rs) > 1:
            for ax, k, scale in ((a, 1, 1), (b, 2, 100)):
                lo = [min(c[k][j] for c in curves) * scale for j in range(n)]
                hi = [max(c[k][j] for c in curves) * scale for j in range(n)]
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
    _save(plt, fig, path, written)


def _epochs_figure(plt, path: Path, title: str, pairs, written: list):
    """A sweep: per-epoch train curves, one line per row (x = epoch, since iterations per
    epoch differ between batch sizes)."""
    cmap = plt.get_cmap("viridis")
    fig, a, b = _two_panels(plt, title, "epoch")
    sane = []  # losses of the runs that did not diverge: they set the y range
    for i, (row, r) in enumerate(pairs):
        x, loss, acc = _per_epoch(r)
        label = _label(row, r, loss)
        _lines(a, b, x, loss, acc, color=cmap(i / max(1, len(pairs) - 1)), marker=".", label=label)
        if not label.endswith("(diverged)"):
            sane += [v for v in loss if math.isfinite(v) and v > 0]
    if sane:  # a diverging run's 1e30 losses would flatten every other curve
        a.set_ylim(min(sane) / 1.5, max(sane) * 1.5)
    _save(plt, fig, path, written)


def write_figures(reference: dict, seeded: dict, out_dir) -> list[Path]:
    """The figures each reference table asks for (its `plot`, `figure` and `run_figure`)."""
    plt, out_dir, written = _plt(), Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in reference["tables"].items():
        pairs = [(row, rs) for row, rs in seeded.get(name, []) if rs]
        if not pairs or "plot" not in table:
            continue
        if table["plot"] == "runs":
            for row, rs in pairs:
                _run_figure(plt, out_dir / table["run_figure"].format(**row),
                            table["run_figure_title"].format(**row) + f" ({rs[0].path.name})", rs[0], written)
            _all_runs_figure(plt, out_dir / table["figure"], table["figure_title"], pairs, written)
        elif table["plot"] == "epochs":
            _epochs_figure(plt, out_dir / table["figure"], table["figure_title"],
                           [(row, rs[0]) for row, rs in pairs], written)
        else:
            raise ValueError(f"table {name}: plot must be 'runs' or 'epochs', not {table['plot']!r}")
    return written


def make_report(run_dirs, out_dir, reference_path, ignore=(), figures=True) -> list[Path]:
    """Load the runs, match them to the reference grid, write tables.md and the figures."""
    reference = load_reference(reference_path)
    runs = load_runs(run_dirs)
    seeded = match_seeds(reference, runs, ignore=ignore)
    title = reference.get("title", "Runs vs. the reference tables")
    tables = write_tables(seeded, out_dir, runs, title=title)
    return [tables, *(write_figures(reference, seeded, out_dir) if figures else [])]


# ----------------------------------------------------------------------------- your own runs
# Settings of a run that say where or how it was watched, not what it trained.
NOT_COMPARED = ("device", "data_dir", "eval_every", "checkpoint_every", "log_every", "tensorboard")


def _best(run: Run, key: str):
    """(best value, its epoch) of an epoch metric over a run's records; (nan, None) if none."""
    found = [(r[key], r["epoch"]) for r in run.epochs if r.get(key) is not None and math.isfinite(r[key])]
    return max(found, key=lambda p: (p[0], -p[1])) if found else (NAN, None)


def _setting(v) -> str:
    return "—" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v)


def runs_table(runs) -> str:
    """A markdown table of any runs (a user's own grid): a row each, the settings that differ
    between them, the final metrics, the best test (and validation) accuracy with its epoch,
    and the training time."""
    import dataclasses

    from .config import TrainConfig

    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_COMPARED + ("model",)]
    value = {k: [json.dumps(r.config.get(k, getattr(TrainConfig, k, None))) for r in runs] for k in keys}
    differ = [k for k in keys if len(set(value[k])) > 1]
    has_val = any(r.epochs and "val_acc" in r.epochs[-1] for r in runs)
    head = ["run", "model", *differ, "status", "epochs done", "train loss", "train acc (%)", "test loss",
            "test acc (%)", "best test acc (%) @ epoch"]
    if has_val:
        head += ["val acc (%)", "best val acc (%) @ epoch"]
    head.append("train time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(runs):
        shown = [_setting(json.loads(value[k][i])) for k in differ]
        cells = [f"`{r.path.name}`", str(r.config.get("model", "?")), *shown, r.status,
                 str(r.summary.get("epochs_completed", len(r.epochs)))]
        cells += [_fmt(k, r.metric(k)) for k in ("train_loss", "train_acc", "test_loss", "test_acc")]
        best, epoch = _best(r, "test_acc")
        cells.append(f"{_fmt('test_acc', best)} @ {epoch}" if epoch else "nan")
        if has_val:
            best, epoch = _best(r, "val_acc")
            cells += [_fmt("val_acc", r.metric("val_acc")), f"{_fmt('val_acc', best)} @ {epoch}" if epoch else "nan"]
        cells.append(_fmt("train_time_s", r.metric("train_time_s")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- records
def compact_curve(iters, max_points: int = 6000):
    """The iteration records as an (n, 3) float32 array of window means: the window's last
    iteration, mean loss, mean accuracy (finite values only). The window is 10 iterations,
    or a larger multiple of 10 so that a long run keeps at most `max_points` rows."""
    import numpy as np

    window = 10 * max(1, math.ceil(len(iters) / (10 * max_points)))
    rows = []
    for start in range(0, len(iters), window):
        group = iters[start:start + window]
        rows.append((group[-1]["iter"], _nanmean(_num(r.get("loss")) for r in group),
                     _nanmean(_num(r.get("acc")) for r in group)))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 3)


def export_records(run_dirs, out_dir) -> list[Path]:
    """Write each run's record to out_dir/runs/<run name>: config.json, summary.json, its
    epoch records as epochs.jsonl and its iteration curve as curve.npy (compact_curve); no
    checkpoints. Each file is written atomically; a record is replaced only as a whole
    set of files from one reading of the run."""
    import numpy as np

    written = []
    for d in map(Path, run_dirs):
        run = load_run(d)
        dest = Path(out_dir) / "runs" / d.name
        dest.mkdir(parents=True, exist_ok=True)
        files = {name: (d / name).read_bytes() for name in (rundir.CONFIG, rundir.SUMMARY)
                 if (d / name).exists()}
        files[rundir.EPOCHS_COPY] = "".join(rundir.json_line(r) + "\n" for r in run.epochs).encode()
        if run.iters:
            buf = io.BytesIO()
            np.save(buf, compact_curve(run.iters))
            files["curve.npy"] = buf.getvalue()
        for name, data in files.items():
            rundir.atomic_write_bytes(dest / name, data)
        written.append(dest)
    return written
