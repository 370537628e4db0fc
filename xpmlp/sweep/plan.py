"""The plan of a sweep: its grid points from TOML configs, their run directories' names
and states, and the stacked groups they form.  Nothing here runs anything."""
import dataclasses
import hashlib
import itertools
import sys
from pathlib import Path

from .. import rundir
from ..config import TrainConfig, TrainError, read_toml

# Settings that do not change what a run computes: kept out of directory names.
_NOT_IN_NAME = {"model", "device", "data_dir", "eval_every", "checkpoint_every", "log_every",
                "tensorboard", "hidden", "activation", "loss"}
_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_grid(path):
    """The list of (run name, TrainConfig settings) of one TOML config, and its output root."""
    spec = read_toml(path, "sweep config")
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
    s = _read_summary(run_dir)
    if s:
        if epochs is None:
            epochs = rundir.load_config(run_dir)[0].epochs
        completed = s.get("epochs_completed")
        if s.get("status") == "diverged" or (
                s.get("status") == "completed" and isinstance(completed, int) and completed >= epochs):
            return "done"
    return "resume"


def command(run_dir, settings, state, device, data_dir):
    """The ``xpmlp train`` command of one grid point in ``state`` (new or resume)."""
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


def plan_stacks(todo, max_stack, device):
    """(groups, the rest): each group (group dir, [(run dir, settings)], 'new' or 'resume')
    of grid points that share a program; the rest, today's (run dir, settings, state) items,
    are the points left to run alone, each said in one line.

    Groups are formed over every point, finished or not, so that a rerun finds the same
    group (and its checkpoint) whatever finished since."""
    from ..training.stack import group_configs, group_key, group_state

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
            # A damaged checkpoint is resumed, so that loading it refuses it by name: never
            # taken for none, which would clear the group's progress.
            damaged = state is None and (group_dir / rundir.GROUP_CHECKPOINT).exists()
            if damaged or (state is not None and state["status"] != "completed"):
                points = {d.resolve(): (d, s) for d, s, _ in chunk}
                members = [d.resolve() for d in group_configs(group_dir)[1]]  # in the checkpoint's order
                strangers = [d for d in members if d not in points]
                if strangers:  # stack.json edited by hand, or another sweep's group
                    raise TrainError(f"{group_dir / rundir.GROUP_FILE}: names {strangers[0]}, which is not a point "
                                     "of this sweep; restore the file or delete the group's directory")
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


def _cost(item):
    """A rough relative cost of a run, for ordering only."""
    config = TrainConfig(**item[1])
    return config.epochs * (len(config.widths) - 1 + 100 / config.batch_size)


def _read_summary(run_dir):
    """rundir.read_summary, with a summary.json that cannot be read (a directory, no
    permission) a TrainError naming it."""
    try:
        return rundir.read_summary(run_dir)
    except OSError as exc:
        raise TrainError(f"{Path(run_dir) / rundir.SUMMARY}: cannot read it ({exc.strerror or exc})") from None
