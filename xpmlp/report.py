"""Compare training runs with the report's published Tables 11-14 (tables.md and figures).

A run directory holds config.json, summary.json (absent while a run is going) and
metrics.jsonl (iteration and epoch records) or, in a committed results copy, only
epochs.jsonl (epoch records). The published numbers live in experiments/published.toml.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("train_time_s", "train_loss", "train_acc", "test_loss", "test_acc")
COLUMNS = {"train_time_s": "Train Time (s)", "train_loss": "Train Loss",
           "train_acc": "Train Accuracy (%)", "test_loss": "Test Loss",
           "test_acc": "Test Accuracy (%)"}
STATUS_RANK = {"completed": 0, "diverged": 1}     # anything else (interrupted, running) after
SWEEPS = {"table12": (4, "fig4_learning_rate.png", "learning rates"),
          "table13": (5, "fig5_momentum.png", "momentums"),
          "table14": (6, "fig6_batch_size.png", "batch sizes")}
NAN = float("nan")


@dataclass
class Run:
    path: Path
    config: dict
    summary: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)   # {"kind": "epoch", ...} records
    iters: list = field(default_factory=list)    # {"kind": "iter", ...} records (may be empty)

    @property
    def status(self) -> str:
        return self.summary.get("status") or "running/unfinished"

    def metric(self, key: str) -> float:
        """Final value of a metric: summary.json, else the last epoch record; nan if null."""
        src = self.summary if key in self.summary else (self.epochs[-1] if self.epochs else {})
        return _num(src.get(key))


def _num(v) -> float:
    return NAN if v is None else float(v)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:   # blank or half-written last line of a live run
            continue
    return out


PUBLISHED = Path(__file__).resolve().parents[1] / "experiments/published.toml"


def load_published(path=None) -> dict:
    """The report's Tables 11-14 (default: experiments/published.toml in the repo)."""
    with open(Path(path) if path else PUBLISHED, "rb") as f:
        return tomllib.load(f)


def load_run(run_dir) -> Run:
    d = Path(run_dir)
    config = json.loads((d / "config.json").read_text())
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    name = "metrics.jsonl" if (d / "metrics.jsonl").exists() else "epochs.jsonl"
    recs = _read_jsonl(d / name) if (d / name).exists() else []
    epochs = [r for r in recs if r.get("kind", "epoch") == "epoch"]
    iters = [r for r in recs if r.get("kind") == "iter"]
    return Run(d, config, summary, epochs, iters)


def row_config(published: dict, row: dict) -> dict:
    """The run config of a table row: the defaults updated with the row's config keys."""
    cfg = dict(published["defaults"])
    cfg.update({k: v for k, v in row.items()
                if k != "label" and k not in METRICS and not k.startswith("_")})
    return cfg


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _mtime(run: Run) -> float:
    p = run.path / "summary.json"
    return (p if p.exists() else run.path).stat().st_mtime


def match_runs(published: dict, runs, ignore=()) -> dict:
    """{table: [(row, Run | None), ...]}. A run matches a row when its config equals the row's
    config on every key (keys in `ignore`, e.g. ("epochs",), are skipped). Among several, the
    completed one wins (then diverged, then the rest); ties go to the newest."""
    out = {}
    for name, table in published["tables"].items():
        out[name] = []
        for row in table["rows"]:
            row = {**row, "_title": table.get("title", name)}   # a copy, for write_tables
            want = {k: v for k, v in row_config(published, row).items() if k not in ignore}
            cands = [r for r in runs if all(k in r.config and _same(r.config[k], v)
                                            for k, v in want.items())]
            cands.sort(key=lambda r: (STATUS_RANK.get(r.summary.get("status"), 2), -_mtime(r)))
            out[name].append((row, cands[0] if cands else None))
    return out


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


def write_tables(matched: dict, out_dir, runs) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_rows = sum(len(p) for p in matched.values())
    n_hit = sum(r is not None for p in matched.values() for _, r in p)
    used = {id(r) for p in matched.values() for _, r in p if r is not None}
    lines = ["# Reproduction vs. the report (Tables 11-14)", "",
             f"{n_hit} of {n_rows} grid rows have a run ({len(runs)} run directories read, "
             f"{sum(id(r) not in used for r in runs)} matched no row).", "",
             "Each cell: **ours (report, Δ = ours − report)**; accuracies in %, Δ in points; "
             "train time Δ is the ratio ours/report. `—` = not run. The last-10-epochs column "
             "gives our test accuracy's mean [min, max] over the final 10 epochs.", ""]
    for name, pairs in matched.items():
        title = pairs[0][0].get("_title", name) if pairs else name
        keys = [k for k in METRICS if any(k in row for row, _ in pairs)]
        lines += [f"## {title}", "", "| Row | " + " | ".join(COLUMNS[k] for k in keys)
                  + " | Test Acc., last 10 epochs (%) | Run |",
                  "|---|" + "---:|" * (len(keys) + 1) + "---|"]
        for row, r in pairs:
            cells = [_cell(k, None if r is None else r.metric(k), _num(row[k])) for k in keys]
            run = "— (not run)" if r is None else f"`{r.path.name}` ({r.status})"
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {_tail(r)} | {run} |")
        lines += [""] + _notes(pairs) + [""]
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


def write_figures(matched: dict, runs, out_dir) -> list[Path]:
    plt, out_dir, written = _plt(), Path(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    t11 = [(row, r) for row, r in matched.get("table11", []) if r is not None]
    for row, r in t11:   # Figure 2: one per network
        fig, a, b = _two_panels(plt, f"Figure 2: {row['label']} ({r.path.name})", "iteration")
        _lines(a, b, *_curve(r), lw=0.4, alpha=0.35 if r.iters else 1.0, color="tab:blue",
               label="train (per iteration)" if r.iters else "train (epoch mean)")
        if r.iters:  # the raw curve is a band of noise: draw its running mean on top
            _lines(a, b, *_curve(r, window=100), lw=1.2, color="navy", label="train (mean of 100 iterations)")
        ev = [e for e in r.epochs if (e.get("test_acc"), e.get("test_loss")) != (None, None)]
        _lines(a, b, [e["iter"] for e in ev], [_num(e.get("test_loss")) for e in ev],
               [_num(e.get("test_acc")) for e in ev], "o", ms=3, color="tab:orange", label="test (per epoch)")
        _save(plt, fig, out_dir / f"fig2_{row['model']}.png", written)
    if t11:   # Figure 3: all networks, down-sampled
        fig, a, b = _two_panels(plt, "Figure 3: training of the ten networks "
                                "(train, mean over 100 iterations)", "iteration")
        for row, r in t11:
            x, loss, acc = _curve(r, window=100)
            _lines(a, b, x, loss, acc, lw=1, label=_label(row, r, loss))
        _save(plt, fig, out_dir / "fig3_all_models.png", written)
    cmap = plt.get_cmap("viridis")
    for name, (num, fname, what) in SWEEPS.items():   # Figures 4-6: x = epoch, since
        # iterations per epoch differ between batch sizes; all three sweeps alike.
        pairs = [(row, r) for row, r in matched.get(name, []) if r is not None]
        if not pairs:
            continue
        fig, a, b = _two_panels(plt, f"Figure {num}: training with different {what} "
                                "(2-layer + Relu + SCE; mean over each epoch)", "epoch")
        sane = []  # losses of the runs that did not diverge: they set the y range
        for i, (row, r) in enumerate(pairs):
            x, loss, acc = _per_epoch(r)
            label = _label(row, r, loss)
            _lines(a, b, x, loss, acc, color=cmap(i / max(1, len(pairs) - 1)), marker=".", label=label)
            if not label.endswith("(diverged)"):
                sane += [v for v in loss if math.isfinite(v) and v > 0]
        if sane:  # a diverging run's 1e30 losses would flatten every other curve
            a.set_ylim(min(sane) / 1.5, max(sane) * 1.5)
        _save(plt, fig, out_dir / fname, written)
    return written


def make_report(run_dirs, out_dir, published_path=None, ignore=()) -> list[Path]:
    """Load the runs, match them to the published grid, write tables.md and the figures."""
    published = load_published(published_path)
    runs = [load_run(d) for d in run_dirs if (Path(d) / "config.json").exists()]
    matched = match_runs(published, runs, ignore=ignore)
    return [write_tables(matched, out_dir, runs), *write_figures(matched, runs, out_dir)]


def export_runs(run_dirs, out_dir) -> list[Path]:
    """Copy each run's light records (config.json, summary.json and its epoch records as
    epochs.jsonl; no checkpoints, no per-iteration logs) to out_dir/runs/<run name>."""
    written = []
    for d in map(Path, run_dirs):
        run = load_run(d)
        dest = Path(out_dir) / "runs" / d.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "summary.json"):
            if (d / name).exists():
                (dest / name).write_bytes((d / name).read_bytes())
        (dest / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.epochs))
        written.append(dest)
    return written
