"""Sweeps on a Ray cluster (``xpmlp sweep --executor ray``): each unit of work, one grid
point or one stacked group (``--stack``), is one Ray task.  Ray is imported only when such
a sweep starts (``run``), so ``import xpmlp`` and the local executor never import it.

A stacked group's task trains the group in its worker's own process (units.run_stack_group,
as the local executor does in its own; its threads capped by the task's CPUs), in place or,
without a shared filesystem, in a copy of the group's and its members' directories that it
sends back as a run's task does.  A grid point's task runs the same ``xpmlp train`` command as the local
executor, in a subprocess of its Ray worker, from the state its run is in when the task
starts (so a retried task resumes):

- with a shared filesystem (the default), in the run directory itself, which the run's
  ``xpmlp train`` locks as its one writer;
- without one (``shared_fs=False``), in a temporary directory on the worker's machine: the
  task first takes the run's files from the driver (the resume point a previous attempt
  left), and sends them back at each of the run's checkpoints and at its end; the driver's
  side (an actor pinned to the driver's machine) writes them, each file atomically, the
  checkpoint after the records it covers.  A lost worker costs at most one checkpoint
  interval.  The driver holds the run directory's lock meanwhile.

Faults: a worker that dies is retried by Ray (``max_retries``).  Its run's process, which
Linux stops with SIGTERM at the worker's death (die_with_parent, as under the local
executor), checkpoints on the way out; the retry waits for it to let go of the run, then
resumes.  Ctrl-C (or SIGTERM) on the driver cancels the tasks: each interrupts its run,
which checkpoints, and sends back its files; every unfinished run stays resumable.
"""
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import types
from pathlib import Path

from .. import rundir
from ..config import TrainConfig, TrainError
from ..processes import run_env, stop_on_signals
from ..training.launch import hold_all
from . import plan
from .plan import run_state
from .units import outcome

MAX_RETRIES = 3  # attempts after a worker (or its machine) dies, per task
CONNECT_TIMEOUT_S = 5  # a HOST:PORT that does not answer within this is no cluster
LOCK_WAIT_S = 60  # a retry waits this long for a killed attempt's run to checkpoint and let go
CANCEL_WAIT_S = 120  # after Ctrl-C, how long the tasks get to checkpoint before they are killed
POLL_S = 0.2


@dataclasses.dataclass
class RayExecutor:
    """The command line's Ray settings: ``address`` None starts a local Ray instance; "auto"
    or HOST:PORT joins a running cluster."""
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    shared_fs: bool = True

    def __post_init__(self):
        if not self.cpus_per_run > 0:
            raise TrainError(f"--cpus-per-run must be positive, got {self.cpus_per_run}")
        if not self.gpus_per_run >= 0:
            raise TrainError(f"--gpus-per-run must not be negative, got {self.gpus_per_run}")
        if self.gpus_per_run > 1 and self.gpus_per_run != int(self.gpus_per_run):
            raise TrainError(f"--gpus-per-run: a run uses one GPU; above 1, only whole numbers, "
                             f"got {self.gpus_per_run}")

    def device(self, device):
        """The device of every run: ``cuda`` (the GPU Ray gave the task) with GPUs per run."""
        if self.gpus_per_run and device not in (None, "cuda"):
            raise TrainError(f"--gpus-per-run gives each run the GPU Ray placed it on (--device cuda); "
                             f"not --device {device}")
        return "cuda" if self.gpus_per_run else device

    def check(self):
        """Before the sweep starts: Ray is installed, and something answers at the address."""
        _import_ray()
        if self.address is not None and self.address != "auto":
            _check_answers(self.address)

    def describe(self):
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
        gpus = f", {self.gpus_per_run:g} GPU" if self.gpus_per_run else ""
        files = "" if self.shared_fs else ", files sent back to this machine"
        return f"on {where}, {self.cpus_per_run:g} CPU{gpus} per run{files}"

    def cores(self):
        """The whole cores of a run (Ray's CPUs): its threads, by xpmlp's policy, fit in them."""
        return max(1, int(self.cpus_per_run))


# ---------------------------------------------------------------- the driver

    def run(self, groups, todo, *, busy, device, data_dir):
        """Run the units of work, ``groups`` (plan_stacks' items) then ``todo`` ((run dir,
        settings, state) items), as Ray tasks; runs found in use by another process are added
        to ``busy``.  Returns (runs finished, run dirs that failed, whether the sweep was
        stopped by a signal), as the local executor does."""
        ray = _import_ray()
        started_ray = _connect(ray, self.address)
        try:
            return _Sweep(ray, groups + todo, self, busy, device, data_dir).run()
        finally:
            if started_ray:
                ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TrainError("--executor ray needs Ray, which is not installed here: "
                         "pip install 'xpmlp[ray]' (on every machine of the cluster)") from None
    return ray


def _connect(ray, address):
    """Start a local Ray instance (``address`` None) or join the cluster at ``address``;
    True when this process started or joined it (and so leaves it at the end), False when
    it was connected already (a test's shared instance)."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False} if address is None else {}
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    except (Exception, SystemExit) as exc:  # Ray exits (SystemExit) when the GCS never answers
        text = str(exc).split("\n")[0] or type(exc).__name__
        if address == "auto":
            raise TrainError("--address auto: no Ray cluster is running on this machine "
                             "(start one with: ray start --head)") from None
        raise TrainError(f"--address {address}: could not join a Ray cluster there ({text})") from None
    return True


def _check_answers(address):
    """Fail in seconds, not after Ray's two-minute wait, when nothing listens at HOST:PORT."""
    if address.startswith("ray://"):
        raise TrainError(f"--address {address}: Ray Client addresses are not supported; run the sweep "
                         "on a machine of the cluster with --address auto or HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TrainError(f"--address {address}: expected HOST:PORT (the head's port, 6379 by default) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror:
        raise TrainError(f"--address {address}: unknown host {host}") from None
    except OSError as exc:
        raise TrainError(f"--address {address}: no Ray cluster answers there "
                         f"({exc.strerror or exc or 'timed out'}); start one with: ray start --head") from None


class _Sweep:
    """The driver's loop: submits one task per unit of work (a run, or a stacked group),
    shows what is done, running, queued and failed (one line per change, and a bar on a
    terminal), and cancels on Ctrl-C."""

    def __init__(self, ray, todo, options, busy, device, data_dir):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        from tqdm import tqdm

        self.ray, self.todo, self.options, self.busy, self.tqdm = ray, todo, options, busy, tqdm
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.driver_end = ray.remote(DriverEnd).options(num_cpus=0, scheduling_strategy=here).remote()
        resources = dict(num_cpus=options.cpus_per_run, num_gpus=options.gpus_per_run, max_retries=MAX_RETRIES,
                         retry_exceptions=False)
        self.task = ray.remote(train_task).options(**resources)
        self.stack_task = ray.remote(stack_task).options(**resources)
        self.groups = {}  # group dir -> its members' run dirs
        self.run_options = {"device": device, "shared_fs": options.shared_fs, "cores": options.cores(),
                            "data_dir": str(Path(data_dir).absolute()) if data_dir else None}
        self.tasks = {}  # task ref -> run dir
        self.held = {}  # run dir -> the driver's hold on it (without a shared filesystem)
        self.started = {}  # run dir -> attempts seen started
        self.finished, self.failed = 0, []
        self.cancelled = False

    def run(self):
        ray = self.ray
        runs = sum(len(what) if isinstance(what, list) else 1 for _, what, _ in self.todo)
        with self.tqdm(total=runs, desc="sweep", unit="run", disable=None) as self.bar, \
                stop_on_signals(lambda: None) as stop:
            for target, what, state in self.todo:
                if isinstance(what, list):  # a stacked group's directory, its members (run dir, settings)
                    self._submit_group(target, what, state)
                else:  # a run directory, its settings
                    self._submit(target, what, state)
            cancelled_at = None
            while self.tasks:
                if stop and cancelled_at is None:  # Ctrl-C: each task checkpoints its run and stops
                    cancelled_at = time.monotonic()
                    self.cancelled = True
                    self._say(f"cancelling {len(self.tasks)} tasks: each run checkpoints and stops")
                    for ref in self.tasks:
                        ray.cancel(ref)
                elif cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_WAIT_S:
                    for ref in self.tasks:
                        ray.cancel(ref, force=True)
                    cancelled_at = float("inf")
                ready, _ = ray.wait(list(self.tasks), num_returns=len(self.tasks), timeout=POLL_S)
                starts = ray.get(self.driver_end.starts.remote())
                for ref in ready:
                    self._show_start(self.tasks[ref], starts)
                    self._finish(ref)
                for run_dir in list(self.tasks.values()):
                    self._show_start(run_dir, starts)
            ray.kill(self.driver_end)
        return self.finished, self.failed, bool(stop)

    def _submit(self, run_dir, settings, state):
        holder = rundir.lock_holder(run_dir)
        if holder is not None:  # taken since the sweep started (another sweep)
            self.busy.append(run_dir)
            self._say(f"skip   {run_dir}: in use by process {holder or '?'}")
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if not self.options.shared_fs:  # this process writes it, for the task
            hold = contextlib.ExitStack()
            try:
                hold.enter_context(rundir.hold_run_dir(run_dir))
            except rundir.RunDirBusy as exc:
                self.busy.append(run_dir)
                self._say(f"skip   {run_dir}: {exc}")
                return
            self.held[run_dir] = hold
        options = dict(self.run_options, epochs=settings.get("epochs", TrainConfig.epochs))
        self.tasks[self.task.remote(str(run_dir.absolute()), settings, options, self.driver_end)] = run_dir

    def _submit_group(self, group_dir, members, state):
        group_dir.mkdir(parents=True, exist_ok=True)
        if not self.options.shared_fs:  # this process writes them, for the task
            hold = contextlib.ExitStack()
            try:
                hold.enter_context(hold_all([group_dir, *(d for d, _ in members)]))
            except rundir.RunDirBusy as exc:
                self.busy.extend(d for d, _ in members)
                self._say(f"skip   {group_dir}: {exc}")
                return
            self.held[group_dir] = hold
        options = dict(self.run_options, state=state)
        members = [(str(d.absolute()), s) for d, s in members]
        self.tasks[self.stack_task.remote(str(group_dir.absolute()), members, options, self.driver_end)] = group_dir
        self.groups[group_dir] = [d for d, _ in members]

    def _show_start(self, run_dir, starts):
        """Say so when the run's task started (again): ``starts`` from the driver's end."""
        machine, attempts = starts.get(str(run_dir.absolute()), (None, 0))
        if self.started.get(run_dir, 0) < attempts:
            self.started[run_dir] = attempts
            again = f", attempt {attempts}: its last worker was lost" if attempts > 1 else ""
            self._say(f"start  {run_dir} on {machine}{again}")

    def _finish(self, ref):
        ray = self.ray
        run_dir = self.tasks.pop(ref)
        if run_dir in self.held:
            self.held.pop(run_dir).close()  # before reading its outcome, which looks for holders
        self.started.pop(run_dir, None)
        try:
            if run_dir in self.groups:
                result, written = ray.get(ref)
                ray.get(written)  # the group's last files, written on this machine
                return self._finish_group(run_dir, result)
            returncode, holder, written = ray.get(ref)
            ray.get(written)  # the run's last files, written on this machine
        except ray.exceptions.TaskCancelledError:
            self._say(f"cancelled {run_dir} (not started)")
            return
        except ray.exceptions.RayError as exc:  # our task's own error, or its workers lost too often
            cause = getattr(exc, "cause", None)
            reason = str(cause) if isinstance(cause, TrainError) else str(exc).strip().splitlines()[-1]
            self.failed.append(run_dir)
            self._say(f"FAILED {run_dir} ({reason})")
            return
        if holder is not None:
            self.busy.append(run_dir)
            self._say(f"skip   {run_dir}: in use by process {holder or '?'} on its worker's machine")
            return
        kind, line = outcome(run_dir, returncode)
        if kind == "failed" and self.cancelled and returncode == -signal.SIGTERM:
            kind, line = "interrupted", f"stopped {run_dir} while it started (rerun the sweep to start it)"
        if kind == "finished":
            self.finished += 1
            self.bar.update(1)
        elif kind in ("failed", "busy"):
            (self.failed if kind == "failed" else self.busy).append(run_dir)
        self._say(line)

    def _finish_group(self, group_dir, result):
        members = [Path(d) for d in self.groups.pop(group_dir)]
        if result == "done":
            self.finished += len(members)
            self.bar.update(len(members))
            for run_dir in members:
                self._say(f"{outcome(run_dir, 0)[1]}  (stacked in {group_dir.name})")
        elif result == "busy":
            self.busy.extend(members)
            self._say(f"skip   {group_dir}: in use by another process")
        elif result == "failed":
            self.failed.extend(members)
            self._say(f"FAILED {group_dir} (its task's log says why)")
        else:
            self._say(f"interrupted {group_dir} (rerun the sweep to resume its {len(members)} runs)")

    def _say(self, line):
        """One line per change, with the grid's state after it."""
        running = len(self.started)
        counts = dict(done=self.finished, running=running, queued=len(self.tasks) - running,
                      failed=len(self.failed))
        self.bar.set_postfix(counts, refresh=False)
        self.tqdm.write(f"{line}  [{', '.join(f'{k} {v}' for k, v in counts.items())}]")


class DriverEnd:
    """The driver's end of the tasks, a Ray actor pinned to the driver's machine: records
    which runs started where, and (without a shared filesystem) hands each task its run's
    files and writes back the files it returns."""

    def __init__(self):
        self._starts = {}  # run dir -> (machine, attempts)

    def started(self, run_dir, machine):
        self._starts[run_dir] = (machine, self._starts.get(run_dir, (None, 0))[1] + 1)

    def starts(self):
        return self._starts

    def files(self, run_dir):
        return pack(Path(run_dir))

    def write(self, run_dir, files):
        unpack(Path(run_dir), files, atomic=True)


# ---------------------------------------------------------------- a task, on a worker

def train_task(run_dir, settings, options, driver_end):
    """Train one grid point on this Ray worker with ``xpmlp train``, from the state its run
    is in now.  Returns (exit status or None, pid of another process that holds the run or
    None, [the driver's write of the run's last files] or []).  ``options``: device,
    data_dir, cores, epochs, shared_fs."""
    import ray

    run_dir, machine = Path(run_dir), ray.util.get_node_ip_address()
    with contextlib.suppress(ValueError):  # not the main thread: Ray's own disposition stands
        # ray.cancel interrupts a task with SIGINT, which a Ray started from a background
        # job (or a script) inherits as ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Calls to the driver's end return at once: a task that waits in ray.get gives its CPUs
    # back to Ray meanwhile, which starts another task on them (and overloads the machine).
    driver_end.started.remote(str(run_dir), machine)
    if options["shared_fs"]:
        if not run_dir.is_dir():
            raise TrainError(f"{run_dir} does not exist on {machine}: its workers do not share the "
                             "driver's filesystem; run the sweep with --no-shared-fs")
        return _train_task(run_dir, run_dir, settings, options, driver_end)
    with claimed(work_dir(run_dir)) as work:
        return _train_task(run_dir, work, settings, options, driver_end)


def _train_task(run_dir, work, settings, options, driver_end):
    """train_task's work, in ``work``: the run directory, or this machine's copy of it."""
    import ray

    holder = _wait_for_lock(work)  # a killed attempt's run, checkpointing on its way out
    if holder is not None:
        return None, holder, []
    if not options["shared_fs"]:  # start from the driver's copy, whatever an attempt left here
        files = _get_holding_cpus(ray, driver_end.files.remote(str(run_dir)))
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        unpack(work, files)
    state = run_state(work, options["epochs"])
    if state == "done":
        return 0, None, []

    def send_back():  # the driver's end runs one task's calls in the order they were made
        return driver_end.write.remote(str(run_dir), pack(work))

    env = run_env(options["cores"])  # this worker is the parent whose death stops the run
    command = plan.command(work, settings, state, options["device"], options["data_dir"])
    returncode = _train(command, work, env, None if options["shared_fs"] else send_back)
    if options["shared_fs"]:
        return returncode, None, []
    written = send_back()
    shutil.rmtree(work, ignore_errors=True)
    return returncode, None, [written]


def work_root():
    """This user's folder for the copies that workers without the driver's filesystem
    train: <tmp>/xpmlp-ray-<uid>, created with mode 0700, and used only if it is a real
    directory (not a link) that this user owns and nobody else may enter.  On a shared
    machine another user could otherwise have put it, or a link to somewhere, there first."""
    root = Path(tempfile.gettempdir()) / f"xpmlp-ray-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise TrainError(f"{root} is not a private directory of this user (owner uid {st.st_uid}, mode "
                         f"{stat.filemode(st.st_mode)}); remove it, or set TMPDIR to another place")
    return root


def work_dir(run_dir):
    """Where a worker without the driver's filesystem trains the run at ``run_dir`` (an
    absolute path on the driver): one place per run, so a retry clears what a lost
    attempt on the same machine left."""
    return work_root() / hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]


@contextlib.contextmanager
def claimed(work):
    """Hold ``work`` (a work_dir) while inside: an flock on ``work``.lock, which the kernel
    drops when this process ends however it ends.  First, remove the copies nobody holds:
    a killed sweep's (see remove_stale)."""
    import fcntl  # Ray's workers run on Linux and macOS; the module itself imports anywhere

    remove_stale(work.parent)
    lock = Path(f"{work}.lock")
    while True:
        f = open(lock, "a")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # waits for a remove_stale under way
        if lock.exists() and os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # remove_stale unlinked the file we locked: lock the new one
    try:
        yield work
    finally:
        if not work.exists():  # the task removed its copy: its lock file goes too
            lock.unlink(missing_ok=True)
        f.close()


def remove_stale(root):
    """Remove the copies under ``root`` that no live task holds and no ``xpmlp train`` still
    writes: those of a sweep killed with its workers (its tasks never reached their clean-up)."""
    import fcntl

    for work in [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]:
        lock = Path(f"{work}.lock")
        with open(lock, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live task's
            if rundir.lock_holder(work) is None:  # a killed task's run may still checkpoint
                shutil.rmtree(work, ignore_errors=True)
                lock.unlink(missing_ok=True)


def _get_holding_cpus(ray, ref):
    """ray.get(ref), but polled, so that Ray does not count this task as blocked and lend
    its CPUs to another task meanwhile."""
    while not ray.wait([ref], timeout=0)[0]:
        time.sleep(0.05)
    return ray.get(ref)


def stack_task(group_dir, members, options, driver_end):
    """Train a stacked group (plan.plan_stacks) on this Ray worker, in this process, from
    the state its checkpoint is in now.  Returns (run_stack_group's "done", "interrupted" or
    "busy", [the driver's write of the group's last files] or []).  With a shared filesystem
    in the group's and its runs' directories; without one in a copy of them on this machine,
    sent back at each group checkpoint and at the end."""
    import ray

    from ..training.stack import group_configs, group_state
    from .units import run_stack_group

    group_dir, state = Path(group_dir), options["state"]
    members = [(Path(d), s) for d, s in members]
    # ray.cancel interrupts the task through SIGINT's handler: here each interrupt (should
    # Ray send more than one) only asks the group to stop at its next step, which it does
    # with a checkpoint, and the task winds down (its files sent back) undisturbed.
    cancel = types.SimpleNamespace(stop=False)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, lambda signum, frame: setattr(cancel, "stop", True))
    machine = ray.util.get_node_ip_address()
    driver_end.started.remote(str(group_dir), machine)
    with contextlib.ExitStack() as hold:
        if options["shared_fs"]:
            if not group_dir.is_dir():
                raise TrainError(f"{group_dir} does not exist on {machine}: its workers do not share the "
                                 "driver's filesystem; run the sweep with --no-shared-fs")
            work = [group_dir] + [d for d, _ in members]
        else:  # the driver's copy, whatever an attempt left here
            work = group_work_dirs(group_dir, [d for d, _ in members])
            hold.enter_context(claimed(work_dir(group_dir)))  # this machine's copy is ours meanwhile
            shutil.rmtree(work_dir(group_dir), ignore_errors=True)
            for driver_path, path in zip([group_dir] + [d for d, _ in members], work):  # the group first:
                path.mkdir(parents=True)  # its checkpoint is read before the records it covers
                unpack(path, _get_holding_cpus(ray, driver_end.files.remote(str(driver_path))))
        work_group, work_members = work[0], [(w, s) for w, (_, s) in zip(work[1:], members)]
        checkpoint = group_state(work_group)
        if checkpoint is not None and checkpoint["status"] == "completed":
            result = "done"
        else:
            if checkpoint is not None and state == "new":  # a lost attempt checkpointed it: resume, in its order
                points = {d.resolve(): (d, s) for d, s in work_members}
                work_members, state = [points[d.resolve()] for d in group_configs(work_group)[1]], "resume"
            train = functools.partial(run_stack_group, work_group, work_members, state, device=options["device"],
                                      data_dir=options["data_dir"], cores=options["cores"], stop_flag=cancel)
            if options["shared_fs"]:
                return train(), []
            with _sending_back(work_group, lambda: _send_group_back(driver_end, group_dir, members, work)):
                result = train()
        if options["shared_fs"]:
            return result, []
        # The driver waits for the last files: a cancelled task's own ray.get would raise.
        written = _send_group_back(driver_end, group_dir, members, work)
        shutil.rmtree(work_dir(group_dir), ignore_errors=True)
        return result, [written]


def group_work_dirs(group_dir, run_dirs):
    """Where a worker without the driver's filesystem trains a stacked group: the group's
    directory, then its members', in one temporary place laid out as on the driver (the
    group's stack.json names its members relative to itself)."""
    paths = [Path(group_dir), *map(Path, run_dirs)]
    root = Path(os.path.commonpath([str(p) for p in paths]))
    return [work_dir(group_dir) / p.relative_to(root) for p in paths]


def _send_group_back(driver_end, group_dir, members, work):
    """The group's files to the driver's end; returns a ref that is ready once they are all
    written.  Read group first (its checkpoint), written there last: the driver's copy never
    has a checkpoint ahead of the records it covers."""
    group_files = pack(work[0])
    writes = [driver_end.write.remote(str(d), pack(w)) for (d, _), w in zip(members, work[1:])]
    writes.append(driver_end.write.remote(str(group_dir), group_files))
    return writes[-1]  # the driver's end runs one task's calls in order


@contextlib.contextmanager
def _sending_back(group_dir, send_back):
    """While inside, ``send_back()`` after each new group checkpoint (a thread polls it)."""
    done = threading.Event()

    def poll():
        seen = _checkpoint_id(group_dir, rundir.GROUP_CHECKPOINT)
        while not done.wait(POLL_S):
            if _checkpoint_id(group_dir, rundir.GROUP_CHECKPOINT) != seen:
                seen = _checkpoint_id(group_dir, rundir.GROUP_CHECKPOINT)
                send_back()

    poller = threading.Thread(target=poll, daemon=True, name="xpmlp-send-back")
    poller.start()
    try:
        yield
    finally:
        done.set()
        poller.join()


def _wait_for_lock(run_dir):
    """None once nobody holds ``run_dir``; the holder's pid if it is still held after LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while (holder := rundir.lock_holder(run_dir)) is not None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return holder


def _train(command, work, env, at_checkpoint):
    """Run ``command`` with its output appended to train.log; ``at_checkpoint()`` after each
    new checkpoint.  A cancel (KeyboardInterrupt from Ray) stops the run at a checkpoint.
    Returns its exit status."""
    with open(work / "train.log", "a") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # signals reach it only through us
        try:
            seen = _checkpoint_id(work)
            while proc.poll() is None:
                time.sleep(POLL_S)
                if at_checkpoint is not None and _checkpoint_id(work) != seen:
                    seen = _checkpoint_id(work)
                    at_checkpoint()
        except KeyboardInterrupt:  # ray.cancel: checkpoint and stop
            # SIGTERM, which the run takes as Ctrl-C: Ray's processes block SIGINT, and so
            # does every process they start.  Any further interrupt is ignored while the run
            # checkpoints.
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    return proc.returncode


def _checkpoint_id(work, name=rundir.CHECKPOINT):
    """Changes with every checkpoint written (each is a new file, renamed into place)."""
    try:
        st = os.stat(work / name)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# ---------------------------------------------------------------- a run directory's files

def pack(run_dir):
    """A run directory's files (name -> bytes), its lock and temporary files aside.  The
    checkpoint is read first, so the records read after it reach at least as far (on resume,
    records past the checkpoint are dropped); metrics.jsonl only up to its last whole line."""
    files = {}
    names = [rundir.CHECKPOINT] + sorted(p.name for p in run_dir.iterdir() if p.name != rundir.CHECKPOINT)
    for name in names:
        if name == rundir.LOCK or name.endswith(rundir.TEMP_SUFFIX):
            continue
        try:
            data = (run_dir / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
        files[name] = data[:data.rfind(b"\n") + 1] if name == rundir.METRICS else data
    return files


def unpack(run_dir, files, atomic=False):
    """Make ``run_dir`` hold ``files``: each written (``atomic``: replaced whole, the
    checkpoint after the records and the summary last), and the run's result files that
    ``files`` lacks removed (a run started again from scratch no longer has them)."""
    order = sorted(files, key=lambda name: (name == rundir.CHECKPOINT, name == rundir.SUMMARY))
    for name in order:
        if atomic:
            rundir.atomic_write_bytes(run_dir / name, files[name])
        else:
            (run_dir / name).write_bytes(files[name])
    for path in [*(run_dir / name for name in (*rundir.RESULT_FILES, rundir.BEST)),
                 *run_dir.glob("events.out.tfevents.*")]:
        if path.name not in files:
            path.unlink(missing_ok=True)
