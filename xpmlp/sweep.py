"""Grids of training runs from TOML configs, N processes at a time, restartable.

A config names the settings shared by its runs and a grid of the ones that vary:

    out = "runs/reproduce"            # root of the run directories
    [defaults]                        # TrainConfig fields (the report's defaults if absent)
    model = "mlp2-relu-sce"
    [grid]                            # every combination of these lists is one run
    lr = [1.0, 0.1, 0.01]
    [[overrides]]                     # optional: settings for matching grid points
    when = { model = "mlp2-sigmoid-mse" }
    set = { init_std = 0.1 }

Each grid point's directory is named after its settings that differ from the
defaults, so the same point in two configs is one run.  Rerunning skips runs
whose summary says completed or diverged, resumes interrupted ones from their
checkpoint, and starts the rest.
"""
import dataclasses
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from . import rundir
from .config import TrainConfig, TrainError
from .threads import blas_threads

# Settings that do not change what a run computes: kept out of directory names.
_NOT_IN_NAME = {"model", "device", "data_dir", "eval_every", "checkpoint_every", "log_every",
                "tensorboard", "hidden", "activation", "loss"}
_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_grid(path):
    """The list of (run name, TrainConfig settings) of one TOML config, and its output root."""
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"sweep config {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainError(f"sweep config {path}: {exc}") from None
    defaults, grid = spec.get("defaults", {}), spec.get("grid", {})
    rules = spec.get("overrides", [])
    unknown = (set(defaults) | set(grid) | {k for r in rules for k in (*r.get("when", {}), *r.get("set", {}))}) - _FIELDS
    if unknown:
        raise TrainError(f"sweep config {path}: unknown settings {sorted(unknown)}")
    not_lists = [k for k, v in grid.items() if not isinstance(v, list)]
    if not_lists:
        raise TrainError(f"sweep config {path}: [grid] values must be lists, e.g. lr = [0.1]; not {not_lists}")
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        settings = dict(defaults, **dict(zip(keys, values)))
        for rule in rules:
            if all(settings.get(k) == v for k, v in rule.get("when", {}).items()):
                settings.update(rule.get("set", {}))
        try:
            TrainConfig(**settings).validate()
        except TypeError as exc:  # a value of the wrong type, e.g. lr = "0.1"
            raise TrainError(f"sweep config {path}: {settings}: {exc}") from None
        points.append((run_name(settings), settings))
    return points, spec.get("out", "runs/sweep")


def run_name(settings):
    """e.g. 'mlp2-relu-sce' or 'mlp2-relu-sce_lr=0.1': the model plus what differs from the defaults."""
    config = TrainConfig(**settings)
    default = TrainConfig()
    extra = [f"{k}={getattr(config, k)}" for k in sorted(_FIELDS - _NOT_IN_NAME)
             if getattr(config, k) != getattr(default, k)]
    return "_".join([config.name, *extra])


def run_state(run_dir, epochs=None):
    """'done' (completed or diverged at full length), 'resume' (has a checkpoint) or 'new'.
    ``epochs`` is the length the sweep asks for now (default: the run's own), so a run
    cut short by a quick ``--epochs 1`` trial is extended, not taken as done."""
    s = rundir.read_summary(run_dir)
    if s:
        if epochs is None:
            epochs = rundir.load_config(run_dir)[0].epochs
        if s["status"] == "diverged" or (s["status"] == "completed" and s["epochs_completed"] >= epochs):
            return "done"
    return "resume" if (run_dir / rundir.CHECKPOINT).exists() else "new"


def _command(run_dir, settings, state, device, data_dir):
    cmd = [sys.executable, "-m", "xpmlp", "train", "--quiet"]
    if state == "resume":
        cmd += ["--resume", str(run_dir), "--epochs", str(settings.get("epochs", TrainConfig.epochs))]
    else:
        cmd += ["--out", str(run_dir)]
        for key, value in settings.items():
            flag = "--" + key.replace("_", "-")
            if key == "hidden":
                cmd += [flag, ",".join(map(str, value))]
            elif key == "tensorboard":
                cmd += [flag] if value else []
            else:
                cmd += [flag, str(value)]
    if device:
        cmd += ["--device", device]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    return cmd


def run_sweep(config_paths, *, jobs=1, device=None, out=None, data_dir=None, epochs=None, dry_run=False):
    """Run every grid point of the configs, ``jobs`` at a time.  Returns an exit status:
    0 when every run completed or diverged, 1 when some failed."""
    from tqdm import tqdm

    if jobs < 1:
        raise TrainError("--jobs must be at least 1")
    runs = {}  # run dir -> settings; the same point in two configs runs once
    for path in config_paths:
        points, root = load_grid(path)
        for name, settings in points:
            if epochs is not None:
                settings = dict(settings, epochs=epochs)
            runs.setdefault(Path(out or root) / name, settings)
    todo = [(d, s, run_state(d, s.get("epochs", TrainConfig.epochs))) for d, s in runs.items()]
    print(f"sweep: {len(runs)} runs, {sum(st == 'done' for *_, st in todo)} already done, "
          f"{sum(st == 'resume' for *_, st in todo)} to resume; {jobs} at a time", flush=True)
    # Slowest first (small batches, deep nets), so the last runs to finish are short ones.
    todo = sorted((t for t in todo if t[2] != "done"), key=_cost, reverse=True)
    if dry_run:
        for run_dir, settings, state in todo:
            print(f"  {state:6} {run_dir}")
        return 0
    # Cap BLAS threads so jobs x threads <= cores: oversubscribed OpenBLAS slows down tenfold.
    # Within that, each run follows xpmlp's thread policy (xpmlp/threads.py: one, by default).
    threads = str(max(1, min(blas_threads(), (os.cpu_count() or 1) // jobs)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               XPMLP_THREADS=threads)
    total_epochs = sum(s.get("epochs", TrainConfig.epochs) for _, s, _ in todo)
    bar = tqdm(total=total_epochs, desc="sweep", unit="epoch", disable=None)
    finished = 0
    running, failed, pending = {}, [], list(todo)
    stop = []

    def on_signal(signum, frame):  # Ctrl-C or kill: let each run checkpoint, start nothing new
        stop.append(signum)
        for proc in running:
            proc.send_signal(signal.SIGINT)

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending and not stop) or running:
            while pending and not stop and len(running) < jobs:
                run_dir, settings, state = pending.pop(0)
                if state == "new" and run_dir.exists():
                    shutil.rmtree(run_dir)  # a start that never reached its first checkpoint
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "train.log", "a")
                proc = subprocess.Popen(_command(run_dir, settings, state, device, data_dir),
                                        stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # signals reach runs only through us
                running[proc] = (run_dir, log, 0)
                tqdm.write(f"start  {run_dir} ({state})")
            time.sleep(1.0)
            for proc, (run_dir, log, seen) in list(running.items()):
                done_epochs = _epochs_logged(run_dir / "train.log")
                bar.update(max(0, done_epochs - seen))
                running[proc] = (run_dir, log, max(seen, done_epochs))
                if proc.poll() is None:
                    continue
                log.close()
                del running[proc]
                status = _status(run_dir)
                if status in ("completed", "diverged") and proc.returncode == 0:
                    finished += 1
                    tqdm.write(f"{status:9} {run_dir}  [{finished}/{len(todo)} runs]")
                elif status == "interrupted":
                    tqdm.write(f"interrupted {run_dir} (rerun the sweep to resume it)")
                else:
                    failed.append(run_dir)
                    tqdm.write(f"FAILED {run_dir} (exit {proc.returncode}; see {run_dir / 'train.log'})")
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        bar.close()
    if stop:
        print("sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"sweep: {finished} of {len(todo)} runs finished"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else ""), flush=True)
    return 0 if finished == len(todo) else 1


def _cost(item):
    """A rough relative cost of a run, for ordering only."""
    config = TrainConfig(**item[1])
    depth = len(config.hidden) if config.hidden is not None else int(config.name[3])
    return config.epochs * (1 + depth + 100 / config.batch_size)


def _epochs_logged(log_path):
    try:
        with open(log_path) as f:
            return sum(1 for line in f if line.startswith("epoch "))
    except FileNotFoundError:
        return 0


def _status(run_dir):
    try:
        return rundir.read_summary(run_dir).get("status")
    except ValueError:  # a summary.json that is not JSON
        return None
