"""The run directory, the unit of record: every file a run writes or reads is here.

  config.json    every setting, library versions, the device actually used
  metrics.jsonl  one JSON object per logged iteration (kind "iter") and per epoch ("epoch")
  summary.json   final metrics and status (completed / diverged / interrupted)
  checkpoint.npz weights, optimizer state, RNG state and position, written atomically
  events.*       TensorBoard event files (--tensorboard; written by the trainer's writer)
  .lock          the lock of the run's one writer (hold_run_dir), with its pid

Faults: JSON records and checkpoints are written atomically (a temporary file, renamed);
metrics are appended whole lines at a time, and a last line cut short by a kill is dropped
on reading; a full disk is a DiskFull naming the file; a second writer is a RunDirBusy.

A results copy (``xpmlp report --copy-runs``) keeps config.json, summary.json and the
epoch records alone as epochs.jsonl; ``read_records`` reads either.
"""
import contextlib
import dataclasses
import errno
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .config import TrainConfig, TrainError

try:  # the run's lock (hold_run_dir): flock where there is one, else Windows' byte-range lock
    import fcntl
except ImportError:
    fcntl = None
    import msvcrt

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.npz"
BEST = "best.npz"  # with --val: the checkpoint of the epoch of the best validation accuracy
CHECKPOINTS = {"last": CHECKPOINT, "best": BEST}  # eval/predict --checkpoint
RESULT_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT)  # what every run leaves (and BEST, a run with --val)
# A stacked group's directory (stack.py): its members, and its one checkpoint while it trains.
GROUP_FILE, GROUP_CHECKPOINT = "stack.json", "stack-checkpoint.npz"
STARTED_FILES = RESULT_FILES + (BEST, GROUP_FILE, GROUP_CHECKPOINT)  # what a start leaves, before its checkpoint
EPOCHS_COPY = "epochs.jsonl"
LOCK = ".lock"
TEMP_SUFFIX = ".tmp"  # of atomic writes in progress; a killed writer's are removed by the next


# ---------------------------------------------------------------- files written safely

class DiskFull(TrainError):
    """A write failed for lack of space: one line naming the file and the space it needs."""

    def __init__(self, path, need):
        free = shutil.disk_usage(Path(path).parent).free
        super().__init__(f"{path}: no space left on device: writing it needs about {_size(need)}, "
                         f"{_size(free)} free; free some space, then resume the run")


def _size(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _disk_full(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _file_mode():
    """The mode a plain open() gives a new file (0666 less the umask): mkstemp's 0600
    would make the atomically written files unlike metrics.jsonl."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write, size=0):
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename: a killed
    process or full disk leaves either the old file or the new one, never half of one.
    ``size``: about how many bytes ``write`` writes, for the message of a full disk."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.chmod(tmp, _file_mode())  # by path: os.fchmod is POSIX's (Windows has it only from Python 3.13)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(exc):
            raise DiskFull(path, size) from None
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data), size=len(data))


def _clean(value):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# JSON has no NaN/Inf: encode strictly, and only where that fails (a diverged step's
# record) pay for _clean's walk of the record (a third of the records' cost otherwise).
_STRICT_JSON = json.JSONEncoder(allow_nan=False)


def json_line(record):
    """``record`` as one line of JSON (no newline), NaN/Inf written as null."""
    try:
        return _STRICT_JSON.encode(record)
    except ValueError:
        return json.dumps(_clean(record))


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


def read_json(path):
    """A run's JSON record (config.json, summary.json) as a dict; a file that is not one
    (cut short, edited by hand, not UTF-8) is a TrainError naming it."""
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise TrainError(f"{path}: not valid JSON ({exc}); restore or delete the file") from None
    if not isinstance(value, dict):
        raise TrainError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# ---------------------------------------------------------------- config and summary

def versions():
    import numpy
    found = {"python": platform.python_version(), "numpy": numpy.__version__,
             "xpmlp": __import__("xpmlp").__version__}
    if "cupy" in sys.modules:
        found["cupy"] = sys.modules["cupy"].__version__
    return found


def write_config(run_dir, config, backend, step=None, data=None):
    """config.json: the settings, the device that ran them, the library versions, ``step``
    (a dict: which step the run takes, compiled.step_record) and ``data`` (data.Dataset.info:
    which data, its shapes and content hash, that a resume or an eval must match)."""
    saved = dataclasses.asdict(config)
    saved.update(model=config.name, device_used=backend.describe(), versions=versions(),
                 machine=platform.machine(), platform=platform.platform(), **(step or {}))
    if data is not None:
        saved["data_info"] = data
    write_json(Path(run_dir) / CONFIG, saved)


def load_config(run_dir):
    """(TrainConfig, raw dict) from a run directory's config.json, checked as the command
    line's settings are (a hand-edited ``"lr": "0.01"`` is a TrainError naming the file)."""
    path = Path(run_dir) / CONFIG
    saved = read_json(path)
    config = TrainConfig.from_saved(saved)
    try:
        config.validate()
    except TrainError as exc:
        raise TrainError(f"{path}: {exc}") from None
    return config, saved


def check_data(run_dir, saved, info):
    """Refuse data other than the run's (``saved``: its config.json; ``info``: the data's
    Dataset.info; None: arrays made by hand, unchecked).  A run from before data was
    recorded trained on MNIST."""
    if info is None:
        return
    was = saved.get("data_info") or {"name": "mnist", "train": [60000, 784], "test": [10000, 784], "sha256": None}
    if was["sha256"] in (None, info["sha256"]) and was["train"] == info["train"] and was["test"] == info["test"]:
        return
    def say(d):
        return f"{d['name']} ({d['train'][0]}+{d['test'][0]} samples of {d['train'][1]} features" + \
            (f", sha256 {d['sha256'][:12]})" if d["sha256"] else ")")
    raise TrainError(f"{run_dir}: the run was trained on {say(was)}, not on {say(info)}; "
                     "give the run's data (--data or --dataset)")


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
    """Append the records as whole lines: one write of all of them, and on failure (a full
    disk) the file is cut back to its old length, so no partial line is left behind.
    (A process killed inside the write can still leave one: read_records drops it.)"""
    path = Path(run_dir) / METRICS
    data = "".join(json_line(rec) + "\n" for rec in records).encode()
    with _open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "ab") as f:
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(f.fileno(), view):]
        except BaseException as exc:
            f.truncate(start)
            if _disk_full(exc):
                raise DiskFull(path, len(data)) from None
            raise


def _open_own(path, flags, mode):
    """Open a run's file without following a symbolic link: a run directory received from
    someone else must not make us write wherever its links point."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), 0o666)
    except OSError:
        if Path(path).is_symlink():
            raise TrainError(f"{path} is a symbolic link; a run's files must be its own (remove the link)") from None
        raise
    return os.fdopen(fd, mode)


def read_records(run_dir, warn=None):
    """The run's metric records in order: metrics.jsonl, or a results copy's epochs.jsonl
    (whose records have no "kind": they are all epochs).  A last line cut short (a kill or
    a full disk while appending it, or a live run's line being written) is dropped with one
    warning through ``warn`` (default: stderr); a bad line elsewhere is a TrainError."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS if (run_dir / METRICS).exists() else run_dir / EPOCHS_COPY
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if any(rest.strip() for rest in lines[number:]):
                raise TrainError(f"{path}: line {number} is not JSON ({exc})") from None
            (warn or _warn)(f"xpmlp: warning: {path}: dropped its last line, cut short "
                            f"({len(line)} bytes of a record the process did not finish writing)")
    return records


def _warn(line):
    print(line, file=sys.stderr)


def epoch_records(records):
    return [r for r in records if r.get("kind", "epoch") == "epoch"]


def truncate_metrics(run_dir, epoch):
    """On resume, drop records past ``epoch`` (the checkpoint's): they will be produced again."""
    path = Path(run_dir) / METRICS
    if path.exists():
        keep = [r for r in read_records(run_dir) if r["epoch"] <= epoch]
        atomic_write_bytes(path, "".join(json_line(r) + "\n" for r in keep).encode())


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, params, velocity, state, partial=None):
    """Weights, momenta (host arrays), the loop's ``state`` (a JSON dict: position, RNG
    states) and ``partial`` (the records of an epoch stopped midway) in one .npz, written
    atomically: the one format of a run's checkpoint.npz and a group's stack-checkpoint.npz."""
    arrays = {f"param_{i}": np.asarray(a) for i, a in enumerate(params)}
    arrays.update({f"velocity_{i}": np.asarray(v) for i, v in enumerate(velocity)})
    arrays.update({f"partial_{k}": np.asarray(v) for k, v in (partial or {}).items()})
    state = dict(state, num_params=len(params))
    arrays["state"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays), size=sum(a.nbytes for a in arrays.values()))


def check_checkpoint_sizes(path, model):
    """Refuse a checkpoint holding arrays larger than ``model``'s, from the zip's directory and
    each array's .npy header alone, before any data is inflated (a 3 MiB file can inflate to
    gigabytes of zeros).  Limits, at 8 bytes an element: param_i / velocity_i its parameter,
    the partial_* per-step records 2^24 steps a model, anything else (state) 1 MiB."""
    import zipfile

    sizes = [math.prod(getattr(layer, name).shape) for layer, name in model.parameters()]  # torch: .size is a method
    limits = {f"{kind}_{i}": 8 * n for i, n in enumerate(sizes) for kind in ("param", "velocity")}
    per_step = 8 * 2**24 * math.prod(model.stack)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            most = limits.get(name, per_step if name.startswith("partial_") else 2**20)
            if info.file_size > most + 2**16:  # room for the .npy header
                raise TrainError(f"{name} inflates to {info.file_size} bytes; the model allows at most {most}")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise TrainError(f"{name}: .npy format {version} is not one np.savez writes")
                shape, _, dtype = read_header(f)
            if dtype.hasobject or math.prod(shape) * dtype.itemsize > most:
                raise TrainError(f"{name} declares shape {shape} of {dtype}; the model allows at most {most} bytes")


def load_checkpoint(path, model=None, described_by=CONFIG):
    """(params, velocity, state, partial) of a checkpoint (a run directory: its checkpoint.npz),
    as host arrays; a missing or damaged file is a TrainError naming it.  With ``model``
    (described by ``described_by``), a checkpoint of other shapes or sizes is refused, the
    sizes before any array is inflated."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    try:
        if model is not None:
            check_checkpoint_sizes(path, model)
        with np.load(path) as npz:
            state = _state_of(npz)
            params = [npz[f"param_{i}"] for i in range(state["num_params"])]
            velocity = [npz[f"velocity_{i}"] for i in range(state["num_params"])]
            partial = {k[len("partial_"):]: npz[k] for k in npz.files if k.startswith("partial_")}
    except FileNotFoundError:
        raise TrainError(f"{path.parent}: no checkpoint to resume from ({path.name} missing)") from None
    except TrainError as exc:
        raise TrainError(f"{path}: {exc}") from None
    except Exception as exc:  # truncated or foreign file
        raise TrainError(f"{path}: unreadable checkpoint ({exc})") from None
    if model is not None:
        check_shapes(path, params, model, described_by)
    return params, velocity, state, partial


def checkpoint_state(path):
    """The loop state of a checkpoint (``status``, ``epoch``, ``pos``...) without its arrays;
    None when there is no file; a damaged one is a TrainError, as load_checkpoint says."""
    if not Path(path).exists():
        return None
    try:
        with np.load(path) as npz:
            return _state_of(npz)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise TrainError(f"{path}: unreadable checkpoint ({exc})") from None


def _state_of(npz):
    """A checkpoint's loop state: JSON, stored as the bytes of its "state" array."""
    return json.loads(npz["state"].tobytes().decode())


def load_model(run_dir, backend, config=None, checkpoint="last"):
    """(model, state): the model of the run's checkpoint on ``backend``, for evaluation, and
    the checkpoint's loop state (``epoch``, ``iter``, and ``pos`` iterations into the next
    epoch for a checkpoint taken mid-epoch).  ``config``: the run's, when already read;
    ``checkpoint``: last, or best (the best validation accuracy's, with --val)."""
    if not is_run(run_dir):
        raise TrainError(f"{run_dir}: holds no run (needs {CONFIG} and {CHECKPOINT})")
    config = config or load_config(run_dir)[0]
    path = Path(run_dir) / CHECKPOINTS[checkpoint]
    if not path.is_file():
        raise TrainError(f"{run_dir}: no {path.name}" + (" (the run has no validation split: train with --val)"
                                                          if config.val is None else " yet"))
    model = config.build(backend)
    params, _, state, _ = load_checkpoint(path, model)
    model.load_state_arrays(params)
    return model, state


def check_shapes(path, params, model, described_by=CONFIG):
    """A checkpoint of another model (copied over, or config.json edited) is refused by name."""
    want = [tuple(getattr(layer, name).shape) for layer, name in model.parameters()]
    got = [tuple(p.shape) for p in params]
    if got != want:
        raise TrainError(f"{path}: holds parameters of shapes {got}, "
                         f"but {described_by} describes a model of shapes {want}")


def resume_command(run_dir):
    """The command that resumes ``run_dir``, as it can be typed where this process runs:
    ``xpmlp`` when that is this installation's script on the PATH, else the script's full
    path (after ``make``: the venv's, not activated), else ``python -m xpmlp``."""
    script = Path(sys.executable).with_name("xpmlp.exe" if os.name == "nt" else "xpmlp")
    found = shutil.which("xpmlp")
    if found and Path(found).resolve() == script.resolve():
        cli = "xpmlp"
    elif script.exists():
        cli = str(script)
    else:
        cli = f"{sys.executable} -m xpmlp"
    return f"{cli} train --resume {run_dir}"


# ---------------------------------------------------------------- one writer per run directory

_held = {}  # resolved run dir -> [open lock file, how many holders in this process]


class RunDirBusy(TrainError):
    """Another live process writes the run directory."""

    @classmethod
    def of(cls, run_dir, pid):
        return cls(f"{run_dir} is in use by another process" + (f" (pid {pid})" if pid else "")
                   + "; one writer per run directory")


def _lock_file(run_dir, create):
    """The open lock file (binary: the lock's offset is a byte offset); None when there is
    none to read (``create`` False)."""
    if create:
        return _open_own(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT, "r+b")
    try:
        return _open_own(Path(run_dir) / LOCK, os.O_RDWR, "r+b")
    except OSError:  # absent, or run_dir is no directory: nobody holds it
        return None


# Windows' byte-range locks are mandatory: a lock over the pid would keep a refused writer
# from reading who holds it, so the lock is on one byte far past it.
_WINDOWS_LOCK_OFFSET = 2**20


def _lock(f, shared=False):
    """Take the OS lock of the open lock file ``f`` without waiting: True, or False when
    another process holds it.  The OS drops it when the file is closed or the process ends,
    however it ends.  ``shared``: a probe that does not keep out other probes (flock only;
    Windows' lock is always exclusive, which _try_lock's retries allow for)."""
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    f.seek(_WINDOWS_LOCK_OFFSET)  # msvcrt.locking locks from the file position
    try:
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:  # EACCES / EDEADLOCK: held by another process
        return False
    return True


def _unlock(f):
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    else:
        f.seek(_WINDOWS_LOCK_OFFSET)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def _try_lock(f, attempts=10):
    """Lock the file; a few tries, because a sweep's probe (lock_holder) may hold it for a
    moment.  False when another process holds it."""
    for _ in range(attempts):
        if _lock(f):
            return True
        time.sleep(0.05)
    return False


def _holder_pid(f):
    f.seek(0)
    text = f.read(32).strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def hold_run_dir(run_dir):
    """Be the one writer of ``run_dir`` while inside: an OS lock (_lock: flock, or
    msvcrt.locking on Windows) on its .lock file, which the OS releases when the process
    ends however it ends, so a kill -9 leaves no stale lock.  Re-entrant within a process.
    Another live holder: RunDirBusy naming its pid.  The first entry removes temporary
    files that killed writers left behind."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        _held[key][1] += 1
    else:
        f = _lock_file(run_dir, create=True)
        if not _try_lock(f):
            pid = _holder_pid(f)
            f.close()
            raise RunDirBusy.of(run_dir, pid)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        _held[key] = [f, 1]
        for tmp in Path(run_dir).glob(f".*{TEMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        _held[key][1] -= 1
        if not _held[key][1]:
            _held.pop(key)[0].close()  # closing the file releases the lock


def lock_holder(run_dir):
    """The pid of the live process that writes ``run_dir`` (0 if it has not said yet), or
    None when nobody does."""
    if str(Path(run_dir).resolve()) in _held:
        return os.getpid()
    f = _lock_file(run_dir, create=False)
    if f is None:
        return None
    with f:
        if not _lock(f, shared=True):
            return _holder_pid(f) or 0
        _unlock(f)
    return None


def clear_run_dir(run_dir):
    """Remove what a run (or group) that never reached a checkpoint left (config, metrics,
    summary, a group's files, TensorBoard events), so that it can start again; the lock and a
    sweep's train.log stay."""
    assert str(Path(run_dir).resolve()) in _held, "clear a run directory only while holding it"
    for name in STARTED_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    for events in Path(run_dir).glob("events.out.tfevents.*"):
        events.unlink()
