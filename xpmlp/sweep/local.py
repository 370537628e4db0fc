"""The local executor: stacked groups one at a time in this process, then the single runs
as ``xpmlp train`` processes, ``jobs`` at a time."""
import os
import time

from .. import rundir
from ..config import TrainConfig, TrainError
from ..processes import interrupt, run_env, start_run, stop_on_signals
from .plan import command
from .units import _epochs_logged, outcome, run_stack_group


class LocalExecutor:
    """Runs a sweep's units of work on this machine, ``jobs`` runs at a time."""

    def __init__(self, jobs=1):
        if jobs < 1:
            raise TrainError("--jobs must be at least 1")
        self.jobs = jobs

    def device(self, device):
        return device

    def check(self):
        pass

    def describe(self):
        return f"{self.jobs} at a time"

    def run(self, groups, todo, *, busy, device, data_dir):
        """Train ``groups`` (plan_stacks' items) and run ``todo`` ((run dir, settings, state)
        items).  Units found in use by another process are added to ``busy``.  Returns (runs
        finished, run dirs that failed, whether the sweep was stopped by a signal)."""
        finished, failed = 0, []
        for group_dir, members, state in groups:
            result = run_stack_group(group_dir, members, state, device=device, data_dir=data_dir)
            if result == "interrupted":
                return finished, failed, True
            if result == "done":
                finished += len(members)
            else:  # another process holds the group or one of its runs, or it failed
                (busy if result == "busy" else failed).extend(d for d, _ in members)
        done, failed_runs, stopped = self._run_processes(todo, busy=busy, device=device, data_dir=data_dir)
        return finished + done, failed + failed_runs, stopped

    def _run_processes(self, todo, *, busy, device, data_dir):
        """Each grid point of ``todo`` (run dir, settings, state) as an ``xpmlp train``
        subprocess, ``jobs`` at a time.  Runs found in use by
        another process are added to ``busy``.  Returns (runs finished, run dirs that failed,
        whether the sweep was stopped by a signal)."""
        from tqdm import tqdm

        # Cap threads so jobs x threads <= cores: oversubscribed OpenBLAS slows down tenfold.
        # Within that, each run follows xpmlp's thread policy (xpmlp/threads.py: one BLAS thread,
        # and two for the compiled step where a run has two cores).
        env = run_env(max(1, (os.cpu_count() or 1) // self.jobs))
        total_epochs = sum(s.get("epochs", TrainConfig.epochs) for _, s, _ in todo)
        bar = tqdm(total=total_epochs, desc="sweep", unit="epoch", disable=None)
        finished = 0
        running, failed, pending = {}, [], list(todo)

        def stop_runs():  # Ctrl-C or kill: let each run checkpoint, start nothing new
            for proc in running:
                interrupt(proc)

        with stop_on_signals(stop_runs) as stop, bar:
            while (pending and not stop) or running:
                while pending and not stop and len(running) < self.jobs:
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
                    proc = start_run(command(run_dir, settings, state, device, data_dir), log, env)
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
