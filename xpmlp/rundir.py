"""The run directory, the unit of record: every file a run writes or reads is here.

  config.json    every setting, library versions, the device actually used
  metrics.jsonl  one JSON object per logged iteration (kind "iter") and per epoch ("epoch")
  summary.json   final metrics and status (completed / diverged / interrupted)
  checkpoint.npz weights, optimizer state, RNG state and position, written atomically
  events.*       TensorBoard event files (--tensorboard; written by the trainer's writer)

A results copy (``xpmlp report --copy-runs``) keeps config.json, summary.json and the
epoch records alone as epochs.jsonl; ``read_records`` reads either.
"""
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from .config import TrainConfig, TrainError

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.npz"
EPOCHS_COPY = "epochs.jsonl"


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


# ---------------------------------------------------------------- config and summary

def versions():
    import numpy
    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "xpmlp": __import__("xpmlp").__version__}
    if "cupy" in sys.modules:
        found["cupy"] = sys.modules["cupy"].__version__
    return found


def write_config(run_dir, config, backend):
    """config.json: the settings, the device that ran them and the library versions."""
    saved = dataclasses.asdict(config)
    saved.update(model=config.name, device_used=backend.describe(), versions=versions(),
                 machine=platform.machine(), platform=platform.platform())
    write_json(Path(run_dir) / CONFIG, saved)


def load_config(run_dir):
    """(TrainConfig, raw dict) from a run directory's config.json."""
    saved = read_json(Path(run_dir) / CONFIG)
    return TrainConfig.from_saved(saved), saved


def is_run(run_dir):
    """Whether ``run_dir`` holds a run that can be evaluated or resumed."""
    return (Path(run_dir) / CONFIG).is_file() and (Path(run_dir) / CHECKPOINT).is_file()


def write_summary(run_dir, summary):
    write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir):
    """summary.json as a dict; {} while the run has none (running, or never finished)."""
    path = Path(run_dir) / SUMMARY
    return read_json(path) if path.exists() else {}


# ---------------------------------------------------------------- metrics

def append_metrics(run_dir, records):
    with open(Path(run_dir) / METRICS, "a") as f:
        for rec in records:
            f.write(json.dumps(_clean(rec)) + "\n")
        f.flush()


def read_records(run_dir):
    """The run's metric records in order: metrics.jsonl, or a results copy's epochs.jsonl
    (whose records have no "kind": they are all epochs).  A blank or half-written last line
    of a live run is skipped."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS if (run_dir / METRICS).exists() else run_dir / EPOCHS_COPY
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def epoch_records(records):
    return [r for r in records if r.get("kind", "epoch") == "epoch"]


def truncate_metrics(run_dir, epoch):
    """On resume, drop records past ``epoch`` (the checkpoint's): they will be produced again."""
    path = Path(run_dir) / METRICS
    if path.exists():
        keep = [r for r in read_records(run_dir) if r["epoch"] <= epoch]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, model, optimizer, state, partial):
    """Weights, momentum, RNG state and loop position in one .npz, written atomically."""
    arrays = {f"param_{i}": a for i, a in enumerate(model.state_arrays())}
    arrays.update({f"partial_{k}": v for k, v in partial.items()})
    arrays.update({f"velocity_{i}": model.backend.to_numpy(v) for i, v in enumerate(optimizer.state())})
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: np.savez(f, **arrays))


def load_checkpoint(run_dir):
    """(params, velocity, state, partial) of the run's checkpoint, as host arrays."""
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


def load_model(run_dir, backend, config=None):
    """(model, state): the model of the run's checkpoint on ``backend``, for evaluation, and
    the checkpoint's loop state (``epoch``, ``iter``, and ``pos`` iterations into the next
    epoch for a checkpoint taken mid-epoch).  ``config``: the run's, when already read."""
    if not is_run(run_dir):
        raise TrainError(f"{run_dir}: holds no run (needs {CONFIG} and {CHECKPOINT})")
    config = config or load_config(run_dir)[0]
    model = config.build(backend)
    params, _, state, _ = load_checkpoint(run_dir)
    model.load_state_arrays(params)
    return model, state
