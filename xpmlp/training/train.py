"""One model trained into one run directory: the epoch loop (loop.py) with a run's files
(rundir.py) as its hooks."""
from pathlib import Path

from .. import rundir
from ..backends import get_backend
from ..config import TrainConfig, TrainError  # noqa: F401 (the training API in one import)
from .compiled import step_record
from .loop import (  # noqa: F401
    EpochLoop,
    Stepper,
    evaluate,
    fmt,
    make_stepper,
    step_loop,
    warm_up,
    write_tensorboard,
)


class Trainer(EpochLoop):
    """Trains one model into a run directory.  ``log`` receives one-line progress messages;
    ``progress`` switches the per-epoch tqdm bar; ``backend``: one the caller already chose
    (probing CUDA can take seconds)."""

    def __init__(self, config, run_dir, data, *, resume=False, progress=True, log=print,
                 notice=None, backend=None, threads=None):
        backend = backend or get_backend(config.device, notice=notice)
        try:
            model = config.build(backend)
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError (a subclass)
            raise TrainError(f"not enough memory on {backend.device} for {config.name}") from None
        optimizer = config.optimizer(model)
        super().__init__(config, model, optimizer, data, seeds=[config.seed], progress=progress, log=log,
                         threads=threads)
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / rundir.CHECKPOINT
        if resume:
            params, velocity, state, self._partial = rundir.load_checkpoint(self.checkpoint_path, model)
            model.load_state_arrays(params)
            optimizer.load_state([backend.asarray(v, dtype=model.dtype) for v in velocity])
            self.rngs[0].bit_generator.state = state.pop("rng")
            state.pop("num_params")
            self.state.update(state, status="running")
        self._resumed, self._records_dropped = resume, False
        self._saved_state = dict(self.state)  # as of the last checkpoint
        self.writer = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(self.run_dir), purge_step=self.state["iter"] + 1 if resume else None)

    def _drop_records_past_the_checkpoint(self):
        """On resume, once: the records past the checkpoint will be produced again."""
        if self._resumed and not self._records_dropped:
            rundir.truncate_metrics(self.run_dir, self.state["epoch"])
            self._records_dropped = True

    def write_config(self):
        self._drop_records_past_the_checkpoint()  # first: a bad record stops the resume before any file changes
        rundir.write_config(self.run_dir, self.config, self.backend, step_record(self.stepper),
                                getattr(self.data, "info", None))  # None: data without a record (tests)

    def run(self):
        """Train to ``config.epochs`` as the run directory's one writer; returns summary.json's
        path.  A full disk ends the run as interrupted at its last checkpoint (DiskFull)."""
        with rundir.hold_run_dir(self.run_dir):
            try:
                self._drop_records_past_the_checkpoint()
                return self._loop()
            except rundir.DiskFull:
                self._after_disk_full()
                raise
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _after_disk_full(self):
        """Record status interrupted as of the last checkpoint, if the disk lets us."""
        self.state = dict(self._saved_state, status="interrupted")
        epochs = [r for r in rundir.epoch_records(rundir.read_records(self.run_dir))
                  if r["epoch"] <= self.state["epoch"]]
        try:
            self._summary(epochs[-1] if epochs else {})
        except (OSError, TrainError):
            pass

    # -- the loop's hooks

    def _checkpoint(self, rng_states, pos=0, partial_time_s=0.0, partial=None):
        """``rng_states``: the shuffle RNG's before the permutation of the epoch in progress;
        ``pos`` > 0 marks a checkpoint taken inside that epoch after ``pos`` iterations."""
        self._save(self.checkpoint_path, dict(self.state, rng=rng_states[0], pos=pos, partial_time_s=partial_time_s),
                   partial)
        self._saved_state = dict(self.state)

    def _save(self, path, state, partial=None):
        rundir.save_checkpoint(path, self.model.state_arrays(),
                               [self.backend.to_numpy(v) for v in self.optimizer.state()], state, partial)

    def _write_epoch(self, k, iter_records, record):
        rundir.append_metrics(self.run_dir, iter_records + [record])
        write_tensorboard(self.writer, iter_records, record)
        if record.get("val_acc") is not None and record["val_acc"] > self.state.get("best_val_acc", -1.0):
            self.state.update(best_val_acc=record["val_acc"], best_epoch=record["epoch"])
            self._save(self.run_dir / rundir.BEST,
                       dict(self.state, rng=self._rng_states()[0], pos=0, partial_time_s=0.0))

    def _on_diverged(self, k, record):
        self.state["status"] = "diverged"  # the final checkpoint and summary: _finish

    def _line(self, epoch, active, records, diverged):
        rec = records[0]
        text = (f"epoch {epoch:>3}/{self.config.epochs}" + (f"  lr {rec['lr']:.4g}" if "lr" in rec else "") +
                f"  train loss {fmt(rec['train_loss'], '.4f')} acc {fmt(rec['train_acc'], '.4f')}")
        if rec.get("val_loss") is not None:
            text += f"  val loss {fmt(rec['val_loss'], '.4f')} acc {fmt(rec['val_acc'], '.4f')}"
        if rec["test_loss"] is not None:
            text += f"  test loss {fmt(rec['test_loss'], '.4f')} acc {fmt(rec['test_acc'], '.4f')}"
        return text + ("  DIVERGED (non-finite loss)" if diverged else "")

    def _where_saved(self):
        return f"checkpoint saved; resume with: {rundir.resume_command(self.run_dir)}"

    def _finish(self, last):
        """The final checkpoint (if an epoch ran in this call) and the summary; returns the
        summary's path."""
        if self.state["status"] == "running":
            self.state["status"] = "completed"
        if self.state["status"] in ("completed", "diverged") and last[0]:
            self._checkpoint(self._rng_states())
        self._summary(last[0] or last_epoch_record(self.run_dir))  # none in this call: the last on record
        return self.run_dir / rundir.SUMMARY

    def _summary(self, last):
        summary = {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        summary.update(train_time_s=self.state["train_time_s"], epochs_completed=self.state["epoch"],
                       iterations=self.state["iter"], status=self.state["status"],
                       epochs=self.config.epochs, model=self.config.name, device=self.backend.device)
        if self.config.val is not None:
            summary.update(val_loss=last.get("val_loss"), val_acc=last.get("val_acc"),
                           best_val_acc=self.state.get("best_val_acc"), best_epoch=self.state.get("best_epoch"))
        rundir.write_summary(self.run_dir, summary)


def last_epoch_record(run_dir):
    epochs = rundir.epoch_records(rundir.read_records(run_dir))
    return epochs[-1] if epochs else {}
