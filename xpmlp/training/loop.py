"""The epoch loop, written once for one model and for K stacked models.

``EpochLoop.run`` is the whole of training: warm-up, then epochs of shuffled SGD steps
(resumed mid-epoch where a checkpoint says so), the stop flag checked between steps,
denormals flushed, the test set evaluated on its cadence, a checkpoint on its cadence.
What a run leaves behind is its subclass's business, through a few hooks (as Keras' ``fit``
runs callbacks): ``_checkpoint`` (the state at a point of the loop), ``_write_epoch`` (one
model's records of an epoch), ``_on_diverged``, ``_line`` (the epoch's log line),
``_where_saved`` (the end of an interruption's line) and ``_finish``.  train.Trainer
writes one run directory; stack.StackTrainer a group's checkpoint and K run directories.
"""
import contextlib
import math
import signal
import time

import numpy as np

from ..config import lr_at
from ..core.ops import Scratch
from .compiled import CompiledStepper, StackedCompiledStepper, compiled_steps
from .threads import step_threads

# The progress bar shows the latest step's loss and accuracy, read from the device at most
# this often: on a GPU each read waits for the queued steps; on the CPU a read is free.
BAR_READ_INTERVAL_S = 2.0
BAR_READ_INTERVAL_CPU_S = 0.2
# Steps per call of the compiled step: enough that a call's fixed costs (Numba's dispatch
# of ~30 arguments, waking the helper thread) vanish, few enough that Ctrl-C and the
# progress bar wait at most ~0.1 s for one model (K times that for K stacked models).
STEPS_PER_CALL = 25


class StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps, so a step is never cut in half
    and the checkpoint written on the way out is consistent.  A second Ctrl-C: at once."""

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
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- steps

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


# ---------------------------------------------------------------- the loop

class EpochLoop:
    """Trains ``model`` (one, or K stacked) with ``optimizer`` on ``data`` for
    ``config.epochs``.  ``seeds``: each model's shuffle seed (equal seeds share one
    shuffle, and the batch is gathered once).  ``log`` receives one-line messages (a
    closed pipe is ignored: it must not stop a checkpoint); ``progress`` switches the epoch's
    tqdm bar; ``stop_flag``: an object whose ``stop`` turns true to stop at the next step
    (default: Ctrl-C and SIGTERM).  ``device_data``: a dict that keeps the data sent to
    a device for the next trainer of the same process."""

    def __init__(self, config, model, optimizer, data, *, seeds, progress=True, log=print, threads=None,
                 stop_flag=None, device_data=None):
        self.config, self.model, self.optimizer, self.data = config, model, optimizer, data
        self.backend = model.backend
        self.progress, self._log, self.stop_flag = progress, log, stop_flag
        self.device_data = {} if device_data is None else device_data
        self.stepper = make_stepper(model, optimizer, threads=threads)
        self.shared_shuffle = len(set(seeds)) == 1
        # Shuffles: seeded as a single run seeds them (weights use ``seed`` alone).
        self.rngs = [np.random.default_rng([s, 1]) for s in (seeds[:1] if self.shared_shuffle else seeds)]
        self.state = {"epoch": 0, "iter": 0, "train_time_s": 0.0, "status": "running"}
        self.member_status = ["running"] * len(seeds)
        self._partial = {}  # the per-step records of an epoch interrupted midway

    # -- hooks

    def _checkpoint(self, rng_states, pos=0, partial_time_s=0.0, partial=None):
        raise NotImplementedError

    def _write_epoch(self, k, iter_records, record):
        raise NotImplementedError

    def _on_diverged(self, k, record):
        raise NotImplementedError

    def _line(self, epoch, active, records, diverged):
        raise NotImplementedError

    def _where_saved(self):
        raise NotImplementedError

    def _finish(self, last):
        raise NotImplementedError

    def _configs(self):
        """Each model's settings (its learning rate schedule)."""
        return [self.config]

    # -- the loop: run -> epochs -> (step loop, end of epoch | interrupt) -> finish

    def log(self, line):
        """Say ``line``; a reader that went away (``| head``, a tee killed by the same Ctrl-C)
        must not stop the run from saving what it did."""
        try:
            self._log(line)
        except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
            self._log = _silent

    def active(self):
        """The models still training (not diverged)."""
        return [k for k, s in enumerate(self.member_status) if s == "running"]

    def _rng_states(self):
        return [rng.bit_generator.state for rng in self.rngs]

    def _on_device(self):
        be, dtype, data = self.backend, self.model.dtype, self.data
        key = (be.name, str(be.device), str(dtype))
        if self.device_data.get(key, (None,))[0] is not data:  # sent to the device once
            val_x = getattr(data, "val_x", None)
            self.device_data[key] = (data, (be.asarray(data.train_x, dtype=dtype), be.asarray(data.train_y)),
                                     (be.asarray(data.test_x, dtype=dtype), be.asarray(data.test_y)),
                                     None if val_x is None else (be.asarray(val_x, dtype=dtype),
                                                                 be.asarray(data.val_y)))
        return self.device_data[key][1:]

    def _loop(self):
        """The epochs from where the state says to ``config.epochs``; returns ``_finish``'s value."""
        cfg = self.config
        train, test, self._val = self._on_device()
        if self.state["epoch"] < cfg.epochs:
            if getattr(self.backend, "compiles_first", lambda: False)():
                self.log("compiling the CPU kernels (first run only, ~10 s)")
            self._warm_up(train)
        last = [{} for _ in self.member_status]
        stop = StopFlag() if self.stop_flag is None else contextlib.nullcontext(self.stop_flag)
        with stop as flag:
            while self.state["epoch"] < cfg.epochs and self.active():
                if not self._epoch(train, test, flag, last):
                    break  # interrupted inside the epoch
                epoch = self.state["epoch"]
                if flag.stop and epoch < cfg.epochs and self.active():
                    self.state["status"] = "interrupted"
                    self._checkpoint(self._rng_states())
                    self.log(f"interrupted after epoch {epoch}; {self._where_saved()}")
                    break
        return self._finish(last)

    def _warm_up(self, train):
        idx = np.arange(self.config.batch_size)
        if len(self.rngs) > 1:
            idx = np.tile(idx, (len(self.rngs), 1))
        warm_up(self.stepper, *train, idx)

    def _permutation(self, n):
        """This epoch's shuffle: (n,) shared by all models, or (K, n) one row per model."""
        perms = [rng.permutation(n) for rng in self.rngs]
        return self.backend.asarray(perms[0] if len(perms) == 1 else np.stack(perms))

    def _epoch(self, train, test, flag, last):
        """One epoch from where the state says; False if it was interrupted."""
        be, dtype, xp = self.backend, self.model.dtype, self.model.xp
        n, batch = train[0].shape[0], self.config.batch_size
        epoch, iters = self.state["epoch"] + 1, n // batch  # a remainder of n is dropped
        self._schedule(epoch)
        epoch_rngs = self._rng_states()  # a checkpoint mid-epoch replays this permutation
        perm = self._permutation(n)
        losses = xp.zeros((iters, *self.model.stack), dtype=dtype)  # read once per epoch
        accs = xp.zeros((iters, *self.model.stack), dtype=dtype)
        pos = self.state.pop("pos", 0)
        if pos:  # resuming inside this epoch
            losses[:pos, ...] = be.asarray(self._partial["loss"], dtype=dtype)
            accs[:pos, ...] = be.asarray(self._partial["acc"], dtype=dtype)
        elapsed = self.state.pop("partial_time_s", 0.0)
        bar = self._bar(epoch, iters, pos)
        be.synchronize()
        start = time.perf_counter()
        done = step_loop(self.stepper, *train, perm, batch, losses, accs, pos, iters,
                         after_step=self._after_step(bar, losses, accs, iters, flag))
        be.synchronize()
        epoch_s = time.perf_counter() - start
        elapsed += epoch_s
        if bar is not None:
            bar.close()
        if done < iters:
            self.state["status"] = "interrupted"
            self._checkpoint(epoch_rngs, pos=done, partial_time_s=elapsed,
                             partial={"loss": be.to_numpy(losses[:done, ...]), "acc": be.to_numpy(accs[:done, ...])})
            self.log(f"interrupted in epoch {epoch} after {done}/{iters} iterations; {self._where_saved()}")
            return False
        self.state["train_time_s"] += elapsed
        self.optimizer.flush_denormals()
        self._end_epoch(epoch, iters, be.to_numpy(losses), be.to_numpy(accs), test, last, elapsed)
        return True

    def _schedule(self, epoch):
        """Give the optimizer each model's learning rate of ``epoch``: a function of the epoch
        alone, so a resumed run takes the rates it would have.  No schedule: lr untouched."""
        configs = self._configs()
        self._rates = None
        if any(c.lr_schedule is not None for c in configs):
            self._rates = [lr_at(c, epoch) for c in configs]
            self.optimizer.set_lr(self._rates if self.model.stack else self._rates[0])

    def _after_step(self, bar, losses, accs, iters, flag):
        """What the step loop does after each step: the progress bar, and stopping at a signal."""
        interval = BAR_READ_INTERVAL_CPU_S if str(self.backend.device) == "cpu" else BAR_READ_INTERVAL_S
        shown = [time.perf_counter()]

        def after_step(i):
            if bar is not None:
                bar.update(1)
                if time.perf_counter() - shown[0] >= interval:
                    shown[0] = time.perf_counter()
                    self._show_metrics(bar, losses, accs, i)
            return flag.stop and i + 1 < iters

        return after_step

    def _show_metrics(self, bar, losses, accs, i):
        be = self.backend
        loss, acc = (np.atleast_1d(be.to_numpy(a[i, ...])) for a in (losses, accs))
        finite = np.isfinite(loss)
        if finite.any():  # stacked: the mean over the models still training
            bar.set_postfix(loss=f"{float(np.mean(loss[finite])):.4f}", acc=f"{float(np.mean(acc[finite])):.3f}",
                            refresh=False)

    def _end_epoch(self, epoch, iters, losses, accs, test_data, last, epoch_s):
        cfg = self.config
        first_iter = self.state["iter"] + 1
        self.state["iter"] += iters
        self.state["epoch"] = epoch
        losses, accs = losses.reshape(iters, -1), accs.reshape(iters, -1)  # a column a model
        active = self.active()
        diverged = [k for k in active if not np.isfinite(losses[:, k]).all()]
        scheduled = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        test = val = None
        if (diverged or scheduled) and test_data[0].shape[0]:  # an estimator's fit has no test set
            # Diverged models are evaluated too: a network of NaNs predicts class 0 (arg-max of
            # NaNs), the accuracy the report prints for its momentum 1.0 row (class 0's share).
            with np.errstate(all="ignore"):
                test = [np.atleast_1d(m) for m in evaluate(self.model, *test_data)]
        if (diverged or scheduled) and self._val is not None:
            with np.errstate(all="ignore"):
                val = [np.atleast_1d(m) for m in evaluate(self.model, *self._val)]
        for k in active:
            record = {"kind": "epoch", "epoch": epoch, "iter": self.state["iter"],
                      "train_loss": float(np.mean(losses[:, k])), "train_acc": float(np.mean(accs[:, k])),
                      "test_loss": None, "test_acc": None, "train_time_s": self.state["train_time_s"]}
            if test is not None and (k in diverged or scheduled):
                record["test_loss"], record["test_acc"] = float(test[0][k]), float(test[1][k])
            if self._rates is not None and self._configs()[k].lr_schedule is not None:
                record["lr"] = self._rates[k]  # only with a schedule, as val: other records as they were
            if self._val is not None:  # only then: the records of a run without one are as they were
                record["val_loss"], record["val_acc"] = (float(val[0][k]), float(val[1][k])) if val else (None, None)
            every = cfg.log_every  # the values as Python floats in one call each (tolist), not one by one
            iter_records = [{"kind": "iter", "epoch": epoch, "iter": first_iter + i, "loss": loss, "acc": acc}
                            for i, loss, acc in zip(range(0, iters, every), losses[::every, k].tolist(),
                                                    accs[::every, k].tolist())]
            self._write_epoch(k, iter_records, record)
            last[k] = record
        for k in diverged:  # the others go on, bit for bit
            self.member_status[k] = "diverged"
            self._on_diverged(k, last[k])
        if epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs and self.active():
            self._checkpoint(self._rng_states())
        self.log(self._line(epoch, active, [last[k] for k in active], diverged)
                 + f"  time {epoch_s:.1f}s (total {self.state['train_time_s']:.1f}s)")

    def _bar(self, epoch, iters, pos):
        if not self.progress:
            return None
        from tqdm import tqdm
        models = f" x{len(self.active())}" if self.model.stack else ""
        return tqdm(total=iters, initial=pos, desc=f"epoch {epoch}/{self.config.epochs}{models}", leave=False,
                    unit="it", dynamic_ncols=True)


def _silent(line):
    pass


def write_tensorboard(writer, iter_records, record):
    """A run's records of an epoch as TensorBoard scalars (``writer`` None: nothing)."""
    if writer is None:
        return
    for rec in iter_records:
        writer.add_scalar("train/loss_iter", rec["loss"], rec["iter"])
        writer.add_scalar("train/acc_iter", rec["acc"], rec["iter"])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc"):
        if record.get(key) is not None:
            writer.add_scalar(key.replace("_", "/", 1), record[key], record["epoch"])
    writer.flush()


def fmt(value, spec):
    """A metric for a log line: ``nan`` for a missing or non-finite one."""
    return "nan" if value is None or not math.isfinite(value) else format(value, spec)
