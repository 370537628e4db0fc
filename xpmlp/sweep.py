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

An executor runs the units of work (single runs, and stacked groups): the local one,
``jobs`` ``xpmlp train`` processes at a time, or Ray (``executor="ray"``, sweep_ray.py),
one task per unit on a local Ray instance or a cluster.
"""
import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

from . import rundir
from .config import TrainConfig, TrainError
from .threads import blas_threads, limit_blas_threads, step_threads

# Settings that do not change what a run computes: kept out of directory names.
_NOT_IN_NAME = {"model", "device", "data_dir", "eval_every", "checkpoint_every", "log_every",
                "tensorboard", "hidden", "activation", "loss"}
_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
PARENT_ENV = "XPMLP_SWEEP_PARENT"  # set for a sweep's runs: the driver's pid
PIPE_ENV = "XPMLP_SWEEP_STDIN"  # set where a run's stdin is a pipe from the driver, held open while it lives
# Linux ends a run at its sweep's death by a signal (PR_SET_PDEATHSIG); elsewhere the run
# watches the pipe (die_with_parent).
_PDEATHSIG = sys.platform.startswith("linux")


def load_grid(path):
    """The list of (run name, TrainConfig settings) of one TOML config, and its output root."""
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"sweep config {path} not found") from None
    except IsADirectoryError:
        raise TrainError(f"sweep config {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise TrainError(f"sweep config {path}: not a text file (TOML is UTF-8)") from None
    except OSError as exc:
        raise TrainError(f"sweep config {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrainError(f"sweep config {path}: {exc}") from None
    defaults, grid = spec.get("defaults", {}), spec.get("grid", {})
    rules = spec.get("overrides", [])
    if not isinstance(defaults, dict) or not isinstance(grid, dict):
        raise TrainError(f"sweep config {path}: [defaults] and [grid] must be tables of settings")
    if not isinstance(rules, list) or not all(
            isinstance(r, dict) and isinstance(r.get("when", {}), dict) and isinstance(r.get("set", {}), dict)
            for r in rules):
        raise TrainError(f"sweep config {path}: each [[overrides]] needs tables 'when' and 'set'")
    if not isinstance(spec.get("out", ""), str):
        raise TrainError(f"sweep config {path}: out must be a path in quotes, got {spec['out']!r}")
    unknown = (set(defaults) | set(grid) | {k for r in rules for k in (*r.get("when", {}), *r.get("set", {}))}) - _FIELDS
    if unknown:
        raise TrainError(f"sweep config {path}: unknown settings {sorted(unknown)}")
    not_lists = [k for k, v in grid.items() if not isinstance(v, list)]
    if not_lists:
        raise TrainError(f"sweep config {path}: [grid] values must be lists, e.g. lr = [0.1]; not {not_lists}")
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise TrainError(f"sweep config {path}: [grid] lists must not be empty: {empty}")
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        settings = dict(defaults, **dict(zip(keys, values)))
        for rule in rules:
            if all(settings.get(k) == v for k, v in rule.get("when", {}).items()):
                settings.update(rule.get("set", {}))
        _check_point(f"sweep config {path}", settings)
        points.append((run_name(settings), settings))
    return points, spec.get("out", "runs/sweep")


def _check_point(source, settings):
    """Validate one grid point before any run starts (each would otherwise fail alone)."""
    try:
        TrainConfig(**settings).validate()
    except TrainError as exc:
        raise TrainError(f"{source}: {settings}: {exc}") from None


def run_name(settings):
    """e.g. 'mlp2-relu-sce' or 'mlp2-relu-sce_lr=0.1': the model plus what differs from the defaults."""
    config = TrainConfig(**settings)
    default = TrainConfig()
    extra = [f"{k}={getattr(config, k)}" for k in sorted(_FIELDS - _NOT_IN_NAME)
             if getattr(config, k) != getattr(default, k)]
    return "_".join([config.name, *extra])


def run_state(run_dir, epochs=None):
    """'busy' (another live process writes it), 'done' (completed or diverged at full
    length), 'resume' (has a checkpoint) or 'new'.  ``epochs`` is the length the sweep asks
    for now (default: the run's own), so a run cut short by a quick ``--epochs 1`` trial is
    extended, not taken as done."""
    if rundir.lock_holder(run_dir) is not None:
        return "busy"
    if not (run_dir / rundir.CHECKPOINT).exists():
        return "new"  # whatever else is there (a start killed early) is cleared by the run itself
    s = rundir.read_summary(run_dir)
    if s:
        if epochs is None:
            epochs = rundir.load_config(run_dir)[0].epochs
        completed = s.get("epochs_completed")
        if s.get("status") == "diverged" or (
                s.get("status") == "completed" and isinstance(completed, int) and completed >= epochs):
            return "done"
    return "resume"


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


def run_sweep(config_paths, *, jobs=None, device=None, out=None, data_dir=None, epochs=None, dry_run=False,
              stack=False, max_stack=None, executor="local", ray=None):
    """Run every grid point of the configs (``stack``: in stacked groups of at most
    ``max_stack`` models): ``jobs`` at a time in local processes, or as Ray tasks
    (``executor="ray"``, with ``ray`` the RayOptions of xpmlp/sweep_ray.py).  Returns an exit
    status: 0 when every run completed or diverged, 1 when some failed, 130 when interrupted."""
    if executor == "ray":
        if jobs is not None:
            raise TrainError("--jobs is for the local executor; with --executor ray, --cpus-per-run and "
                             "--gpus-per-run say how many runs fit on each machine")
        ray = ray or _ray_options()
        device = ray.device(device)
        if not dry_run:
            ray.check()
    elif ray is not None:
        raise TrainError("--address, --cpus-per-run, --gpus-per-run and --no-shared-fs need --executor ray")
    jobs = 1 if jobs is None else jobs
    if jobs < 1:
        raise TrainError("--jobs must be at least 1")
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
    todo = [(d, s, run_state(d, s.get("epochs", TrainConfig.epochs))) for d, s in runs.items()]
    busy = [d for d, _, st in todo if st == "busy"]
    print(f"sweep: {len(runs)} runs, {sum(st == 'done' for *_, st in todo)} already done, "
          f"{sum(st == 'resume' for *_, st in todo)} to resume; "
          + (ray.describe() if executor == "ray" else f"{jobs} at a time"), flush=True)
    for run_dir in busy:
        print(f"skip   {run_dir}: in use by process {rundir.lock_holder(run_dir) or '?'}", flush=True)
    stacked_done, groups = 0, []
    if stack:
        groups, todo = plan_stacks(todo, max_stack, device)
        if dry_run:
            for group_dir, members, state in groups:
                print(f"  stack {state:6} {group_dir} ({len(members)} runs: {', '.join(d.name for d, _ in members)})")
        elif executor == "local":  # one group at a time in this process; Ray runs them as tasks
            for group_dir, members, state in groups:
                result = run_stack_group(group_dir, members, state, device=device, data_dir=data_dir)
                if result == "interrupted":
                    print("sweep interrupted; run the same command again to resume", file=sys.stderr)
                    return 130
                if result == "done":
                    stacked_done += len(members)
                else:  # another process holds the group or one of its runs
                    busy += [d for d, _ in members]
    # Slowest first (small batches, deep nets), so the last runs to finish are short ones.
    todo = sorted((t for t in todo if t[2] not in ("done", "busy")), key=_cost, reverse=True)
    busy_at_start = len(busy)
    if dry_run:
        for run_dir, settings, state in todo:
            print(f"  {state:6} {run_dir}")
        return 0
    if executor == "ray":  # the units of work: stacked groups, then single runs
        from . import sweep_ray  # imports Ray: only for this executor
        finished, failed, stopped = sweep_ray.run(groups + todo, ray, busy=busy, device=device, data_dir=data_dir)
        expected = len(todo) + sum(len(members) for _, members, _ in groups)
    else:
        finished, failed, stopped = _run_local(todo, jobs, busy=busy, device=device, data_dir=data_dir)
        finished, expected = finished + stacked_done, len(todo) + stacked_done
    if stopped:
        print("sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"sweep: {finished} of {expected + busy_at_start} runs finished"
          + (f"; failed: {', '.join(map(str, failed))}" if failed else "")
          + (f"; skipped {len(busy)} in use by another process" if busy else ""), flush=True)
    return 0 if finished == expected + busy_at_start else 1


def _ray_options():
    from .sweep_ray import RayOptions  # no Ray import: that waits for the sweep to start
    return RayOptions()


def _run_local(todo, jobs, *, busy, device, data_dir):
    """The local executor: each unit of work of ``todo`` (one grid point: run dir, settings,
    state) as an ``xpmlp train`` subprocess, ``jobs`` at a time.  Runs found in use by
    another process are added to ``busy``.  Returns (runs finished, run dirs that failed,
    whether the sweep was stopped by a signal)."""
    from tqdm import tqdm

    # Cap threads so jobs x threads <= cores: oversubscribed OpenBLAS slows down tenfold.
    # Within that, each run follows xpmlp's thread policy (xpmlp/threads.py: one BLAS thread,
    # and two for the compiled step where a run has two cores).
    env = run_env(max(1, (os.cpu_count() or 1) // jobs))
    total_epochs = sum(s.get("epochs", TrainConfig.epochs) for _, s, _ in todo)
    bar = tqdm(total=total_epochs, desc="sweep", unit="epoch", disable=None)
    finished = 0
    running, failed, pending = {}, [], list(todo)

    def stop_runs():  # Ctrl-C or kill: let each run checkpoint, start nothing new
        for proc in running:
            interrupt(proc)

    with stop_on_signals(stop_runs) as stop, bar:
        while (pending and not stop) or running:
            while pending and not stop and len(running) < jobs:
                run_dir, settings, state = pending.pop(0)
                holder = rundir.lock_holder(run_dir)
                if holder is not None:  # taken since the sweep started (another sweep)
                    busy.append(run_dir)
                    tqdm.write(f"skip   {run_dir}: in use by process {holder or '?'}")
                    continue
                # A "new" run left from a start that never reached its first checkpoint is
                # cleared by the run itself, once it holds the directory's lock.
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "train.log", "a")
                proc = start_run(_command(run_dir, settings, state, device, data_dir), log, env)
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
                proc.stdin.close()
                del running[proc]
                kind, line = outcome(run_dir, proc.returncode)
                if kind == "finished":
                    finished += 1
                    line += f"  [{finished}/{len(todo)} runs]"
                elif kind in ("failed", "busy"):
                    (failed if kind == "failed" else busy).append(run_dir)
                tqdm.write(line)
    return finished, failed, bool(stop)


def start_run(command, log, env):
    """A sweep's run: ``command`` writing to ``log``, in a session of its own on POSIX (signals
    reach it only through us: ``interrupt``), its stdin a pipe this process holds open while
    it lives (die_with_parent)."""
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(env, **{PIPE_ENV: "1"}), start_new_session=True)


def interrupt(proc):
    """Ask a sweep's run to checkpoint and stop, as Ctrl-C does: SIGINT.  Windows has no
    SIGINT to send (send_signal raises), but there the run shares our console (a new session
    means nothing on Windows), so the console's Ctrl-C has reached it already."""
    if sys.platform != "win32":
        proc.send_signal(signal.SIGINT)


def run_env(cores):
    """The environment of a sweep's ``xpmlp train`` processes, each of which has ``cores``
    cores: BLAS threads by xpmlp's policy within them, and this process as the parent whose
    death ends them (die_with_parent)."""
    threads = str(min(blas_threads(), cores))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if cores == 1 or "XPMLP_THREADS" in os.environ:  # else the compiled step may take two
        env["XPMLP_THREADS"] = threads
    env[PARENT_ENV] = str(os.getpid())  # each run stops when this process dies: die_with_parent()
    return env


@contextlib.contextmanager
def stop_on_signals(stop_runs):
    """Inside, Ctrl-C and SIGTERM call ``stop_runs()`` and are recorded in the list yielded
    (true once the sweep should start nothing new) instead of ending this process."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        stop_runs()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def outcome(run_dir, returncode):
    """What an ``xpmlp train`` of ``run_dir`` that exited with ``returncode`` came to: (kind,
    the line to print), kind one of finished, interrupted, busy (another process holds or
    finished the run), failed."""
    status = _status(run_dir)
    taken = None if returncode == 0 else _taken(run_dir)
    if status in ("completed", "diverged") and returncode == 0:
        return "finished", f"{status:9} {run_dir}"
    if status == "interrupted" and not taken:
        return "interrupted", f"interrupted {run_dir} (rerun the sweep to resume it)"
    if taken == "done":  # another sweep got there first, and finished it
        return "finished", f"done   {run_dir} (by another process)"
    if taken:  # another sweep got there first: this one's run was refused
        return "busy", f"skip   {run_dir}: {taken}"
    return "failed", f"FAILED {run_dir} (exit {returncode}; see {run_dir / 'train.log'})"


def die_with_parent():
    """In a sweep's run: get SIGTERM when the sweep that started us dies, however it dies
    (kill -9 included), so no run is left orphaned; SIGTERM ends the run like Ctrl-C, at a
    checkpoint.  Linux sends it (PR_SET_PDEATHSIG); elsewhere (macOS, Windows) a thread
    waits on the pipe the sweep gave us as stdin (start_run), which reads to its end when
    the OS closes the sweep's side, at its death."""
    parent = os.environ.pop(PARENT_ENV, None)
    piped = os.environ.pop(PIPE_ENV, None)
    if parent is None:
        return
    if _PDEATHSIG:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    elif piped:
        threading.Thread(target=_stop_at_end_of, args=(sys.stdin.buffer,), daemon=True, name="xpmlp-parent").start()
    else:  # started by an executor that gives no pipe (Ray's workers): it outlives a killed sweep
        return
    if os.getppid() != int(parent):  # it died before we asked
        print("xpmlp: the sweep that started this run has ended; not starting it", file=sys.stderr)
        sys.exit(130)


def _stop_at_end_of(stream):
    stream.read()  # nothing is ever written: this returns when the sweep's end is closed
    signal.raise_signal(signal.SIGTERM)


def plan_stacks(todo, max_stack, device):
    """(groups, the rest): each group (group dir, [(run dir, settings)], 'new' or 'resume')
    of grid points that share a program; the rest, today's (run dir, settings, state) items,
    are the points left to run alone, each said in one line.

    Groups are formed over every point, finished or not, so that a rerun finds the same
    group (and its checkpoint) whatever finished since."""
    from .stack import group_configs, group_key, group_state

    by_key = {}
    for item in todo:
        settings = dict(item[1], **({"device": device} if device else {}))
        by_key.setdefault(group_key(TrainConfig(**settings)), []).append(item)
    groups, rest = [], []
    for items in by_key.values():
        size = max_stack or len(items)
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            names = "\n".join(sorted(str(d.resolve()) for d, _, _ in chunk))
            group_dir = chunk[0][0].parent / ".stacks" / \
                f"{TrainConfig(**chunk[0][1]).name}-{hashlib.sha1(names.encode()).hexdigest()[:10]}"
            state = group_state(group_dir)
            if state is not None and state["status"] != "completed":
                points = {d.resolve(): (d, s) for d, s, _ in chunk}
                members = [d.resolve() for d in group_configs(group_dir)[1]]  # in the checkpoint's order
                groups.append((group_dir, [points[d] for d in members], "resume"))
                rest += [t for t in chunk if t[0].resolve() not in members]
                continue
            new = [(d, s) for d, s, st in chunk if st == "new"]
            for d, _, st in chunk:
                if st == "resume":
                    print(f"alone  {d}: has its own checkpoint from a run outside a stack", flush=True)
            rest += [t for t in chunk if t[2] != "new"]
            if new:
                groups.append((group_dir, new, "new"))
    return groups, rest


def run_stack_group(group_dir, members, state, *, device=None, data_dir=None, cores=None, stop_flag=None):
    """Train one stacked group (a plan_stacks item) in this process, holding the group's
    directory and each member's run directory while it trains.  Returns "done" (every member
    completed or diverged), "interrupted" (Ctrl-C or SIGTERM: the group's checkpoint is
    saved) or "busy" (another process holds the group or one of its runs; nothing done).
    An executor may call it in a worker process: MNIST is read, and sent to each device,
    once per process.  ``cores``: the cores the group may use (a Ray task's CPUs), which
    cap its threads as run_env caps a run's; None: this process's.  ``stop_flag``: see
    StackTrainer."""
    from tqdm import tqdm

    from .backends import get_backend
    from .data import load_mnist
    from .stack import StackTrainer, clear_group, hold_group

    die_with_parent()  # in a worker process started by a sweep: the group ends with its sweep
    overrides = dict(**({"device": device} if device else {}), **({"data_dir": data_dir} if data_dir else {}))
    configs = [TrainConfig(**dict(s, **overrides)) for _, s in members]
    threads = None if cores is None else step_threads(min(cores, step_threads()))
    run_dirs = [d for d, _ in members]
    first = configs[0]
    if first.data_dir not in _LOADED:
        _LOADED[first.data_dir] = load_mnist(first.data_dir, progress=sys.stderr.isatty())
    if first.device not in _LOADED:
        _LOADED[first.device] = get_backend(first.device, notice=tqdm.write)
    try:
        with hold_group(group_dir, run_dirs):
            if state == "new":  # whatever a start that never reached its first checkpoint left
                clear_group(group_dir, run_dirs)
            tqdm.write(f"stack  {group_dir} ({state}): {len(run_dirs)} runs as one program: "
                       + ", ".join(d.name for d in run_dirs))
            trainer = StackTrainer(configs, run_dirs, _LOADED[first.data_dir], group_dir, resume=state == "resume",
                                   progress=sys.stderr.isatty(), log=tqdm.write, backend=_LOADED[first.device],
                                   device_data=_DEVICE_DATA, threads=threads, stop_flag=stop_flag)
            if state == "new":
                trainer.write_config()
            with limit_blas_threads(blas_threads() if cores is None else min(blas_threads(), cores)):
                trainer.run()
    except rundir.RunDirBusy as exc:
        tqdm.write(f"skip   {group_dir}: {exc}")
        return "busy"
    if trainer.state["status"] == "interrupted":
        return "interrupted"
    for d in run_dirs:
        tqdm.write(f"{_status(d):9} {d}")
    return "done"


_LOADED = {}  # data dir -> MNIST, device -> backend: read and set up once per process
_DEVICE_DATA = {}  # (backend, dtype) -> MNIST on that device: sent once per process


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


def _taken(run_dir):
    """Why a run that failed here belongs to another process (a sweep started at the same
    time won the race for it): "done" if that process finished it, else a reason, or None."""
    holder = rundir.lock_holder(run_dir)
    if holder is not None:
        return f"in use by process {holder or '?'}"
    if run_state(run_dir) == "done":
        return "done"
    try:
        with open(run_dir / "train.log") as f:
            last = f.read().strip().rsplit("\n", 1)[-1]
    except FileNotFoundError:
        return None
    return last.removeprefix("xpmlp: error: ") if "in use by another process" in last else None


def _status(run_dir):
    try:
        return rundir.read_summary(run_dir).get("status")
    except TrainError:  # a summary.json that is not a JSON object
        return None
