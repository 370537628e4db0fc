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
import json
import math
import os
from pathlib import Path

import numpy as np

from .. import rundir
from ..backends import get_backend
from ..config import TrainConfig, TrainError
from ..core.model import MODELS, build_mlp
from ..core.optim import SGD
from .compiled import step_record
from .loop import EpochLoop, write_tensorboard
from .train import last_epoch_record

# What models of one group must share; the rest (PER_MODEL_KEYS) each model has its own.
GROUP_KEYS = ("model", "hidden", "activation", "loss", "batch_size", "dtype", "epochs", "device",
              "data_dir", "dataset", "data", "in_features", "classes", "val", "eval_every", "checkpoint_every",
              "log_every", "tensorboard")
PER_MODEL_KEYS = ("lr", "momentum", "weight_decay", "init_std", "seed", "lr_schedule")
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
                  stack=(len(configs),), in_features=first.in_features, num_classes=first.classes)
    hidden, activation, loss = MODELS[first.model] if first.hidden is None else \
        (first.hidden, first.activation, first.loss)
    model = build_mlp(hidden, activation, loss, **common)
    optimizer = SGD(model, lr=per_model["lr"], momentum=per_model["momentum"],
                    weight_decay=per_model["weight_decay"])
    return model, optimizer


def member_arrays(model, host_arrays, k):
    """Model k's slices of stacked parameter-shaped host arrays, in the one-model shapes
    (W: (in, out), b: (out,))."""
    return [a[k].reshape(-1) if name == "b" else a[k] for (layer, name), a in zip(model.parameters(), host_arrays)]


class StackTrainer(EpochLoop):
    """Trains K configs that share GROUP_KEYS as one stacked model into K run directories.

    ``group_dir`` holds the group's checkpoint and ``stack.json``.  ``log`` receives one-line
    progress messages; ``progress`` switches the per-epoch tqdm bar (one for the group);
    ``threads`` caps the compiled step's threads (a Ray task's CPUs); ``stop_flag`` and
    ``device_data``: see EpochLoop."""

    def __init__(self, configs, run_dirs, data, group_dir, *, resume=False, progress=True, log=print,
                 backend=None, device_data=None, threads=None, stop_flag=None):
        if len({group_key(c) for c in configs}) != 1:
            raise ValueError("configs of one stack must share " + ", ".join(GROUP_KEYS))
        self.configs, self.run_dirs = list(configs), [Path(d) for d in run_dirs]
        self.group_dir = Path(group_dir)
        self.checkpoint_path = self.group_dir / GROUP_CHECKPOINT
        backend = backend or get_backend(configs[0].device)
        model, optimizer = build_stacked(self.configs, backend)
        super().__init__(configs[0], model, optimizer, data, seeds=[c.seed for c in configs], progress=progress,
                         log=log, threads=threads, stop_flag=stop_flag, device_data=device_data)
        if resume:
            self._load()
        self._resumed = resume
        self.writers = [None] * len(configs)
        if self.config.tensorboard:
            from tensorboardX import SummaryWriter
            self.writers = [SummaryWriter(logdir=str(d), purge_step=self.state["iter"] + 1 if resume else None)
                            for d in self.run_dirs]

    def write_config(self):
        """The group's stack.json (first: it alone says what the group trains), then each
        member's config.json, as its single run writes it.  A resumed group keeps the
        settings it was started with: nothing to write."""
        if self._resumed:
            return
        self.group_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(self.group_dir / GROUP_FILE,
                          {"members": _relative(self.run_dirs, self.group_dir), "shared_shuffle": self.shared_shuffle,
                           "group": {k: getattr(self.config, k) for k in GROUP_KEYS},
                           "per_model": {k: [getattr(c, k) for c in self.configs] for k in PER_MODEL_KEYS}})
        for cfg, run_dir in zip(self.configs, self.run_dirs):
            run_dir.mkdir(parents=True, exist_ok=True)
            rundir.write_config(run_dir, cfg, self.backend, step_record(self.stepper),
                                getattr(self.data, "info", None))  # None: data without a record (tests)

    def _load(self):
        params, velocity, state, self._partial = rundir.load_checkpoint(self.checkpoint_path, self.model, GROUP_FILE)
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

    def run(self):
        """Train the group; returns the members' summary paths.  A full disk (DiskFull) ends
        it at its last group checkpoint, from which it resumes."""
        try:
            if self._resumed:
                for k in self.active():
                    rundir.truncate_metrics(self.run_dirs[k], self.state["epoch"])
            return self._loop()
        finally:
            for writer in self.writers:
                if writer is not None:
                    writer.close()

    # -- the loop's hooks

    def _checkpoint(self, rng_states, pos=0, partial_time_s=0.0, partial=None):
        state = dict(self.state, rngs=rng_states, pos=pos, partial_time_s=partial_time_s,
                     member_status=self.member_status, members=_relative(self.run_dirs, self.group_dir))
        rundir.save_checkpoint(self.checkpoint_path, *self._on_host(), state, partial)

    def _on_host(self):
        """(weights, momenta) of every model, copied to the host once."""
        return self.model.state_arrays(), [self.backend.to_numpy(v) for v in self.optimizer.state()]

    def _member_checkpoint(self, k, name=rundir.CHECKPOINT, host=None):
        """Model k's own checkpoint.npz (or best.npz), exactly what its single run leaves behind.
        ``host``: _on_host()'s arrays, when several members are saved at one point of the loop."""
        state = dict(self.state, status=self.member_status[k], rng=self._rng_states()[0 if self.shared_shuffle else k],
                     pos=0, partial_time_s=0.0)
        best = state.pop("best", None)  # the group's, a [val_acc, epoch] (or None) a model
        if best and best[k]:
            state.update(best_val_acc=best[k][0], best_epoch=best[k][1])
        params, velocity = host or self._on_host()
        rundir.save_checkpoint(self.run_dirs[k] / name, member_arrays(self.model, params, k),
                               member_arrays(self.model, velocity, k), state)

    def _configs(self):
        return self.configs

    def _write_epoch(self, k, iter_records, record):
        rundir.append_metrics(self.run_dirs[k], iter_records + [record])
        write_tensorboard(self.writers[k], iter_records, record)
        acc = record.get("val_acc")
        if acc is None:  # no validation split (or not evaluated this epoch): no best to keep
            return
        best = self.state.setdefault("best", [None] * len(self.configs))
        if best[k] is None or acc > best[k][0]:
            best[k] = [acc, record["epoch"]]
            self._member_checkpoint(k, rundir.BEST)

    def _on_diverged(self, k, record):
        """Frozen from now on (its updates masked), with its own checkpoint and summary."""
        self.optimizer.freeze(k)
        self._member_checkpoint(k)
        self._summary(k, record)

    def _line(self, epoch, active, records, diverged):
        text = (f"epoch {epoch:>3}/{self.config.epochs}  {len(active)} models  train loss "
                f"{_range([r['train_loss'] for r in records], '.4f')}")
        validated = [r["val_acc"] for r in records if r.get("val_acc") is not None]
        if validated:
            text += f"  val acc {_range(validated, '.4f')}"
        tested = [r["test_acc"] for r in records if r["test_acc"] is not None]
        if tested:
            text += f"  test acc {_range(tested, '.4f')}"
        if diverged:
            text += f"  DIVERGED: {', '.join(self.run_dirs[k].name for k in diverged)}"
        return text

    def _where_saved(self):
        return "group checkpoint saved"

    def _finish(self, last):
        interrupted = self.state["status"] == "interrupted"
        if not interrupted:
            host = self._on_host() if self.active() else None  # one copy for every member's checkpoint
            for k in self.active():
                self.member_status[k] = "completed"
                self._member_checkpoint(k, host=host)
            self.state["status"] = "completed"
            if any(last):  # an epoch ran in this call
                self._checkpoint(self._rng_states())
        for k in range(len(self.configs)):
            if self.member_status[k] == "diverged" and not last[k]:
                continue  # recorded when it diverged, in an earlier call
            status = self.member_status[k]
            if interrupted and status == "running":
                self.member_status[k] = "interrupted"
            self._summary(k, last[k] or last_epoch_record(self.run_dirs[k]))
            self.member_status[k] = status
        return [d / rundir.SUMMARY for d in self.run_dirs]

    def _summary(self, k, last):
        summary = {key: last.get(key) for key in METRIC_KEYS}
        summary.update(train_time_s=self.state["train_time_s"], epochs_completed=last.get("epoch", 0),
                       iterations=last.get("iter", 0), status=self.member_status[k],
                       epochs=self.config.epochs, model=self.config.name, device=self.backend.device)
        if self.config.val is not None:
            best = (self.state.get("best") or [None] * len(self.configs))[k] or [None, None]
            summary.update(val_loss=last.get("val_loss"), val_acc=last.get("val_acc"), best_val_acc=best[0],
                           best_epoch=best[1])
        rundir.write_summary(self.run_dirs[k], summary)


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
    """(configs, run dirs) of the group that ``group_dir``'s stack.json describes.  A member
    must lie in the group directory (a --seeds group) or, for a sweep's group in
    ``<root>/.stacks/``, directly in the sweep's root: a stack.json received from someone
    else cannot make a resume write anywhere else."""
    group_dir = Path(group_dir)
    path = group_dir / GROUP_FILE
    saved = rundir.read_json(path)
    try:
        members = [Path(os.path.normpath(group_dir / d)) for d in saved["members"]]
        # a key of PER_MODEL_KEYS that an older stack.json lacks: the default
        configs = [TrainConfig(**saved["group"], **{k: saved["per_model"][k][i] for k in PER_MODEL_KEYS
                                                    if k in saved["per_model"]})
                   for i in range(len(members))]
        for config in configs:
            config.validate()
    except (KeyError, IndexError, TypeError, TrainError) as exc:
        raise TrainError(f"{path}: not a stacked group's description ({exc}); restore or delete it") from None
    homes = [group_dir.resolve()] + ([group_dir.parent.parent.resolve()] if group_dir.parent.name == ".stacks" else [])
    for member in members:
        if member.is_symlink() or member.resolve().parent not in homes:
            raise TrainError(f"{path}: member {member} lies outside the group's directory; "
                             "a group's runs are its own subdirectories (or its sweep's)")
    return configs, members


def group_state(group_dir):
    """The loop state in a group's checkpoint (``status``, ``epoch``, ...), or None."""
    if not (Path(group_dir) / GROUP_FILE).is_file():
        return None
    try:
        return rundir.checkpoint_state(Path(group_dir) / GROUP_CHECKPOINT)
    except TrainError:  # a torn file is no state to plan by (resuming it is refused by name)
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
