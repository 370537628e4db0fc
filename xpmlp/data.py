"""MNIST loader: find the four IDX files locally or download them from public mirrors, and verify them."""
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
# yann.lecun.com is left out: it now often answers 403 or serves nothing.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",    # the one torchvision uses
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # Google CVDF
]
TIMEOUT = 30  # seconds, per connect and per read, so a dead network fails instead of hanging
_MAGIC = {0x00000803: 3, 0x00000801: 1}  # unsigned-byte images (n, rows, cols) / labels (n,)


class Mnist(NamedTuple):
    train_x: np.ndarray  # (60000, 784) float32, (pixel - 128) / 255
    train_y: np.ndarray  # (60000,) int64
    test_x: np.ndarray   # (10000, 784) float32
    test_y: np.ndarray   # (10000,) int64


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xpmlp" / "mnist"


def find_data_dir(data_dir=None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    if os.environ.get("XPMLP_DATA_DIR"):
        return [Path(os.environ["XPMLP_DATA_DIR"]).expanduser()]
    return [default_cache_dir()]


def _uncompressed(data: bytes, where, expected=None) -> bytes:
    # Sniff gzip by its magic, not the name: browsers often unpack a .gz but keep the name.
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return _gunzip(data, where, expected)
    except zlib.error as e:
        raise DataError(f"{where} is not a valid gzip file ({e}); delete it and download it again") from None


def _idx_size(head: bytes):
    """The bytes of the IDX file whose first bytes are ``head``, as its header says; None
    when ``head`` is no IDX header (_parse_idx then says what is wrong)."""
    dims = _MAGIC.get(int.from_bytes(head[:4], "big")) if len(head) >= 4 else None
    if dims is None or len(head) < 4 + 4 * dims:
        return None
    return 4 + 4 * dims + math.prod(int.from_bytes(head[i:i + 4], "big") for i in range(4, 4 + 4 * dims, 4))


def _gunzip(data: bytes, where, expected=None) -> bytes:
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
                                f"than {cap} bytes; delete it and download it again")
            if not chunk and not tail:  # input used up, stream not ended
                raise DataError(f"{where} is not a valid gzip file (cut short); delete it and download it again")
        rest = member.unused_data
    return bytes(out)


def _parse_idx(data: bytes, where) -> np.ndarray:
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic not in _MAGIC:
        raise DataError(f"{where} is not an MNIST IDX file (magic {data[:4].hex() or 'missing'}, expected "
                        "00000803 or 00000801); delete it and download it again")
    header = 4 + 4 * _MAGIC[magic]
    if len(data) < header:
        raise DataError(f"{where} is truncated inside its header; delete it and download it again")
    dims = tuple(int.from_bytes(data[i:i + 4], "big") for i in range(4, header, 4))
    want = header + math.prod(dims)
    if len(data) != want:
        what = "truncated" if len(data) < want else "longer than its header says (trailing bytes)"
        raise DataError(f"{where} is {what}: {len(data)} bytes, expected {want} for shape {dims}; "
                        "delete it and download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _read(path: Path, expected=None) -> bytes:
    try:
        return _uncompressed(path.read_bytes(), path, expected)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_idx(path) -> np.ndarray:
    """A gzipped or raw IDX file as a read-only uint8 array of the shape its header gives."""
    path = Path(path)
    return _parse_idx(_read(path, SIZES.get(path.name.removesuffix(".gz"))), path)


def _load_verified(path: Path, name: str) -> np.ndarray:
    data = _read(path, SIZES[name])
    array = _parse_idx(data, path)  # first, as its messages say more than a bad hash does
    if hashlib.sha256(data).hexdigest() != SHA256[name]:
        raise DataError(f"{path} fails its SHA-256 check (corrupt, or not the official {name}); "
                        "delete it and download it again")
    return array


class _MirrorFailed(Exception):
    def __init__(self, reason: str, unreachable: bool = False):
        super().__init__(" ".join(reason.split()))  # keeps the final message on one line
        self.unreachable = unreachable


def _fetch(url: str, name: str, progress: bool) -> bytes:
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
        ok = hashlib.sha256(_gunzip(body, url, SIZES[name])).hexdigest() == SHA256[name]
    except (DataError, zlib.error):
        ok = False
    if not ok:
        raise _MirrorFailed(f"{name}.gz is corrupt (SHA-256 mismatch)")
    return body


def _download(names: list[str], dest: Path, mirrors: list[str], progress: bool) -> dict[str, str]:
    """Fetch each missing file into dest, mirrors in order; returns mirror -> last error."""
    dest.mkdir(parents=True, exist_ok=True)
    errors, dead = {}, set()
    for name in names:
        for base in mirrors:
            if base in dead:  # so that no network costs one try per mirror, not four
                continue
            try:
                body = _fetch(f"{base}{name}.gz", name, progress)
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


def mnist_files(data_dir=None, *, download=True, mirrors=None, progress=True) -> dict[str, Path]:
    """The path of each of the four MNIST files (keys of ``FILES``), found locally or
    downloaded into the first directory searched; not yet verified."""
    dirs = find_data_dir(data_dir)
    mirrors = [m.rstrip("/") + "/" for m in (MIRRORS if mirrors is None else mirrors)]
    paths = {key: _local(dirs, name) for key, name in FILES.items()}
    if None in paths.values():
        missing = [FILES[k] for k, p in paths.items() if p is None]
        why = "downloading is disabled"
        if download:
            try:
                errors = _download(missing, dirs[0], mirrors, progress)
            except OSError as e:
                raise DataError(f"cannot write MNIST into {dirs[0]} ({e.strerror or e}); "
                                "pass --data-dir DIR or set XPMLP_DATA_DIR") from None
            paths = {key: _local(dirs, name) for key, name in FILES.items()}
            missing = [FILES[k] for k, p in paths.items() if p is None]
            why = "download failed: " + ("; ".join(f"{b} {e}" for b, e in errors.items()) or "no mirrors")
        if missing:
            raise DataError(
                f"MNIST files missing: {', '.join(missing)} (searched {', '.join(map(str, dirs))}); {why}. "
                f"Pass --data-dir DIR or set XPMLP_DATA_DIR to a directory holding them, or download "
                f"<name>.gz for each by hand from {(mirrors or MIRRORS)[0]} into {dirs[0]}")
    return paths


def load_verified(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    """The arrays of ``mnist_files()``'s files, each checked against its SHA-256."""
    return {key: _load_verified(path, FILES[key]) for key, path in paths.items()}


def load_mnist(data_dir=None, *, download=True, mirrors=None, progress=True) -> Mnist:
    arrays = load_verified(mnist_files(data_dir, download=download, mirrors=mirrors, progress=progress))
    return Mnist(to_inputs(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
                 to_inputs(arrays["test_images"]), arrays["test_labels"].astype(np.int64))
