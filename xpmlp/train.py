"""The training loop: epochs of SGD steps, evaluation, logging, checkpoints, divergence
and interruption.  What it leaves behind, the run directory, is written by rundir.py."""
import math
import signal
import time
from pathlib import Path

import numpy as np

from .backends import get_backend
from .compiled import CompiledStepper, StackedCompiledStepper, compiled_steps
from .config import TrainConfig, TrainError  # noqa: F401 (the training API in one import)
from .ops import Scratch
from .optim import SGD
from .rundir import (SUMMARY, DiskFull, append_metrics, check_shapes, epoch_records, hold_run_dir, load_checkpoint,
                     read_records, save_checkpoint, truncate_metrics, write_config, write_summary)
from .threads import step_threads

# The progress bar shows the latest step's loss and accuracy, read from the device at most
# this often: each read waits for the GPU to finish the queued steps.
BAR_READ_INTERVAL_S = 2.0
# Steps per call of the compiled step: enough that a call's fixed costs (Numba's dispatch
# of ~30 arguments, waking the helper thread) vanish, few enough that Ctrl-C and the
# progress bar wait at most ~0.1 s for one model (K times that for K stacked models).
STEPS_PER_CALL = 25


# ---------------------------------------------------------------- the loop

class _StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps, so a step is never cut in half
    and the checkpoint written on the way out is consistent."""

    def __init__(self):
        self.stop = False

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.stop:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate(model, x, y, chunk=1000):
    """Mean loss and accuracy over a whole set, read back once (per model, when stacked)."""
    n = x.shape[0]
    loss_sum = acc_sum = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)  # the Array API leaves 2-D x[a:b] and out-of-range stops unspecified
        xb, yb = x[start:stop, ...], y[start:stop]
        loss, acc = model.loss.forward_with_accuracy(model.forward(xb), yb)
        rows = xb.shape[0]
        loss_sum = loss_sum + loss * rows
        acc_sum = acc_sum + acc * rows
    be = model.backend
    means = [np.asarray(be.to_numpy(total), dtype=np.float64) / n for total in (loss_sum, acc_sum)]
    # Stacked models: two (K,) arrays, each model's value as it would be alone.
    return tuple(means) if model.stack else tuple(float(m) for m in means)


class Stepper:
    """One SGD step on the batch ``idx`` of (x, y), its loss and accuracy stored at
    ``loss_out[i]``, ``acc_out[i]`` on the device (read back once per epoch, not per step)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.ops = model, optimizer, model.ops
        self.scratch = Scratch(model.xp, model.dtype)  # buffered ops gather into fixed buffers

    def gather(self, x, y, idx):
        return self.ops.take_rows(x, idx, self.scratch, "x"), self.ops.take_rows(y, idx, self.scratch, "y")

    def step(self, x, y, idx, loss_out, acc_out, i):
        model = self.model
        xb, yb = self.gather(x, y, idx)
        model.loss.forward_with_accuracy(model.forward(xb), yb, out=(loss_out[i:i + 1], acc_out[i:i + 1]))
        model.backward(model.loss.backward())
        self.optimizer.step()


def step_loop(stepper, x, y, perm, batch, losses, accs, start, stop, after_step=None):
    """Steps ``start`` to ``stop - 1`` of an epoch whose shuffle is ``perm``: the loop the
    trainer runs and the bench times.  ``after_step(i)`` (progress, interruption) returns
    True to end the loop early.  A stepper with ``steps`` (the compiled one) gets up to
    STEPS_PER_CALL steps a call, and ``after_step`` runs for each after its call.
    Returns the number of steps done by the end."""
    per_call = STEPS_PER_CALL if hasattr(stepper, "steps") else 1
    for i in range(start, stop, per_call):
        end = min(stop, i + per_call)
        rows = perm[..., i * batch:end * batch]  # (K, n): one row a model
        if per_call == 1:
            stepper.step(x, y, rows, losses, accs, i)
        else:
            stepper.steps(x, y, rows, losses[i:end], accs[i:end])
        if after_step is not None and any([after_step(j) for j in range(i, end)]):
            return end
    return stop


def make_stepper(model, optimizer, compiled=True, threads=None):
    """The compiled step (xpmlp/compiled.py) where the model's ops have one for it and
    ``compiled``, on ``threads`` threads (default: threads.py's policy), else the Stepper
    of its ops."""
    kernel = compiled_steps(model) if compiled else None
    if kernel is None:
        return Stepper(model, optimizer)
    if model.stack:
        return StackedCompiledStepper(model, optimizer, kernel, step_threads(threads))
    return CompiledStepper(model, optimizer, kernel, step_threads(threads))


class Trainer:
    """Trains one model on MNIST into a run directory.  ``log`` receives one-line
    progress messages; ``progress`` switches the per-epoch tqdm bar."""

    def __init__(self, config, run_dir, data, *, resume=False, progress=True, log=print,
                 notice=None, backend=None):
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.progress, self.log = progress, log
        # ``backend``: one the caller already chose (probing CUDA can take seconds).
        self.backend = backend or get_backend(config.device, notice=notice)
        try:
            self.model = config.build(self.backend)
        except MemoryError:  # NumPy's, or CuPy's OutOfMemoryError (a subclass)
            raise TrainError(f"not enough memory on {self.backend.device} for {config.name}") from None
        self.optimizer = SGD(self.model, lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)
        self.stepper = make_stepper(self.model, self.optimizer)
        self.rng = np.random.default_rng([config.seed, 1])  # shuffles; weights use `seed` alone
        self.state = {"epoch": 0, "iter": 0, "train_time_s": 0.0, "status": "running"}
        self._partial = {}  # the per-step records of an epoch interrupted midway
        if resume:
            params, velocity, state, self._partial = load_checkpoint(self.run_dir)
            check_shapes(self.run_dir, params, self.model)
            self.model.load_state_arrays(params)
            self.optimizer.load_state([self.backend.asarray(v, dtype=self.model.dtype) for v in velocity])
            self.rng.bit_generator.state = state.pop("rng")
            state.pop("num_params")
            self.state.update(state, status="running")
        self._resumed = resume
        self._saved_state = dict(self.state)  # as of the last checkpoint
        self.writer = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(self.run_dir), purge_step=self.state["iter"] + 1 if resume else None)

    # -- files

    def write_config(self):
        if self._resumed:  # the records first: a bad one stops the resume before any file changes
            truncate_metrics(self.run_dir, self.state["epoch"])
        write_config(self.run_dir, self.config, self.backend, self.stepper)

    def _checkpoint(self, rng_state, pos=0, partial_time_s=0.0, partial=None):
        """``rng_state`` is the shuffle RNG before the permutation of the epoch in progress;
        ``pos`` > 0 marks a checkpoint taken inside that epoch after ``pos`` iterations."""
        state = dict(self.state, rng=rng_state, pos=pos, partial_time_s=partial_time_s,
                     num_params=len(self.model.parameters()))
        save_checkpoint(self.run_dir, self.model, self.optimizer, state, partial or {})
        self._saved_state = dict(self.state)

    def _summary(self, last):
        summary = {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        summary.update(train_time_s=self.state["train_time_s"], epochs_completed=self.state["epoch"],
                       iterations=self.state["iter"], status=self.state["status"],
                       epochs=self.config.epochs, model=self.config.name, device=self.backend.device)
        write_summary(self.run_dir, summary)

    # -- the loop: run -> epochs -> (step loop, end of epoch | interrupt) -> finish

    def run(self):
        """Train to ``config.epochs`` as the run directory's one writer; returns summary.json's
        path.  A full disk ends the run as interrupted at its last checkpoint (DiskFull)."""
        with hold_run_dir(self.run_dir):
            try:
                return self._run()
            except DiskFull:
                self._after_disk_full()
                raise
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _after_disk_full(self):
        """Record status interrupted as of the last checkpoint, if the disk lets us."""
        self.state = dict(self._saved_state, status="interrupted")
        epochs = [r for r in epoch_records(read_records(self.run_dir)) if r["epoch"] <= self.state["epoch"]]
        try:
            self._summary(epochs[-1] if epochs else {})
        except (OSError, TrainError):
            pass

    def _run(self):
        be, dtype = self.backend, self.model.dtype
        train = (be.asarray(self.data.train_x, dtype=dtype), be.asarray(self.data.train_y))  # sent once
        test = (be.asarray(self.data.test_x, dtype=dtype), be.asarray(self.data.test_y))
        if self._resumed:  # records past the checkpoint will be produced again (done by write_config too)
            truncate_metrics(self.run_dir, self.state["epoch"])
        if self.state["epoch"] < self.config.epochs:
            self._warm_up(*train, self.config.batch_size)
        last = {}
        with _StopFlag() as flag:
            while self.state["epoch"] < self.config.epochs:
                record = self._epoch(train, test, flag)
                if record is None:  # interrupted inside the epoch
                    break
                last = record
                if record["diverged"] or self._interrupted_between_epochs(flag):
                    break
        return self._finish(last)

    def _epoch(self, train, test, flag):
        """One epoch from where the state says; its record, or None if it was interrupted."""
        be, dtype = self.backend, self.model.dtype
        epoch, n, batch = self.state["epoch"] + 1, train[0].shape[0], self.config.batch_size
        iters = n // batch  # the report's batch sizes all divide 60000; a remainder is dropped
        epoch_rng = self.rng.bit_generator.state  # a checkpoint mid-epoch replays this permutation
        perm = be.asarray(self.rng.permutation(n))
        losses = self.model.xp.zeros((iters,), dtype=dtype)  # read once per epoch
        accs = self.model.xp.zeros((iters,), dtype=dtype)
        pos = self.state.pop("pos", 0)
        if pos:  # resuming inside this epoch
            losses[:pos] = be.asarray(self._partial["loss"], dtype=dtype)
            accs[:pos] = be.asarray(self._partial["acc"], dtype=dtype)
        elapsed = self.state.pop("partial_time_s", 0.0)
        bar = self._bar(epoch, iters, pos)
        be.synchronize()
        start = time.perf_counter()
        done = step_loop(self.stepper, *train, perm, batch, losses, accs, pos, iters,
                         after_step=self._after_step(bar, losses, accs, iters, flag))
        be.synchronize()
        elapsed += time.perf_counter() - start
        if bar is not None:
            bar.close()
        if done < iters:
            self._interrupt(epoch, epoch_rng, done, iters, elapsed, losses, accs)
            return None
        self.state["train_time_s"] += elapsed
        self.optimizer.flush_denormals()
        return self._end_epoch(epoch, iters, be.to_numpy(losses), be.to_numpy(accs), *test)

    def _after_step(self, bar, losses, accs, iters, flag):
        """What the step loop does after each step: the progress bar, and stopping at a signal."""
        shown = [time.perf_counter()]

        def after_step(i):
            if bar is not None:
                bar.update(1)
                # Reading a device value waits for the GPU: at most once per interval.
                if time.perf_counter() - shown[0] >= BAR_READ_INTERVAL_S:
                    shown[0] = time.perf_counter()
                    self._show_metrics(bar, losses, accs, i)
            return flag.stop and i + 1 < iters

        return after_step

    def _interrupt(self, epoch, epoch_rng, done, iters, elapsed, losses, accs):
        """Stopped inside an epoch: a checkpoint that replays its shuffle from step ``done``."""
        be = self.backend
        self.state["status"] = "interrupted"
        self._checkpoint(epoch_rng, pos=done, partial_time_s=elapsed,
                         partial={"loss": be.to_numpy(losses[:done]), "acc": be.to_numpy(accs[:done])})
        self.log(f"interrupted in epoch {epoch} after {done}/{iters} iterations; checkpoint saved; "
                 f"resume with: xpmlp train --resume {self.run_dir}")

    def _interrupted_between_epochs(self, flag):
        epoch = self.state["epoch"]
        if not flag.stop or epoch >= self.config.epochs:
            return False
        self.state["status"] = "interrupted"
        self._checkpoint(self.rng.bit_generator.state)
        self.log(f"interrupted after epoch {epoch}; resume with: xpmlp train --resume {self.run_dir}")
        return True

    def _finish(self, last):
        """The final checkpoint and summary; returns the summary's path."""
        if self.state["status"] == "running":
            self.state["status"] = "completed"
        if self.state["status"] in ("completed", "diverged"):
            self._checkpoint(self.rng.bit_generator.state)
        if not last:  # no epoch finished in this call: report the last one on record
            last = self._last_epoch_record()
        self._summary(last)
        return self.run_dir / SUMMARY

    def _warm_up(self, x, y, batch):
        warm_up(self.stepper, x, y, np.arange(batch))

    def _end_epoch(self, epoch, iters, losses, accs, x_test, y_test):
        cfg = self.config
        first_iter = self.state["iter"] + 1
        self.state["iter"] += iters
        self.state["epoch"] = epoch
        record = {"kind": "epoch", "epoch": epoch, "iter": self.state["iter"],
                  "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs)),
                  "test_loss": None, "test_acc": None, "train_time_s": self.state["train_time_s"]}
        diverged = not np.isfinite(losses).all()
        if diverged:
            self.state["status"] = "diverged"
            # Still evaluate: a network of NaNs predicts class 0 (arg-max of NaNs), which is
            # the accuracy the report prints for its momentum 1.0 row (9.80% = class 0's share).
            with np.errstate(all="ignore"):
                record["test_loss"], record["test_acc"] = evaluate(self.model, x_test, y_test)
        elif epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            record["test_loss"], record["test_acc"] = evaluate(self.model, x_test, y_test)
        iter_records = [{"kind": "iter", "epoch": epoch, "iter": first_iter + i,
                         "loss": float(losses[i]), "acc": float(accs[i])}
                        for i in range(0, iters, cfg.log_every)]
        append_metrics(self.run_dir, iter_records + [record])
        write_tensorboard(self.writer, iter_records, record)
        if epoch % cfg.checkpoint_every == 0 and not diverged and epoch < cfg.epochs:
            self._checkpoint(self.rng.bit_generator.state)
        self.log(self._line(record) + ("  DIVERGED (non-finite loss)" if diverged else ""))
        return dict(record, diverged=diverged)

    def _last_epoch_record(self):
        return last_epoch_record(self.run_dir)

    def _line(self, rec):
        def fmt(v, spec):
            return "nan" if v is None or not math.isfinite(v) else format(v, spec)
        text = (f"epoch {rec['epoch']:>3}/{self.config.epochs}  train loss {fmt(rec['train_loss'], '.4f')} "
                f"acc {fmt(rec['train_acc'], '.4f')}")
        if rec["test_loss"] is not None:
            text += f"  test loss {fmt(rec['test_loss'], '.4f')} acc {fmt(rec['test_acc'], '.4f')}"
        return text + f"  time {rec['train_time_s']:.1f}s"

    def _show_metrics(self, bar, losses, accs, i):
        be = self.backend
        bar.set_postfix(loss=f"{float(be.to_numpy(losses[i])):.4f}", acc=f"{float(be.to_numpy(accs[i])):.3f}",
                        refresh=False)

    def _bar(self, epoch, iters, pos):
        return epoch_bar(self.progress, f"epoch {epoch}/{self.config.epochs}", iters, pos)


# ---------------------------------------------------------------- shared with stack.py

def warm_up(stepper, x, y, idx):
    """One step on the rows ``idx`` (one model's (batch,), or stacked models' (K, batch))
    before any epoch is timed, then the weights and momenta put back as they were: it
    compiles what a step runs (CuPy's kernels and ours, Numba's), so that epoch 1's
    train_time_s is training, not compilation."""
    model, optimizer = stepper.model, stepper.optimizer
    be = model.backend
    params = [np.array(a, copy=True) for a in model.state_arrays()]
    velocity = [np.array(be.to_numpy(v), copy=True) for v in optimizer.state()]
    loss, acc = (be.xp.zeros((1, *model.stack), dtype=model.dtype) for _ in range(2))
    with np.errstate(all="ignore"):  # a stacked model that diverges at once (lr 1.0) is no error here
        stepper.step(x, y, be.asarray(idx), loss, acc, 0)
    model.load_state_arrays(params)
    optimizer.load_state([be.asarray(v, dtype=model.dtype) for v in velocity])
    be.synchronize()


def write_tensorboard(writer, iter_records, record):
    """A run's records of an epoch as TensorBoard scalars (``writer`` None: nothing)."""
    if writer is None:
        return
    for rec in iter_records:
        writer.add_scalar("train/loss_iter", rec["loss"], rec["iter"])
        writer.add_scalar("train/acc_iter", rec["acc"], rec["iter"])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        if record[key] is not None:
            writer.add_scalar(key.replace("_", "/", 1), record[key], record["epoch"])
    writer.flush()


def last_epoch_record(run_dir):
    epochs = epoch_records(read_records(run_dir))
    return epochs[-1] if epochs else {}


def epoch_bar(progress, desc, iters, pos):
    """An epoch's tqdm bar, or None without ``progress``."""
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=iters, initial=pos, desc=desc, leave=False, unit="it", dynamic_ncols=True)
