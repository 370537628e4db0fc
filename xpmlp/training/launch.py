"""One way to start training, for a run (``train``), a seeds group (``train --seeds``) and a
sweep's stacked group: hold the directories, resume or start again, write the config, cap
the threads, run."""
import contextlib
import sys
from pathlib import Path

from .. import rundir
from .threads import limit_blas_threads


@contextlib.contextmanager
def hold_all(dirs):
    """Be the one writer of every directory in ``dirs`` (created if need be) while inside
    (rundir.hold_run_dir); RunDirBusy if another process holds any of them."""
    with contextlib.ExitStack() as held:
        for d in dirs:
            Path(d).mkdir(parents=True, exist_ok=True)
            held.enter_context(rundir.hold_run_dir(d))
        yield


def clear(dirs):
    """Remove what an earlier start of these directories left (records, a group's files), so
    that it can start again.  Call it while holding them (hold_all)."""
    for d in dirs:
        rundir.clear_run_dir(d)


def train(make_trainer, dirs, checkpoint, *, resume=None, threads, log, announce, notices=(),
          kind="checkpoint"):
    """Hold ``dirs`` (a run's directory, or a group's followed by its members'), then:
    resume from ``checkpoint`` when ``resume`` says so, or (None) when the file exists: a
    damaged one is refused when it is read, never taken for none; otherwise clear what an
    earlier start left, saying so when it left something.  Then ``make_trainer(resume)``,
    its config written, ``announce(trainer)`` logged, and its run with BLAS threads capped at
    ``threads``.  ``notices``: lines held back until the directories are ours.
    Returns the trainer once it has run."""
    with hold_all(dirs):
        for line in notices:
            print(line, file=sys.stderr)
        if resume is None:
            resume = Path(checkpoint).exists()
            if not resume and any((Path(d) / name).exists() for d in dirs for name in rundir.STARTED_FILES):
                log(f"{dirs[0]}: no {kind} yet (stopped before its first one); starting it again from scratch")
        if not resume:
            clear(dirs)
        trainer = make_trainer(resume)
        trainer.write_config()
        log(announce(trainer))
        with limit_blas_threads(threads):
            trainer.run()
    return trainer
