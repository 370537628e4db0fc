"""A sweep's units of work, as every executor runs them: a grid point is an ``xpmlp train``
process (plan.command) whose end is read by ``outcome``; a stacked group trains in the
executor's own process (``run_stack_group``)."""
import sys

from .. import rundir
from ..config import TrainConfig, TrainError
from ..processes import die_with_parent
from ..training.threads import blas_threads, step_threads
from .plan import _read_summary, run_state


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


def run_stack_group(group_dir, members, state, *, device=None, data_dir=None, cores=None, stop_flag=None):
    """Train one stacked group (a plan_stacks item) in this process, holding the group's
    directory and each member's run directory while it trains.  Returns "done" (every member
    completed or diverged), "interrupted" (Ctrl-C or SIGTERM: the group's checkpoint is
    saved), "busy" (another process holds the group or one of its runs; nothing done) or
    "failed" (a damaged group checkpoint, a full disk: said in one line).
    An executor may call it in a worker process: MNIST is read, and sent to each device,
    once per process.  ``cores``: the cores the group may use (a Ray task's CPUs), which
    cap its threads as run_env caps a run's; None: this process's.  ``stop_flag``: see
    StackTrainer."""
    from tqdm import tqdm

    from ..backends import get_backend
    from ..data import training_data
    from ..training.launch import train
    from ..training.stack import StackTrainer

    die_with_parent()  # in a worker process started by a sweep: the group ends with its sweep
    overrides = dict(**({"device": device} if device else {}), **({"data_dir": data_dir} if data_dir else {}))
    configs = [TrainConfig(**dict(s, **overrides)) for _, s in members]
    threads = None if cores is None else step_threads(min(cores, step_threads()))
    run_dirs = [d for d, _ in members]
    first = configs[0]
    which = ("data", first.data, first.dataset, first.data_dir, first.val)  # a group's members share these
    if which not in _LOADED:
        _LOADED[which] = training_data(first, progress=sys.stderr.isatty())
    configs = [c.fit_data(_LOADED[which]) for c in configs]
    if first.device not in _LOADED:
        _LOADED[first.device] = get_backend(first.device, notice=tqdm.write)
    say = f"stack  {group_dir} ({state}): {len(run_dirs)} runs as one program: " + ", ".join(d.name for d in run_dirs)
    try:
        if state == "resume":  # as `train --resume`: only on the data its runs trained on
            for d in run_dirs:
                if (d / rundir.CONFIG).is_file():
                    rundir.check_data(d, rundir.read_json(d / rundir.CONFIG), _LOADED[which].info)
        trainer = train(lambda resume: StackTrainer(configs, run_dirs, _LOADED[which], group_dir,
                                                    resume=resume, progress=sys.stderr.isatty(), log=tqdm.write,
                                                    backend=_LOADED[first.device], device_data=_DEVICE_DATA,
                                                    threads=threads, stop_flag=stop_flag),
                        [group_dir, *run_dirs], group_dir / rundir.GROUP_CHECKPOINT, resume=state == "resume",
                        threads=blas_threads() if cores is None else min(blas_threads(), cores),
                        log=tqdm.write, announce=lambda t: say)
    except rundir.RunDirBusy as exc:
        tqdm.write(f"skip   {group_dir}: {exc}")
        return "busy"
    except TrainError as exc:  # a damaged checkpoint, a full disk: the sweep goes on with the rest
        tqdm.write(f"FAILED {group_dir}: {exc}")
        return "failed"
    if trainer.state["status"] == "interrupted":
        return "interrupted"
    for d in run_dirs:
        tqdm.write(f"{_status(d):9} {d}")
    return "done"


_LOADED = {}  # data dir -> MNIST, device -> backend: read and set up once per process
_DEVICE_DATA = {}  # (backend, dtype) -> MNIST on that device: sent once per process


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
        return _read_summary(run_dir).get("status")
    except TrainError:  # a summary.json that is not a JSON object
        return None
