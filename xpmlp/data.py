"""Datasets: MNIST and the datasets known by name (found locally or downloaded from their
public mirrors, and verified against their published sums), and a user's own data (a
directory of IDX files or an .npz), checked but never called corrupt."""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .rundir import atomic_write_bytes


class DataError(Exception):
    """One-line, user-facing message; the CLI prints it and exits 2."""


FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# Of the uncompressed bytes, so a raw copy and a .gz copy verify the same way.
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# Their uncompressed sizes (header included): a .gz is never inflated past them.
SIZES = {"train-images-idx3-ubyte": 16 + 60000 * 784, "train-labels-idx1-ubyte": 8 + 60000,
         "t10k-images-idx3-ubyte": 16 + 10000 * 784, "t10k-labels-idx1-ubyte": 8 + 10000}
# The datasets known by name.  Each has MNIST's four files, shapes and sizes.  ``sums``: the
# published digests, with ``algorithm``, of the .gz files as published (``of_gz``) or of the
# uncompressed bytes (MNIST's, so that a raw copy verifies too).
# Fashion-MNIST's MD5s are those its README publishes; KMNIST publishes none of its own: its
# MD5s are those torchvision checks (its KMNIST dataset).  Neither publishes SHA-256 sums.
FASHION_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
KMNIST_MD5 = {
    "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
    "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
    "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
    "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
}
# yann.lecun.com is left out: it now often answers 403 or serves nothing.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",    # the one torchvision uses
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # Google CVDF
]


class Known(NamedTuple):
    title: str
    mirrors: list
    sums: dict
    algorithm: str
    of_gz: bool

    @property
    def check(self):
        """Its sums' name in messages: SHA-256, MD5."""
        return {"sha256": "SHA-256", "md5": "MD5"}[self.algorithm]


KNOWN = {
    "mnist": Known("MNIST", None, SHA256, "sha256", False),  # mirrors: MIRRORS, looked up when used
    "fashion-mnist": Known("Fashion-MNIST", ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                           FASHION_MD5, "md5", True),
    "kmnist": Known("KMNIST", ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"], KMNIST_MD5, "md5", True),
}
TIMEOUT = 30  # seconds, per connect and per read, so a dead network fails instead of hanging
_MAGIC = {0x00000803: 3, 0x00000801: 1}  # unsigned-byte images (n, rows, cols) / labels (n,)


class _Arrays(NamedTuple):
    train_x: np.ndarray  # (n, features) float32; 8-bit images as (pixel - 128) / 255
    train_y: np.ndarray  # (n,) int64 in [0, classes)
    test_x: np.ndarray   # (m, features) float32
    test_y: np.ndarray   # (m,) int64


class Dataset(_Arrays):
    """The four arrays (a tuple of them, as MNIST's loader has always returned), and ``info``:
    the data's name, shapes, classes, scaling and content hash (config.json's data_info)."""

    def __new__(cls, train_x, train_y, test_x, test_y, info=None, val=None):
        self = super().__new__(cls, train_x, train_y, test_x, test_y)
        self.info = info
        self.val_x, self.val_y = val or (None, None)  # a validation split (split_validation)
        return self


VAL_SEED = 2  # the split's: the same for every run and seed on the same data, so they compare


def split_validation(data: Dataset, val) -> Dataset:
    """``data`` with ``val`` training samples (a count, or a fraction of them) held out as its
    validation set: a seeded random choice, the rest in their order.  ``val`` None: as it is."""
    if val is None:
        return data
    if not isinstance(data, Dataset):  # arrays made by hand: as a Dataset without info
        data = Dataset(*data)
    n = len(data.train_x)
    count = val if isinstance(val, int) else round(val * n)
    if not 1 <= count < n:
        raise DataError(f"--val {val} holds out {count} of the {n} training samples: "
                        "give between 1 and one fewer than all of them")
    held = np.zeros(n, bool)
    held[np.random.default_rng(VAL_SEED).choice(n, count, replace=False)] = True
    return Dataset(data.train_x[~held], data.train_y[~held], data.test_x, data.test_y, data.info,
                   val=(data.train_x[held], data.train_y[held]))


Mnist = Dataset  # its former name


def default_cache_dir(dataset="mnist") -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xpmlp" / dataset


def find_data_dir(data_dir=None, dataset="mnist") -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    if os.environ.get("XPMLP_DATA_DIR") and dataset == "mnist":  # MNIST's directory, not the others'
        return [Path(os.environ["XPMLP_DATA_DIR"]).expanduser()]
    return [default_cache_dir(dataset)]


REDOWNLOAD = "; delete it and download it again"  # the advice for a file we downloaded, never a user's


def _uncompressed(data: bytes, where, expected=None, advice=REDOWNLOAD) -> bytes:
    # Sniff gzip by its magic, not the name: browsers often unpack a .gz but keep the name.
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return _gunzip(data, where, expected, advice)
    except zlib.error as e:
        raise DataError(f"{where} is not a valid gzip file ({e}){advice}") from None


def _idx_size(head: bytes):
    """The bytes of the IDX file whose first bytes are ``head``, as its header says; None
    when ``head`` is no IDX header (_parse_idx then says what is wrong)."""
    dims = _MAGIC.get(int.from_bytes(head[:4], "big")) if len(head) >= 4 else None
    if dims is None or len(head) < 4 + 4 * dims:
        return None
    return 4 + 4 * dims + math.prod(int.from_bytes(head[i:i + 4], "big") for i in range(4, 4 + 4 * dims, 4))


def _gunzip(data: bytes, where, expected=None, advice=REDOWNLOAD) -> bytes:
    """The gzip members of ``data`` decompressed, a chunk at a time, refused as soon as they
    hold more than the IDX header at their start says, or than ``expected`` bytes (an MNIST
    file's known size): a small file that inflates to gigabytes is never inflated."""
    out, cap, rest = bytearray(), expected, data
    while rest:
        member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        tail = rest
        while not member.eof:
            room = (16 if cap is None else cap + 1) - len(out)
            chunk = member.decompress(tail, room)
            tail = member.unconsumed_tail
            out += chunk
            if cap is None and (len(out) >= 16 or not tail):
                size = _idx_size(out)
                if size is None:  # not IDX, or its header cut short: said by _parse_idx
                    return bytes(out)
                cap = size if expected is None else min(size, expected)
            if len(out) > cap:
                raise DataError(f"{where} is longer than its header says (trailing bytes): it inflates to more "
                                f"than {cap} bytes{advice}")
            if not chunk and not tail:  # input used up, stream not ended
                raise DataError(f"{where} is not a valid gzip file (cut short){advice}")
        rest = member.unused_data
    return bytes(out)


def _parse_idx(data: bytes, where, advice=REDOWNLOAD) -> np.ndarray:
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic not in _MAGIC:
        raise DataError(f"{where} is not an MNIST IDX file (magic {data[:4].hex() or 'missing'}, expected "
                        f"00000803 or 00000801){advice}")
    header = 4 + 4 * _MAGIC[magic]
    if len(data) < header:
        raise DataError(f"{where} is truncated inside its header{advice}")
    dims = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4))
    want = header + math.prod(dims)
    if len(data) != want:
        what = "truncated" if len(data) < want else "longer than its header says (trailing bytes)"
        raise DataError(f"{where} is {what}: {len(data)} bytes, expected {want} for shape {dims}{advice}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read(path: Path, expected=None, advice=REDOWNLOAD) -> bytes:
    try:
        return _uncompressed(_read_bytes(path), path, expected, advice)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_idx(path) -> np.ndarray:
    """A gzipped or raw IDX file as a read-only uint8 array of the shape its header gives."""
    path = Path(path)
    return _parse_idx(_read(path, SIZES.get(path.name.removesuffix(".gz"))), path)


def _digest(known: Known, name: str, raw: bytes, data: bytes) -> bool:
    """Whether a file's bytes as read (``raw``) and uncompressed (``data``) have its published sum."""
    return hashlib.new(known.algorithm, raw if known.of_gz else data).hexdigest() == known.sums[name]


def _load_verified(path: Path, name: str, dataset="mnist") -> np.ndarray:
    known = KNOWN[dataset]
    raw = _read_bytes(path)
    data = _uncompressed(raw, path, SIZES[name])
    array = _parse_idx(data, path)  # first, as its messages say more than a bad hash does
    if known.of_gz and raw[:2] != b"\x1f\x8b":
        raise DataError(f"{path} is uncompressed, but {known.title}'s published sums are of its .gz files: keep "
                        f"the .gz, or train on it unchecked with --data {path.parent}")
    if not _digest(known, name, raw, data):
        raise DataError(f"{path} fails its {known.check} check (corrupt, or not the official {known.title} "
                        f"{name}){REDOWNLOAD}")
    return array


class _MirrorFailed(Exception):
    def __init__(self, reason: str, unreachable: bool = False):
        super().__init__(" ".join(reason.split()))  # keeps the final message on one line
        self.unreachable = unreachable


def _fetch(url: str, name: str, progress: bool, dataset="mnist") -> bytes:
    """The verified .gz bytes from url, or _MirrorFailed."""
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        raise _MirrorFailed(f"HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise _MirrorFailed(str(getattr(e, "reason", e)), unreachable=True) from None
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False)
        chunks = []
        try:
            # Chunked reads do not raise when the server hangs up early, hence the length check.
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                if bar:
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise _MirrorFailed(f"connection lost ({e!r})") from None
        finally:
            if bar:
                bar.close()
    body = b"".join(chunks)
    if total is not None and len(body) != total:
        raise _MirrorFailed(f"connection lost after {len(body)} of {total} bytes")
    try:
        ok = _digest(KNOWN[dataset], name, body, _gunzip(body, url, SIZES[name]))
    except (DataError, zlib.error):
        ok = False
    if not ok:
        raise _MirrorFailed(f"{name}.gz is corrupt ({KNOWN[dataset].check} mismatch)")
    return body


def _download(names: list[str], dest: Path, mirrors: list[str], progress: bool, dataset="mnist") -> dict[str, str]:
    """Fetch each missing file into dest, mirrors in order; returns mirror -> last error."""
    dest.mkdir(parents=True, exist_ok=True)
    errors, dead = {}, set()
    for name in names:
        for base in mirrors:
            if base in dead:  # so that no network costs one try per mirror, not four
                continue
            try:
                body = _fetch(f"{base}{name}.gz", name, progress, dataset)
            except _MirrorFailed as e:
                errors[base] = str(e)
                if e.unreachable:
                    dead.add(base)
                continue
            atomic_write_bytes(dest / f"{name}.gz", body)  # a crash never leaves a half file
            break
    return errors


def _local(dirs: list[Path], name: str) -> Path | None:
    return next((p for d in dirs for p in (d / name, d / f"{name}.gz") if p.is_file()), None)


def to_inputs(images) -> np.ndarray:
    """uint8 images (N, 28, 28) as the networks' inputs: (N, 784) float32, (pixel - 128) / 255."""
    images = np.asarray(images)
    return (images.reshape(len(images), -1).astype(np.float32) - np.float32(128)) / np.float32(255)


def mnist_files(data_dir=None, *, download=True, mirrors=None, progress=True, dataset="mnist") -> dict[str, Path]:
    """The path of each of the four files (keys of ``FILES``) of MNIST or another dataset
    of ``KNOWN``, found locally or downloaded into the first directory searched; not yet
    verified."""
    known = KNOWN[dataset]
    dirs = find_data_dir(data_dir, dataset)
    published = MIRRORS if known.mirrors is None else known.mirrors
    mirrors = [m.rstrip("/") + "/" for m in (published if mirrors is None else mirrors)]
    paths = {key: _local(dirs, name) for key, name in FILES.items()}
    if None in paths.values():
        missing = [FILES[k] for k, p in paths.items() if p is None]
        why = "downloading is disabled"
        if download:
            try:
                errors = _download(missing, dirs[0], mirrors, progress, dataset)
            except OSError as e:
                raise DataError(f"cannot write {known.title} into {dirs[0]} ({e.strerror or e}); "
                                "pass --data-dir DIR or set XPMLP_DATA_DIR") from None
            paths = {key: _local(dirs, name) for key, name in FILES.items()}
            missing = [FILES[k] for k, p in paths.items() if p is None]
            why = "download failed: " + ("; ".join(f"{b} {e}" for b, e in errors.items()) or "no mirrors")
        if missing:
            raise DataError(
                f"{known.title} files missing: {', '.join(missing)} (searched {', '.join(map(str, dirs))}); {why}. "
                f"Pass --data-dir DIR or set XPMLP_DATA_DIR to a directory holding them, or download "
                f"<name>.gz for each by hand from {(mirrors or published)[0]} into {dirs[0]}")
    return paths


def load_verified(paths: dict[str, Path], dataset="mnist") -> dict[str, np.ndarray]:
    """The arrays of ``mnist_files()``'s files, each checked against its published sum."""
    return {key: _load_verified(path, FILES[key], dataset) for key, path in paths.items()}


def load_mnist(data_dir=None, *, download=True, mirrors=None, progress=True, dataset="mnist") -> Dataset:
    """MNIST, or another dataset of ``KNOWN``, verified, as the networks' inputs."""
    arrays = load_verified(mnist_files(data_dir, download=download, mirrors=mirrors, progress=progress,
                                       dataset=dataset), dataset)
    return _dataset(dataset, None, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                    arrays["test_labels"])



# ---------------------------------------------------------------- a user's own data

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")  # Keras' names
SCALED = "(pixel - 128) / 255"  # what 8-bit images become; any other type is used as it is


def _fail(where, what):
    raise DataError(f"--data {where}: {what}")


def load_data(data=None, dataset="mnist", data_dir=None, *, download=True, progress=True) -> Dataset:
    """A user's own data (``data``: a directory of IDX files or an .npz), else the dataset
    known by the name ``dataset``, downloaded if need be and verified."""
    if data is None:
        return load_mnist(data_dir, download=download, progress=progress, dataset=dataset)
    return load_user_data(data)


def training_data(config, *, progress=True) -> Dataset:
    """The data a run of ``config`` (a TrainConfig) trains on: its own or a named dataset,
    with its validation split held out."""
    return split_validation(load_data(config.data, config.dataset, config.data_dir, progress=progress), config.val)


def load_user_data(path) -> Dataset:
    """The data at ``path``: a directory of four IDX files (train/t10k or test, images and
    labels, gzipped or not) or an .npz holding x_train, y_train, x_test and y_test."""
    path = Path(path).expanduser()
    if path.is_dir():
        arrays = _idx_dir(path)
    elif path.is_file():
        arrays = _npz(path)
    else:
        _fail(path, "no such file or directory")
    return _dataset(path.stem if path.is_file() else path.name, str(path), *arrays)


def _idx_dir(path: Path):
    """The four IDX arrays of a directory, each file found by its name (EMNIST's
    ``emnist-digits-train-images-idx3-ubyte.gz`` too)."""
    found = {}
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        name = f.name.lower()
        split = "train" if "train" in name else "test" if ("t10k" in name or "test" in name) else None
        kind = "images" if ("images" in name or "idx3" in name) else "labels" if ("labels" in name or "idx1" in name) \
            else None
        if split and kind:
            found.setdefault((split, kind), []).append(f)
    roles = [("train", "images"), ("train", "labels"), ("test", "images"), ("test", "labels")]
    missing = [f"{s} {k}" for s, k in roles if (s, k) not in found]
    if missing:
        _fail(path, f"no IDX file of the {', '.join(missing)} (expected names like train-images-idx3-ubyte[.gz], "
                    "t10k-labels-idx1-ubyte[.gz])")
    twice = [f"{s} {k}: {', '.join(p.name for p in found[s, k])}" for s, k in roles if len(found[s, k]) > 1]
    if twice:
        _fail(path, f"more than one file for the {twice[0]}")
    return [_parse_idx(_read(found[role][0], advice=""), found[role][0], advice="") for role in roles]


def _npz(path: Path):
    import zipfile
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        _fail(path, f"neither a directory of IDX files nor an .npz file ({' '.join(str(e).split())})")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        _fail(path, "a single NumPy array, not an .npz holding " + ", ".join(NPZ_KEYS))
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            _fail(path, f"the .npz has no {', '.join(missing)} (it holds {', '.join(npz.files) or 'nothing'}; "
                        f"expected {', '.join(NPZ_KEYS)})")
        try:
            return [npz[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:  # object arrays, a damaged member
            _fail(path, f"cannot read its arrays ({' '.join(str(e).split())})")


def _features(x, where, split):
    """(n, features) float32: 8-bit images scaled as MNIST's, any other numbers as they are."""
    try:
        return as_inputs(x)
    except ValueError as e:
        _fail(where, f"{split} {e}")


def as_inputs(x) -> np.ndarray:
    """Samples as the networks' inputs, (n, features) float32: 8-bit images scaled as MNIST's,
    (pixel - 128) / 255, any other numbers as they are; ValueError for what is not."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"features have shape {x.shape}: expected (samples, features...)")
    if x.dtype == np.uint8:
        return to_inputs(x)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"features are {x.dtype}, not numbers")
    out = x.reshape(len(x), -1).astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("features hold non-finite values (NaN or infinity), or values too large for float32")
    return out


def _labels(y, where, split, count):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # a column of labels
        y = y[:, 0]
    if y.ndim != 1:
        _fail(where, f"{split} labels have shape {y.shape}: expected one integer class per sample")
    if y.dtype.kind not in "iu":
        _fail(where, f"{split} labels are {y.dtype}: expected integers in [0, classes)")
    if len(y) != count:
        _fail(where, f"{count} {split} samples but {len(y)} {split} labels")
    if len(y) and y.min() < 0:
        _fail(where, f"{split} labels include {int(y.min())}: expected integers in [0, classes)")
    return y.astype(np.int64)


def fingerprint(*arrays) -> str:
    """SHA-256 of arrays as given (their types, shapes and bytes): what data a run saw."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _dataset(name, source, train_x, train_y, test_x, test_y) -> Dataset:
    """The checked Dataset of four arrays as read, with its ``info``."""
    where = source or name
    xs = [_features(train_x, where, "training"), _features(test_x, where, "test")]
    ys = [_labels(train_y, where, "training", len(xs[0])), _labels(test_y, where, "test", len(xs[1]))]
    if xs[0].shape[1] != xs[1].shape[1]:
        _fail(where, f"training samples have {xs[0].shape[1]} features but test samples {xs[1].shape[1]}")
    if not len(xs[0]) or not len(xs[1]):
        _fail(where, "the training and the test set each need at least one sample")
    classes = int(max(ys[0].max(), ys[1].max())) + 1
    if classes < 2:
        _fail(where, "the labels name a single class: a classifier needs at least 2")
    info = {"name": name, "source": source, "train": list(xs[0].shape), "test": list(xs[1].shape),
            "classes": classes, "scaling": SCALED if np.asarray(train_x).dtype == np.uint8 else "none",
            "sha256": fingerprint(train_x, train_y, test_x, test_y)}
    return Dataset(xs[0], ys[0], xs[1], ys[1], info)
