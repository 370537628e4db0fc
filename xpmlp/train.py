"""The training loop and the run directory it leaves behind.

A run directory is the unit of record:
  config.json    every setting, library versions, the device actually used
  metrics.jsonl  one JSON object per logged iteration and per epoch
  summary.json   final metrics and status (completed / diverged / interrupted)
  checkpoint.npz weights, optimizer state, RNG state and position, written atomically
  events.*       TensorBoard event files (--tensorboard)
"""
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .backends import get_backend
from .model import MODELS, build_mlp, build_model
from .optim import SGD

CHECKPOINT = "checkpoint.npz"
# Settings that define the trajectory: a resume must not contradict them.
TRAJECTORY_KEYS = ("model", "hidden", "activation", "loss", "batch_size", "lr", "momentum",
                   "weight_decay", "init_std", "seed", "dtype")


# The progress bar shows the latest step's loss and accuracy, read from the device at most
# this often: each read waits for the GPU to finish the queued steps.
BAR_READ_INTERVAL_S = 2.0


class TrainError(Exception):
    """A user-facing problem with the run (bad settings, unusable directory): one line."""


@dataclasses.dataclass
class TrainConfig:
    model: str = "mlp2-relu-sce"
    hidden: list | None = None       # with activation and loss: a custom MLP instead of a named one
    activation: str | None = None
    loss: str | None = None
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    init_std: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    data_dir: str | None = None
    eval_every: int = 1
    checkpoint_every: int = 1
    log_every: int = 1
    tensorboard: bool = False

    def validate(self):
        if self.hidden is None and self.model not in MODELS:
            raise TrainError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        if self.hidden is not None:
            if self.activation not in ("relu", "sigmoid") and self.hidden:
                raise TrainError("--activation must be relu or sigmoid")
            if self.loss not in ("mse", "sce"):
                raise TrainError("--loss must be mse or sce")
            if any(h <= 0 for h in self.hidden):
                raise TrainError("--hidden sizes must be positive")
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise TrainError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise TrainError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum <= 1:
            raise TrainError(f"--momentum must be in [0, 1], got {self.momentum}")
        if not self.weight_decay >= 0:
            raise TrainError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.init_std > 0:
            raise TrainError(f"--init-std must be positive, got {self.init_std}")
        if self.dtype not in ("float32", "float64"):
            raise TrainError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.batch_size > 60000:
            raise TrainError(f"--batch-size {self.batch_size} exceeds the 60000 training images")
        return self

    @property
    def name(self):
        if self.hidden is None:
            return self.model
        return f"mlp{'-'.join(map(str, self.hidden)) or '0'}-{self.activation}-{self.loss}"

    def build(self, backend):
        if self.hidden is None:
            return build_model(self.model, backend=backend, dtype=self.dtype,
                               init_std=self.init_std, seed=self.seed)
        return build_mlp(self.hidden, self.activation, self.loss, backend=backend,
                         dtype=self.dtype, init_std=self.init_std, seed=self.seed)


# ---------------------------------------------------------------- files written safely

def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename: a killed
    process or full disk leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def _clean(value):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def versions():
    import numpy
    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "xpmlp": __import__("xpmlp").__version__}
    if "cupy" in sys.modules:
        found["cupy"] = sys.modules["cupy"].__version__
    return found


def load_run_config(run_dir):
    """(TrainConfig, raw dict) from a run directory's config.json."""
    saved = read_json(Path(run_dir) / "config.json")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    if config.hidden is not None:  # the saved "model" is a name derived from hidden/activation/loss
        config.model = TrainConfig.model
    return config, saved


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, model, optimizer, state, partial):
    """Weights, momentum, RNG state and loop position in one .npz, written atomically."""
    arrays = {f"param_{i}": a for i, a in enumerate(model.state_arrays())}
    arrays.update({f"partial_{k}": v for k, v in partial.items()})
    arrays.update({f"velocity_{i}": model.backend.to_numpy(v) for i, v in enumerate(optimizer.state())})
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: np.savez(f, **arrays))


def load_checkpoint(run_dir):
    path = Path(run_dir) / CHECKPOINT
    try:
        with np.load(path) as npz:
            state = json.loads(npz["state"].tobytes().decode())
            params = [npz[f"param_{i}"] for i in range(state["num_params"])]
            velocity = [npz[f"velocity_{i}"] for i in range(state["num_params"])]
            partial = {k[len("partial_"):]: npz[k] for k in npz.files if k.startswith("partial_")}
    except FileNotFoundError:
        raise TrainError(f"{run_dir}: no checkpoint to resume from ({CHECKPOINT} missing)") from None
    except Exception as exc:  # truncated or foreign file
        raise TrainError(f"{path}: unreadable checkpoint ({exc})") from None
    return params, velocity, state, partial


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
    """Mean loss and accuracy over a whole set, read back once."""
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
    return float(be.to_numpy(loss_sum)) / n, float(be.to_numpy(acc_sum)) / n


class Stepper:
    """One SGD step on the batch ``idx`` of (x, y), its loss and accuracy stored at
    ``loss_out[i]``, ``acc_out[i]`` on the device (read back once per epoch, not per step)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.xp = model, optimizer, model.xp
        self._batch = None  # fast path: the batch is gathered into fixed buffers

    def gather(self, x, y, idx):
        take = self.model.backend.take_rows
        if self.model.flat is None:
            return take(x, idx), take(y, idx)
        if self._batch is None or self._batch[0].shape[0] != idx.shape[0]:
            self._batch = (self.xp.empty((idx.shape[0], x.shape[1]), dtype=x.dtype),
                           self.xp.empty((idx.shape[0],), dtype=y.dtype))
        return take(x, idx, out=self._batch[0]), take(y, idx, out=self._batch[1])

    def step(self, x, y, idx, loss_out, acc_out, i):
        model = self.model
        xb, yb = self.gather(x, y, idx)
        model.loss.forward_with_accuracy(model.forward(xb), yb, out=(loss_out[i:i + 1], acc_out[i:i + 1]))
        model.backward(model.loss.backward())
        self.optimizer.step()


class Trainer:
    """Trains one model on MNIST into a run directory.  ``log`` receives one-line
    progress messages; ``progress`` switches the per-epoch tqdm bar."""

    def __init__(self, config, run_dir, data, *, resume=False, progress=True, log=print,
                 notice=None, backend=None):
        self.config, self.run_dir, self.data = config, Path(run_dir), data
        self.progress, self.log = progress, log
        # ``backend``: one the caller already chose (probing CUDA can take seconds).
        self.backend = backend or get_backend(config.device, notice=notice)
        self.model = config.build(self.backend)
        self.optimizer = SGD(self.model, lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)
        self.stepper = Stepper(self.model, self.optimizer)
        self.rng = np.random.default_rng([config.seed, 1])  # shuffles; weights use `seed` alone
        self.state = {"epoch": 0, "iter": 0, "train_time_s": 0.0, "status": "running"}
        if resume:
            params, velocity, state, self._partial = load_checkpoint(self.run_dir)
            self.model.load_state_arrays(params)
            self.optimizer.load_state([self.backend.asarray(v, dtype=self.model.dtype) for v in velocity])
            self.rng.bit_generator.state = state.pop("rng")
            state.pop("num_params")
            self.state.update(state, status="running")
        self._resumed = resume  # metrics past the checkpoint are dropped by run(), not here: eval only reads
        self.writer = None
        if config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(logdir=str(self.run_dir), purge_step=self.state["iter"] + 1 if resume else None)

    # -- files

    def write_config(self):
        cfg = dataclasses.asdict(self.config)
        cfg.update(model=self.config.name, device_used=self.backend.describe(), versions=versions(),
                   machine=platform.machine(), platform=platform.platform())
        write_json(self.run_dir / "config.json", cfg)

    def _truncate_metrics(self, epoch):
        """On resume, drop records past the checkpoint: they will be produced again."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] <= epoch]
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())

    def _append_metrics(self, records):
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            for rec in records:
                f.write(json.dumps(_clean(rec)) + "\n")
            f.flush()

    def _checkpoint(self, rng_state, pos=0, partial_time_s=0.0, partial=None):
        """``rng_state`` is the shuffle RNG before the permutation of the epoch in progress;
        ``pos`` > 0 marks a checkpoint taken inside that epoch after ``pos`` iterations."""
        state = dict(self.state, rng=rng_state, pos=pos, partial_time_s=partial_time_s,
                     num_params=len(self.model.parameters()))
        save_checkpoint(self.run_dir, self.model, self.optimizer, state, partial or {})

    def _summary(self, last):
        summary = {k: last.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
        summary.update(train_time_s=self.state["train_time_s"], epochs_completed=self.state["epoch"],
                       iterations=self.state["iter"], status=self.state["status"],
                       epochs=self.config.epochs, model=self.config.name, device=self.backend.device)
        write_json(self.run_dir / "summary.json", summary)

    # -- the loop

    def run(self):
        cfg, be = self.config, self.backend
        xp = be.xp
        x_train = be.asarray(self.data.train_x, dtype=self.model.dtype)  # sent to the device once
        y_train = be.asarray(self.data.train_y)
        x_test = be.asarray(self.data.test_x, dtype=self.model.dtype)
        y_test = be.asarray(self.data.test_y)
        n, batch = x_train.shape[0], cfg.batch_size
        iters = n // batch  # the report's batch sizes all divide 60000; a remainder is dropped
        last = {}
        if self._resumed:
            self._truncate_metrics(self.state["epoch"])
        if self.state["epoch"] < cfg.epochs:
            self._warm_up(x_train, y_train, batch)
        with _StopFlag() as flag:
            while self.state["epoch"] < cfg.epochs:
                epoch = self.state["epoch"] + 1
                epoch_rng = self.rng.bit_generator.state  # a checkpoint mid-epoch replays this permutation
                perm = be.asarray(self.rng.permutation(n))
                loss_per_iter = xp.zeros((iters,), dtype=self.model.dtype)  # read once per epoch
                acc_per_iter = xp.zeros((iters,), dtype=self.model.dtype)
                pos = self.state.pop("pos", 0)
                if pos:  # resuming inside this epoch
                    loss_per_iter[:pos] = be.asarray(self._partial["loss"], dtype=self.model.dtype)
                    acc_per_iter[:pos] = be.asarray(self._partial["acc"], dtype=self.model.dtype)
                elapsed = self.state.pop("partial_time_s", 0.0)
                bar = self._bar(epoch, iters, pos)
                stopped_at = None
                be.synchronize()
                start = shown = time.perf_counter()
                for i in range(pos, iters):
                    idx = perm[i * batch:(i + 1) * batch]
                    self.stepper.step(x_train, y_train, idx, loss_per_iter, acc_per_iter, i)
                    if bar is not None:
                        bar.update(1)
                        # Reading a device value waits for the GPU: at most once per interval.
                        if time.perf_counter() - shown >= BAR_READ_INTERVAL_S:
                            shown = time.perf_counter()
                            self._show_metrics(bar, loss_per_iter, acc_per_iter, i)
                    if flag.stop and i + 1 < iters:
                        stopped_at = i + 1
                        break
                be.synchronize()
                elapsed += time.perf_counter() - start
                if bar is not None:
                    bar.close()
                if stopped_at is not None:
                    self.state["status"] = "interrupted"
                    self._checkpoint(epoch_rng, pos=stopped_at, partial_time_s=elapsed,
                                     partial={"loss": be.to_numpy(loss_per_iter[:stopped_at]),
                                              "acc": be.to_numpy(acc_per_iter[:stopped_at])})
                    self.log(f"interrupted in epoch {epoch} after {stopped_at}/{iters} iterations; checkpoint saved; "
                             f"resume with: xpmlp train --resume {self.run_dir}")
                    break
                self.state["train_time_s"] += elapsed
                self.optimizer.flush_denormals()
                losses, accs = be.to_numpy(loss_per_iter), be.to_numpy(acc_per_iter)
                last = self._end_epoch(epoch, iters, losses, accs, x_test, y_test)
                if last.get("diverged"):
                    break
                if flag.stop and epoch < cfg.epochs:
                    self.state["status"] = "interrupted"
                    self._checkpoint(self.rng.bit_generator.state)
                    self.log(f"interrupted after epoch {epoch}; resume with: xpmlp train --resume {self.run_dir}")
                    break
        if self.state["status"] == "running":
            self.state["status"] = "completed"
        if self.state["status"] in ("completed", "diverged"):
            self._checkpoint(self.rng.bit_generator.state)
        if not last:  # no epoch finished in this call: report the last one on record
            last = self._last_epoch_record()
        self._summary(last)
        if self.writer is not None:
            self.writer.close()
        return self.run_dir / "summary.json"

    def _warm_up(self, x, y, batch):
        """One step on the first batch before any epoch is timed, then the weights and
        momenta put back as they were: it compiles what a step runs (CuPy's kernels and ours,
        Numba's), so that epoch 1's train_time_s is training, not compilation."""
        be, model = self.backend, self.model
        params = [np.array(a, copy=True) for a in model.state_arrays()]
        velocity = [np.array(be.to_numpy(v), copy=True) for v in self.optimizer.state()]
        loss, acc = (be.xp.zeros((1,), dtype=model.dtype) for _ in range(2))
        self.stepper.step(x, y, be.asarray(np.arange(batch)), loss, acc, 0)
        model.load_state_arrays(params)
        self.optimizer.load_state([be.asarray(v, dtype=model.dtype) for v in velocity])
        be.synchronize()

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
        self._append_metrics(iter_records + [record])
        if self.writer is not None:
            for rec in iter_records:
                self.writer.add_scalar("train/loss_iter", rec["loss"], rec["iter"])
                self.writer.add_scalar("train/acc_iter", rec["acc"], rec["iter"])
            for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
                if record[key] is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), record[key], epoch)
            self.writer.flush()
        if epoch % cfg.checkpoint_every == 0 and not diverged and epoch < cfg.epochs:
            self._checkpoint(self.rng.bit_generator.state)
        self.log(self._line(record) + ("  DIVERGED (non-finite loss)" if diverged else ""))
        return dict(record, diverged=diverged)

    def _last_epoch_record(self):
        path = self.run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
        epochs = [r for r in records if r["kind"] == "epoch"]
        return epochs[-1] if epochs else {}

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
        if not self.progress:
            return None
        from tqdm import tqdm
        return tqdm(total=iters, initial=pos, desc=f"epoch {epoch}/{self.config.epochs}", leave=False,
                    unit="it", dynamic_ncols=True)
