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
checkpoint, and starts the rest; runs that another live process holds (another sweep)
are skipped, and said so.  Every grid point is checked before any run starts, and a
killed sweep's runs end with it.

With ``stack=True`` the points that share architecture, batch size, dtype, epochs,
device and run settings train as stacked groups (stack.py) in this process, one group
at a time, MNIST loaded once; each group's checkpoint lives in ``<out>/.stacks/``.

An executor runs the units of work (single runs, and stacked groups): LocalExecutor
(local.py), ``jobs`` ``xpmlp train`` processes at a time, or RayExecutor (ray_executor.py),
one task per unit on a local Ray instance or a cluster; the sweep calls either the same way.
The plan (plan.py) and the units of work (units.py) are the executors' common ground.
"""
import os
import sys
from pathlib import Path

from .. import rundir
from ..config import TrainConfig, TrainError
from .local import LocalExecutor
from .plan import _check_point, _cost, load_grid, plan_stacks, run_name, run_state
from .ray_executor import RayExecutor
from .units import run_stack_group

__all__ = ["LocalExecutor", "RayExecutor", "load_grid", "plan_stacks", "run_name", "run_state", "run_stack_group",
           "run_sweep"]


def run_sweep(config_paths, *, executor=None, device=None, out=None, data_dir=None, epochs=None, dry_run=False,
              stack=False, max_stack=None):
    """Run every grid point of the configs (``stack``: in stacked groups of at most
    ``max_stack`` models) with ``executor`` (default: LocalExecutor(jobs=1)).  Returns an exit
    status: 0 when every run completed or diverged, 1 when some failed, 130 when interrupted."""
    executor = executor or LocalExecutor()
    device = executor.device(device)
    if not dry_run:
        executor.check()
    if max_stack is not None and max_stack < 1:
        raise TrainError("--max-stack must be at least 1")
    runs = {}  # run dir -> settings; the same point in two configs runs once
    given = {k: v for k, v in dict(epochs=epochs, device=device, data_dir=data_dir).items() if v is not None}
    for path in config_paths:
        points, root = load_grid(path)
        for name, settings in points:
            if given:  # the command line's settings are checked at every point, before any run
                settings = dict(settings, **given)
                _check_point("sweep", settings)
            runs.setdefault(Path(out or root) / name, settings)
    if not dry_run:  # every output root, before any run starts (a dry run writes nothing)
        for root in dict.fromkeys(d.parent for d in runs):
            _writable_root(root)
    todo = [(d, s, run_state(d, s.get("epochs", TrainConfig.epochs))) for d, s in runs.items()]
    busy = [d for d, _, st in todo if st == "busy"]
    print(f"sweep: {len(runs)} runs, {sum(st == 'done' for *_, st in todo)} already done, "
          f"{sum(st == 'resume' for *_, st in todo)} to resume; {executor.describe()}", flush=True)
    for run_dir in busy:
        print(f"skip   {run_dir}: in use by process {rundir.lock_holder(run_dir) or '?'}", flush=True)
    groups = []
    if stack:
        groups, todo = plan_stacks(todo, max_stack, device)
    # Slowest first (small batches, deep nets), so the last runs to finish are short ones.
    todo = sorted((t for t in todo if t[2] not in ("done", "busy")), key=_cost, reverse=True)
    if dry_run:
        for group_dir, members, state in groups:
            print(f"  stack {state:6} {group_dir} ({len(members)} runs: {', '.join(d.name for d, _ in members)})")
        for run_dir, settings, state in todo:
            print(f"  {state:6} {run_dir}")
        return 0
    busy_at_start = len(busy)
    finished, failed, stopped = executor.run(groups, todo, busy=busy, device=device, data_dir=data_dir)
    if stopped:
        print("sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    total = len(todo) + sum(len(members) for _, members, _ in groups) + busy_at_start
    print(f"sweep: {finished} of {total} runs finished"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else "")
          + (f"; skipped {len(busy)} in use by another process" if busy else ""), flush=True)
    return 0 if finished == total else 1


def _writable_root(root):
    """``root``, created if need be, once a file could be written there; else a TrainError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"sweep: cannot write runs under {root} ({exc.strerror or exc})") from None
