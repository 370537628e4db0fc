"""Stacked training: K models of one architecture trained as one program over a leading axis.

A group shares architecture, batch size, dtype, epochs, device and run settings; each
model keeps its own learning rate, momentum, weight decay, init std and seed (its weights
and its shuffle), so each trains exactly what its separate run trains.  Each model still
gets its own run directory in the single-run format (config, metrics, summary and, once
it has finished, its own checkpoint), so ``eval``, ``report``, TensorBoard and ``--resume``
work unchanged.  While the group trains, its one checkpoint is ``stack-checkpoint.npz`` in
the group directory, beside ``stack.json``, which names the members.

Where all models share the shuffle seed they see the same batches.  On NumPy with Numba a
group takes the compiled step (compiled.py), each model the one-model step on its slices,
on one thread or, whole models each, two.
"""
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import rundir
from . import train as _train
from .backends import get_backend
from .config import TrainConfig, TrainError
from .model import build_mlp, build_model
from .optim import SGD
from .train import epoch_bar, evaluate, last_epoch_record, make_stepper, step_loop, warm_up, write_tensorboard

# What models of one group must share; the rest (PER_MODEL_KEYS) each model has its own.
GROUP_KEYS = ("model", "hidden", "activation", "loss", "batch_size", "dtype", "epochs", "device",
              "data_dir", "eval_every", "checkpoint_every", "log_every", "tensorboard")
PER_MODEL_KEYS = ("lr", "momentum", "weight_decay", "init_std", "seed")
GROUP_FILE, GROUP_CHECKPOINT = rundir.GROUP_FILE, rundir.GROUP_CHECKPOINT
METRIC_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc")


def group_key(config):
    """The settings a config must share with the others of its group."""
    return tuple(json.dumps(getattr(config, k)) for k in GROUP_KEYS)


def build_stacked(configs, backend):
    """(model, optimizer) of K stacked models, model k built and optimised as ``configs[k]``."""
    first = configs[0]
    per_model = {key: [getattr(c, key) for c in configs] for key in PER_MODEL_KEYS}
    common = dict(backend=backend, dtype=first.dtype, seed=per_model["seed"], init_std=per_model["init_std"],
                  stack=(len(configs),))
    model = build_model(first.model, **common) if first.hidden is None else \
        build_mlp(first.hidden, first.activation, first.loss, **common)
    optimizer = SGD(model, lr=per_model["lr"], momentum=per_model["momentum"],
                    weight_decay=per_model["weight_decay"])
    return model, optimizer


def member_arrays(model, stacked_arrays, k):
    """Model k's slices of stacked parameter-shaped arrays, in the one-model shapes
    (W: (in, out), b: (out,)), as host arrays."""
    out = []
    for (layer, name), a in zip(model.parameters(), stacked_arrays):
        a = np.asarray(model.backend.to_numpy(a))[k]
        out.append(a.reshape(-1) if name == "b" else a)
    return out


class _Member:
    """One stacked model's host arrays, shaped as the model and optimizer that
    ``save_checkpoint`` writes."""

    def __init__(self, params, velocity):
        self.params, self.velocity = params, velocity
        self.backend = get_backend("numpy")

    def state_arrays(self):
        return self.params

    def state(self):
        return self.velocity


class StackTrainer:
    """Trains K configs that share GROUP_KEYS as one stacked model into K run directories.

    ``group_dir`` holds the group's checkpoint and ``stack.json``.  ``log`` receives one-line
    progress messages; ``progress`` switches the per-epoch tqdm bar (one for the group);
    ``threads`` caps the compiled step's threads (a Ray task's CPUs); ``stop_flag``: an
    object whose ``stop`` turns true to stop at the next step (default: Ctrl-C and SIGTERM,
    a second Ctrl-C at once)."""

    def __init__(self, configs, run_dirs, data, group_dir, *, resume=False, progress=True, log=print,
                 backend=None, device_data=None, threads=None, stop_flag=None):
        keys = {group_key(c) for c in configs}
        if len(keys) != 1:
            raise ValueError("configs of one stack must share " + ", ".join(GROUP_KEYS))
        self.configs, self.run_dirs, self.data = list(configs), [Path(d) for d in run_dirs], data
        self.group_dir, self.progress, self.log = Path(group_dir), progress, log
        # ``device_data``: a dict that keeps the data sent to a device for the next group
        self.device_data = {} if device_data is None else device_data
        self.config, self.stop_flag = configs[0], stop_flag
        self.backend = backend or get_backend(self.config.device)
        self.model, self.optimizer = build_stacked(self.configs, self.backend)
        # the compiled step where there is one, on ``threads`` threads (None: threads.py's policy)
        self.stepper = make_stepper(self.model, self.optimizer, threads=threads)
        seeds = [c.seed for c in configs]
        # Shuffles: seeded as a single run seeds them.  Equal seeds give equal permutations,
        # so one generator serves all and the batch is gathered once.
        self.shared_shuffle = len(set(seeds)) == 1
        self.rngs = [np.random.default_rng([s, 1]) for s in (seeds[:1] if self.shared_shuffle else seeds)]
        self.state = {"epoch": 0, "iter": 0, "train_time_s": 0.0, "status": "running"}
        self.member_status = ["running"] * len(configs)
        self._partial = {}
        if resume:
            self._load()
        self._resumed = resume
        self.writers = [None] * len(configs)
        if self.config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writers = [SummaryWriter(logdir=str(d), purge_step=self.state["iter"] + 1 if resume else None)
                            for d in self.run_dirs]

    # -- files

    def write_config(self):
        """The group's stack.json (first: it alone says what the group trains), then each
        member's config.json, as its single run writes it."""
        self.group_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(self.group_dir / GROUP_FILE,
                          {"members": _relative(self.run_dirs, self.group_dir), "shared_shuffle": self.shared_shuffle,
                           "group": {k: getattr(self.config, k) for k in GROUP_KEYS},
                           "per_model": {k: [getattr(c, k) for c in self.configs] for k in PER_MODEL_KEYS}})
        for cfg, run_dir in zip(self.configs, self.run_dirs):
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_config(run_dir, cfg, self.backend, self.stepper)

    def _checkpoint(self, rng_states, pos=0, partial_time_s=0.0, partial=None):
        arrays = {f"param_{i}": self.backend.to_numpy(a) for i, a in enumerate(self.model.state_arrays())}
        arrays.update({f"velocity_{i}": self.backend.to_numpy(v) for i, v in enumerate(self.optimizer.state())})
        arrays.update({f"partial_{k}": v for k, v in (partial or {}).items()})
        state = dict(self.state, rngs=rng_states, pos=pos, partial_time_s=partial_time_s,
                     member_status=self.member_status, members=_relative(self.run_dirs, self.group_dir),
                     num_params=len(self.model.parameters()))
        arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
        rundir.atomic_write(self.group_dir / GROUP_CHECKPOINT, lambda f: np.savez(f, **arrays),
                            size=sum(a.nbytes for a in arrays.values()))

    def _load(self):
        path = self.group_dir / GROUP_CHECKPOINT
        try:
            with np.load(path) as npz:
                state = json.loads(npz["state"].tobytes().decode())
                params = [npz[f"param_{i}"] for i in range(state["num_params"])]
                velocity = [npz[f"velocity_{i}"] for i in range(state["num_params"])]
                self._partial = {k[len("partial_"):]: npz[k] for k in npz.files if k.startswith("partial_")}
        except Exception as exc:  # missing, truncated or foreign
            raise TrainError(f"{path}: unreadable stack checkpoint ({exc})") from None
        self.model.load_state_arrays(params)
        self.optimizer.load_state([self.backend.asarray(v, dtype=self.model.dtype) for v in velocity])
        for rng, rng_state in zip(self.rngs, state.pop("rngs")):
            rng.bit_generator.state = rng_state
        self.member_status = state.pop("member_status")
        for k, status in enumerate(self.member_status):
            if status != "running":
                self.optimizer.freeze(k)
        for key in ("members", "num_params"):
            state.pop(key)
        self.state.update(state, status="running")

    def _member_checkpoint(self, k, rng_state):
        """Model k's own checkpoint.npz, exactly what its single run leaves behind."""
        member = _Member(member_arrays(self.model, self.model.state_arrays(), k),
                         member_arrays(self.model, self.optimizer.state(), k))
        state = dict(self.state, status=self.member_status[k], rng=rng_state, pos=0, partial_time_s=0.0,
                     num_params=len(member.params))
        rundir.save_checkpoint(self.run_dirs[k], member, member, state, {})

    def _summary(self, k, last):
        summary = {key: last.get(key) for key in METRIC_KEYS}
        summary.update(train_time_s=self.state["train_time_s"], epochs_completed=last.get("epoch", 0),
                       iterations=last.get("iter", 0), status=self.member_status[k],
                       epochs=self.config.epochs, model=self.config.name, device=self.backend.device)
        rundir.write_summary(self.run_dirs[k], summary)

    # -- the loop

    def _active(self):
        return [k for k, s in enumerate(self.member_status) if s == "running"]

    def _permutation(self, n):
        """This epoch's shuffle: (n,) shared by all models, or (K, n) one row per model."""
        perms = [rng.permutation(n) for rng in self.rngs]
        return self.backend.asarray(perms[0] if self.shared_shuffle else np.stack(perms))

    def run(self):
        """Train the group; returns the members' summary paths.  A full disk (DiskFull) ends
        it at its last group checkpoint, from which it resumes."""
        try:
            return self._run()
        finally:
            for writer in self.writers:
                if writer is not None:
                    writer.close()

    def _run(self):
        cfg, be = self.config, self.backend
        xp = be.xp
        dtype = self.model.dtype
        key = (be.name, str(be.device), str(dtype))
        if self.device_data.get(key, (None,))[0] is not self.data:  # sent to the device once
            self.device_data[key] = (self.data, be.asarray(self.data.train_x, dtype=dtype),
                                     be.asarray(self.data.train_y), be.asarray(self.data.test_x, dtype=dtype),
                                     be.asarray(self.data.test_y))
        x_train, y_train, x_test, y_test = self.device_data[key][1:]
        n, batch, models = x_train.shape[0], cfg.batch_size, len(self.configs)
        iters = n // batch
        last = [{} for _ in range(models)]
        if self._resumed:
            for k in self._active():
                rundir.truncate_metrics(self.run_dirs[k], self.state["epoch"])
        if self.state["epoch"] < cfg.epochs:
            self._warm_up(x_train, y_train, batch)
        # looked up here, where the tests can wrap it; a caller's own flag (a Ray task's) instead
        stop = _train._StopFlag() if self.stop_flag is None else contextlib.nullcontext(self.stop_flag)
        with stop as flag:
            while self.state["epoch"] < cfg.epochs and self._active():
                epoch = self.state["epoch"] + 1
                epoch_rngs = [rng.bit_generator.state for rng in self.rngs]
                perm = self._permutation(n)
                loss_per_iter = xp.zeros((iters, models), dtype=dtype)
                acc_per_iter = xp.zeros((iters, models), dtype=dtype)
                pos = self.state.pop("pos", 0)
                if pos:
                    loss_per_iter[:pos, ...] = be.asarray(self._partial["loss"], dtype=dtype)
                    acc_per_iter[:pos, ...] = be.asarray(self._partial["acc"], dtype=dtype)
                elapsed = self.state.pop("partial_time_s", 0.0)
                bar = self._bar(epoch, iters, pos)
                be.synchronize()
                start = time.perf_counter()

                def after_step(i):
                    if bar is not None:
                        bar.update(1)
                    return flag.stop and i + 1 < iters

                done = step_loop(self.stepper, x_train, y_train, perm, batch, loss_per_iter, acc_per_iter, pos,
                                 iters, after_step)
                stopped_at = done if done < iters else None
                be.synchronize()
                elapsed += time.perf_counter() - start
                if bar is not None:
                    bar.close()
                if stopped_at is not None:
                    self.state["status"] = "interrupted"
                    self._checkpoint(epoch_rngs, pos=stopped_at, partial_time_s=elapsed,
                                     partial={"loss": be.to_numpy(loss_per_iter[:stopped_at, ...]),
                                              "acc": be.to_numpy(acc_per_iter[:stopped_at, ...])})
                    self.log(f"interrupted in epoch {epoch} after {stopped_at}/{iters} iterations; "
                             "group checkpoint saved")
                    break
                self.state["train_time_s"] += elapsed
                self.optimizer.flush_denormals()
                self._end_epoch(epoch, iters, be.to_numpy(loss_per_iter), be.to_numpy(acc_per_iter),
                                x_test, y_test, last)
                if flag.stop and epoch < cfg.epochs and self._active():
                    self.state["status"] = "interrupted"
                    self._checkpoint(self._rng_states())
                    self.log(f"interrupted after epoch {epoch}; group checkpoint saved")
                    break
        interrupted = self.state["status"] == "interrupted"
        for k in self._active():
            if not interrupted:
                self.member_status[k] = "completed"
                self._member_checkpoint(k, self._rng_state(k))
        if not interrupted:
            self.state["status"] = "completed"
            self._checkpoint(self._rng_states())
        for k in range(models):
            if self.member_status[k] == "diverged" and not last[k]:
                continue  # recorded when it diverged, in an earlier call
            status = self.member_status[k]
            if interrupted and status == "running":
                self.member_status[k] = "interrupted"
            self._summary(k, last[k] or last_epoch_record(self.run_dirs[k]))
            self.member_status[k] = status
        return [d / "summary.json" for d in self.run_dirs]

    def _warm_up(self, x, y, batch):
        models = len(self.configs)
        warm_up(self.stepper, x, y, np.arange(batch) if self.shared_shuffle else np.tile(np.arange(batch), (models, 1)))

    def _rng_states(self):
        return [rng.bit_generator.state for rng in self.rngs]

    def _rng_state(self, k):
        return self.rngs[0 if self.shared_shuffle else k].bit_generator.state

    def _end_epoch(self, epoch, iters, losses, accs, x_test, y_test, last):
        cfg = self.config
        first_iter = self.state["iter"] + 1
        self.state["iter"] += iters
        self.state["epoch"] = epoch
        active = self._active()
        diverged = [k for k in active if not np.isfinite(losses[:, k]).all()]
        test = None
        if diverged or epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with np.errstate(all="ignore"):
                test = evaluate(self.model, x_test, y_test)
        for k in active:
            record = {"kind": "epoch", "epoch": epoch, "iter": self.state["iter"],
                      "train_loss": float(np.mean(losses[:, k])), "train_acc": float(np.mean(accs[:, k])),
                      "test_loss": None, "test_acc": None, "train_time_s": self.state["train_time_s"]}
            if test is not None and (k in diverged or epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                record["test_loss"], record["test_acc"] = float(test[0][k]), float(test[1][k])
            iter_records = [{"kind": "iter", "epoch": epoch, "iter": first_iter + i,
                             "loss": float(losses[i, k]), "acc": float(accs[i, k])}
                            for i in range(0, iters, cfg.log_every)]
            rundir.append_metrics(self.run_dirs[k], iter_records + [record])
            write_tensorboard(self.writers[k], iter_records, record)
            last[k] = record
        for k in diverged:  # frozen from now on: the others go on, bit for bit
            self.member_status[k] = "diverged"
            self.optimizer.freeze(k)
            self._member_checkpoint(k, self._rng_state(k))
            self._summary(k, last[k])
        if epoch % cfg.checkpoint_every == 0 and epoch < cfg.epochs and self._active():
            self._checkpoint(self._rng_states())
        self.log(self._line(epoch, active, losses, test, diverged))

    def _line(self, epoch, active, losses, test, diverged):
        means = np.mean(losses[:, active], axis=0)
        text = (f"epoch {epoch:>3}/{self.config.epochs}  {len(active)} models  train loss "
                f"{_range(means, '.4f')}")
        if test is not None:
            text += f"  test acc {_range(test[1][active], '.4f')}"
        if diverged:
            text += f"  DIVERGED: {', '.join(self.run_dirs[k].name for k in diverged)}"
        return text + f"  time {self.state['train_time_s']:.1f}s"

    def _bar(self, epoch, iters, pos):
        return epoch_bar(self.progress, f"epoch {epoch}/{self.config.epochs} x{len(self._active())}", iters, pos)

def _relative(run_dirs, group_dir):
    """The members as stack.json names them: relative to the group directory, so that a
    group moved or resumed from another working directory still finds them."""
    return [os.path.relpath(d, group_dir) for d in run_dirs]


def group_of(run_dir):
    """The group directory whose stack.json names ``run_dir`` as a member, or None.  A member's
    checkpoint is its group's, so a member resumes only through its group: a --seeds group
    is the member's parent, a sweep's group sits in the sweep's ``.stacks/``."""
    run_dir = Path(run_dir).resolve()
    for group in [run_dir.parent, *sorted((run_dir.parent / ".stacks").glob("*"))]:
        try:
            members = rundir.read_json(group / GROUP_FILE).get("members")
        except (OSError, TrainError):  # no group there, or not one's description
            continue
        if isinstance(members, list) and any(isinstance(d, str) and (group / d).resolve() == run_dir
                                             for d in members):
            return group
    return None


def group_configs(group_dir):
    """(configs, run dirs) of the group that ``group_dir``'s stack.json describes."""
    path = Path(group_dir) / GROUP_FILE
    saved = rundir.read_json(path)
    try:
        members = [Path(os.path.normpath(Path(group_dir) / d)) for d in saved["members"]]
        configs = [TrainConfig(**saved["group"], **{k: saved["per_model"][k][i] for k in PER_MODEL_KEYS})
                   for i in range(len(members))]
        for config in configs:
            config.validate()
    except (KeyError, IndexError, TypeError, TrainError) as exc:
        raise TrainError(f"{path}: not a stacked group's description ({exc}); restore or delete it") from None
    return configs, members


@contextlib.contextmanager
def hold_group(group_dir, run_dirs):
    """Be the one writer of the group directory and of every member's run directory while
    inside (rundir.hold_run_dir); RunDirBusy if another process holds any of them."""
    with contextlib.ExitStack() as held:
        for d in [group_dir, *run_dirs]:
            Path(d).mkdir(parents=True, exist_ok=True)
            held.enter_context(rundir.hold_run_dir(d))
        yield


def resume_or_restart(group_dir, run_dirs, log):
    """True to resume the group from its checkpoint.  A group stopped before its first one is
    cleared (its members' records and stack.json) and started again, saying so.  Call it
    while holding the group (hold_group)."""
    if group_state(group_dir) is not None:
        return True
    group_dir = Path(group_dir)
    if (group_dir / GROUP_FILE).exists() or any((d / name).exists() for d in run_dirs
                                                for name in rundir.RESULT_FILES):
        log(f"{group_dir}: no group checkpoint yet (stopped before its first one); starting it again from scratch")
        clear_group(group_dir, run_dirs)
    return False


def clear_group(group_dir, run_dirs):
    """Remove what a group's earlier start left (members' records, the group's files), so
    that it can start again.  Call it while holding the group (hold_group)."""
    for d in run_dirs:
        rundir.clear_run_dir(d)
    for name in (GROUP_FILE, GROUP_CHECKPOINT, rundir.SUMMARY):
        (Path(group_dir) / name).unlink(missing_ok=True)


def group_state(group_dir):
    """The loop state in a group's checkpoint (``status``, ``epoch``, ...), or None."""
    path = Path(group_dir) / GROUP_CHECKPOINT
    if not (path.is_file() and (Path(group_dir) / GROUP_FILE).is_file()):
        return None
    try:
        with np.load(path) as npz:
            return json.loads(npz["state"].tobytes().decode())
    except Exception:  # noqa: BLE001 - a torn file is no checkpoint
        return None


def _range(values, spec):
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    lo, hi = min(finite), max(finite)
    return format(lo, spec) if lo == hi else f"{format(lo, spec)}..{format(hi, spec)}"


def aggregate(summaries):
    """mean, std (population), min and max of each metric over runs' summaries."""
    out = {}
    for key in METRIC_KEYS + ("train_time_s",):
        values = [s[key] for s in summaries if s.get(key) is not None and math.isfinite(s[key])]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                        "min": float(np.min(values)), "max": float(np.max(values)), "n": len(values)}
    return out
