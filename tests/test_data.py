"""The MNIST loader: real files, corrupt files, and downloads from local HTTP mirrors."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import real_mnist_dir

from xpmlp import data
from xpmlp.data import FILES, SHA256, DataError, find_data_dir, load_mnist, read_idx

NAMES = list(FILES.values())


@pytest.fixture(scope="session")
def real_dir():
    """The real MNIST's folder, found when a test first needs it, not at import: collecting
    this file must not need MNIST (the GPU check runs other files where MNIST is absent)."""
    return real_mnist_dir()


@pytest.fixture(scope="session")
def real_gz(real_dir):
    """name -> the real .gz bytes."""
    if not all((real_dir / f"{n}.gz").is_file() for n in NAMES):
        pytest.skip(f"real MNIST .gz files not found in {real_dir}")
    return {n: (real_dir / f"{n}.gz").read_bytes() for n in NAMES}


@pytest.fixture(scope="session")
def real_raw(real_gz):
    """name -> the real uncompressed bytes."""
    return {n: gzip.decompress(b) for n, b in real_gz.items()}


@pytest.fixture(scope="session")
def mnist(real_dir, real_gz):
    return load_mnist(real_dir, download=False)


@pytest.fixture(scope="session")
def good_mirror_dir(tmp_path_factory, real_gz):
    d = tmp_path_factory.mktemp("good_mirror")
    for n, b in real_gz.items():
        (d / f"{n}.gz").write_bytes(b)
    return d


@pytest.fixture(scope="session")
def bad_mirror_dir(tmp_path_factory, real_raw):
    """Valid gzip files under the right names whose contents differ by one byte: only the hash can tell."""
    d = tmp_path_factory.mktemp("bad_mirror")
    for n, raw in real_raw.items():
        (d / f"{n}.gz").write_bytes(gzip.compress(flip_last_byte(raw), compresslevel=1))
    return d


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test reads the developer's env or cache, and none can reach the real mirrors."""
    monkeypatch.delenv("XPMLP_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "MIRRORS", ["http://127.0.0.1:9/never-used/"])
    monkeypatch.setattr(data, "TIMEOUT", 5)


def flip_last_byte(raw: bytes) -> bytes:
    # The last byte is a pixel (or label) in every file, so magic and length stay right.
    return raw[:-1] + bytes([raw[-1] ^ 1])


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------- local HTTP mirrors

class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, log, **kwargs):
        self.log = log
        super().__init__(*args, **kwargs)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.log.append(self.path.rsplit("/", 1)[-1])
        super().do_GET()


class _DroppingHandler(_Handler):
    """Promises the whole file in Content-Length, sends half of it, hangs up."""

    def do_GET(self):
        self.log.append(self.path.rsplit("/", 1)[-1])
        body = (Path(self.directory) / self.path.rsplit("/", 1)[-1]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def serve(directory: Path, handler=_Handler):
    """Serve directory on 127.0.0.1; yields (base URL, list of requested file names)."""
    log = []
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, log=log, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", log
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# ---------------------------------------------------------------- real data

def test_real_mnist_shapes_dtypes_and_values(mnist):
    assert [a.shape for a in mnist] == [(60000, 784), (60000,), (10000, 784), (10000,)]
    assert [a.dtype for a in mnist] == [np.float32, np.int64, np.float32, np.int64]
    for x in (mnist.train_x, mnist.test_x):
        assert x.min() == np.float32(-128) / np.float32(255)
        assert x.max() == np.float32(127) / np.float32(255)
    for y, n in ((mnist.train_y, 60000), (mnist.test_y, 10000)):
        assert y.min() == 0 and y.max() == 9
        counts = np.bincount(y, minlength=10)
        assert counts.sum() == n and (counts > 800).all()
    assert mnist.train_y[0] == 5 and mnist.test_y[0] == 7


def test_pixels_are_scaled_row_major(mnist, real_raw):
    img = np.frombuffer(real_raw["train-images-idx3-ubyte"], np.uint8, offset=16)[:784]
    np.testing.assert_array_equal(mnist.train_x[0], (img.astype(np.float32) - 128) / 255)


def test_read_idx_raw_and_gz_agree(tmp_path, real_dir, real_raw):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(real_raw[name])
        raw, gz = read_idx(tmp_path / name), read_idx(real_dir / f"{name}.gz")
        assert raw.dtype == np.uint8
        np.testing.assert_array_equal(raw, gz)
    assert read_idx(tmp_path / "t10k-images-idx3-ubyte").shape == (10000, 28, 28)
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").shape == (10000,)


def test_load_mnist_from_mixed_raw_and_gz(tmp_path, real_raw, real_gz, mnist):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(real_raw["train-images-idx3-ubyte"])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(real_raw["t10k-labels-idx1-ubyte"])
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes(real_gz[name])
    got = load_mnist(tmp_path, download=False)
    for a, b in zip(got, mnist):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- corrupt files

LABELS = "t10k-labels-idx1-ubyte"


@pytest.mark.parametrize("case, corrupt, words", [
    ("wrong magic", lambda raw: b"\x00\x00\x08\x02" + raw[4:], "magic"),
    ("empty", lambda raw: b"", "magic"),
    ("truncated header", lambda raw: raw[:6], "truncated"),
    ("truncated", lambda raw: raw[:-1], "truncated"),
    ("trailing bytes", lambda raw: raw + b"\x00", "trailing"),
    ("bad gzip", lambda raw: gzip.compress(raw)[:-100], "gzip"),
    ("gzip bad crc", lambda raw: (lambda g: g[:-8] + bytes(8))(gzip.compress(raw)), "gzip"),
])
def test_read_idx_rejects_corrupt_files(tmp_path, real_raw, case, corrupt, words):
    path = tmp_path / f"{LABELS}.gz"
    path.write_bytes(corrupt(real_raw[LABELS]))
    with pytest.raises(DataError, match=words) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_mnist_rejects_file_with_wrong_hash(tmp_path, real_raw, real_gz, good_mirror_dir):
    for name in NAMES:
        (tmp_path / f"{name}.gz").write_bytes(real_gz[name])
    bad = tmp_path / "t10k-images-idx3-ubyte"  # raw, so the flipped byte is a single pixel
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    bad.write_bytes(flip_last_byte(real_raw[bad.name]))
    assert read_idx(bad).shape == (10000, 28, 28)  # structurally fine: only the hash catches it
    with serve(good_mirror_dir) as (url, log):
        with pytest.raises(DataError, match="SHA-256") as err:
            load_mnist(tmp_path, mirrors=[url])
    assert str(bad) in str(err.value) and "delete it" in str(err.value)
    assert log == []  # a corrupt local file is reported, not silently replaced
    assert bad.read_bytes() == flip_last_byte(real_raw[bad.name])


def test_missing_files_without_download(tmp_path, real_gz):
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(real_gz["train-labels-idx1-ubyte"])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and "--data-dir" in msg and "XPMLP_DATA_DIR" in msg
    assert all(n in msg for n in NAMES if n != "train-labels-idx1-ubyte")
    assert "train-labels-idx1-ubyte" not in msg


# ---------------------------------------------------------------- find_data_dir

def test_find_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert find_data_dir() == [tmp_path / "xdg/xpmlp/mnist"]
    monkeypatch.setenv("XPMLP_DATA_DIR", str(tmp_path / "env"))
    assert find_data_dir() == [tmp_path / "env"]
    assert find_data_dir(tmp_path / "explicit") == [tmp_path / "explicit"]
    assert find_data_dir(str(tmp_path / "explicit")) == [tmp_path / "explicit"]


def test_default_cache_dir_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_cache_dir() == tmp_path / "home/.cache/xpmlp/mnist"


# ---------------------------------------------------------------- downloads

def test_download_into_empty_cache(tmp_path, good_mirror_dir, real_gz, mnist):
    cache = data.default_cache_dir()
    assert cache == tmp_path / "xdg/xpmlp/mnist" and not cache.exists()
    with serve(good_mirror_dir) as (url, log):
        got = load_mnist(mirrors=[url])
    assert sorted(log) == sorted(f"{n}.gz" for n in NAMES)
    assert files_in(cache) == sorted(f"{n}.gz" for n in NAMES)  # no temp files left
    for name in NAMES:
        assert (cache / f"{name}.gz").read_bytes() == real_gz[name]
    for a, b in zip(got, mnist):
        assert np.array_equal(a, b)
    # Second run: all from the cache, the (dead) mirror is never asked.
    load_mnist(mirrors=[closed_port_url()])


def test_download_goes_to_env_dir_and_fetches_only_missing(monkeypatch, tmp_path, good_mirror_dir, real_gz):
    target = tmp_path / "env"
    target.mkdir()
    (target / "train-images-idx3-ubyte.gz").write_bytes(real_gz["train-images-idx3-ubyte"])
    monkeypatch.setenv("XPMLP_DATA_DIR", str(target))
    with serve(good_mirror_dir) as (url, log):
        load_mnist(mirrors=[url.rstrip("/")])  # a base without its trailing slash works too
    assert sorted(log) == sorted(f"{n}.gz" for n in NAMES if n != "train-images-idx3-ubyte")
    assert files_in(target) == sorted(f"{n}.gz" for n in NAMES)
    assert not data.default_cache_dir().exists()


def test_corrupt_mirror_falls_back_to_next(tmp_path, bad_mirror_dir, good_mirror_dir, real_gz):
    with serve(bad_mirror_dir) as (bad, bad_log), serve(good_mirror_dir) as (good, good_log):
        load_mnist(tmp_path, mirrors=[bad, good])
    assert sorted(bad_log) == sorted(good_log) == sorted(f"{n}.gz" for n in NAMES)
    assert files_in(tmp_path) == sorted(f"{n}.gz" for n in NAMES)
    for name in NAMES:
        assert (tmp_path / f"{name}.gz").read_bytes() == real_gz[name]


def test_corrupt_only_mirror_lands_nothing(tmp_path, bad_mirror_dir):
    with serve(bad_mirror_dir) as (bad, _):
        with pytest.raises(DataError, match="SHA-256 mismatch"):
            load_mnist(tmp_path, mirrors=[bad])
    assert files_in(tmp_path) == []


def test_dropped_connection_falls_back_to_next(tmp_path, good_mirror_dir, real_gz):
    with serve(good_mirror_dir, _DroppingHandler) as (drop, drop_log), serve(good_mirror_dir) as (good, _):
        load_mnist(tmp_path, mirrors=[drop, good])
    assert len(drop_log) == 4
    for name in NAMES:
        assert (tmp_path / f"{name}.gz").read_bytes() == real_gz[name]
    assert files_in(tmp_path) == sorted(f"{n}.gz" for n in NAMES)


def test_dropped_connection_only_mirror(tmp_path, good_mirror_dir):
    with serve(good_mirror_dir, _DroppingHandler) as (drop, _):
        with pytest.raises(DataError, match="connection lost") as err:
            load_mnist(tmp_path, mirrors=[drop])
    assert "\n" not in str(err.value)
    assert files_in(tmp_path) == []  # no partial or temp file


def test_404_everywhere(tmp_path):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    dest = tmp_path / "dest"
    with serve(empty) as (a, _), serve(empty) as (b, _):
        with pytest.raises(DataError) as err:
            load_mnist(dest, mirrors=[a, b])
    msg = str(err.value)
    assert "\n" not in msg and "404" in msg and a in msg and b in msg
    assert all(n in msg for n in NAMES) and str(dest) in msg
    assert "--data-dir" in msg and "XPMLP_DATA_DIR" in msg and f"by hand from {a}" in msg
    assert files_in(dest) == []


def test_unreachable_mirror_fails_fast(tmp_path):
    url = closed_port_url()
    start = time.monotonic()
    with pytest.raises(DataError, match="MNIST files missing") as err:
        load_mnist(tmp_path / "dest", mirrors=[url])
    assert time.monotonic() - start < 5
    assert url in str(err.value) and "\n" not in str(err.value)


def test_unwritable_download_dir(tmp_path, good_mirror_dir):
    (tmp_path / "a_file").write_text("")
    with serve(good_mirror_dir) as (url, _):
        with pytest.raises(DataError, match="cannot write"):
            load_mnist(tmp_path / "a_file" / "mnist", mirrors=[url])


def test_progress_bar_on_a_tty(monkeypatch, tmp_path, good_mirror_dir, real_gz):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    for name in NAMES:
        if "images" in name:
            (tmp_path / f"{name}.gz").write_bytes(real_gz[name])
    monkeypatch.setattr(sys, "stderr", Tty())
    with serve(good_mirror_dir) as (url, _):
        load_mnist(tmp_path, mirrors=[url])
    assert "labels" in sys.stderr.getvalue()  # tqdm drew something


def test_sha256_table_matches_shipped_sums(real_dir):
    sums = real_dir / "SHA256SUMS.uncompressed"
    if not sums.is_file():
        pytest.skip(f"{sums} not found")
    table = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    assert table == SHA256
    assert set(SHA256) == set(NAMES)


def test_real_files_hash_to_the_table(real_raw):
    assert {n: hashlib.sha256(b).hexdigest() for n, b in real_raw.items()} == SHA256


def test_mirror_order_dead_mirror_asked_once_and_later_ones_unused(monkeypatch, tmp_path, good_mirror_dir):
    dead = closed_port_url()
    asked = []
    real_urlopen = data.urllib.request.urlopen
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, **kw: asked.append(url) or real_urlopen(url, **kw))
    with serve(good_mirror_dir) as (good, good_log), serve(good_mirror_dir) as (spare, spare_log):
        load_mnist(tmp_path, mirrors=[dead, good, spare])
    assert [u for u in asked if u.startswith(dead)] == [f"{dead}{NAMES[0]}.gz"]  # skipped once found dead
    assert sorted(good_log) == sorted(f"{n}.gz" for n in NAMES)
    assert spare_log == []


# ---------------------------------------------------------------- xpmlp data

def test_data_command_downloads_verifies_and_says_where(tmp_path, good_mirror_dir, capsys, monkeypatch):
    from xpmlp.cli import main

    dest = tmp_path / "fresh"
    with serve(good_mirror_dir) as (url, log):
        monkeypatch.setattr(data, "MIRRORS", [url])
        assert main(["data", "--dir", str(dest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"MNIST is in {dest} (4 files, SHA-256 verified):"
    assert sorted(line.split()[0] for line in out[1:]) == sorted(f"{n}.gz" for n in NAMES)
    assert "60000 x 28 x 28" in out[1] and files_in(dest) == sorted(f"{n}.gz" for n in NAMES)
    # Found the second time: the (dead) mirror is never asked.
    monkeypatch.setattr(data, "MIRRORS", [closed_port_url()])
    assert main(["data", "--data-dir", str(dest)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out[0]


def test_data_command_errors_are_one_line(tmp_path, real_raw, capsys, monkeypatch):
    from xpmlp.cli import main

    monkeypatch.setattr(data, "MIRRORS", [closed_port_url()])
    assert main(["data", "--dir", str(tmp_path / "nothing")]) == 2  # no network
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MNIST files missing" in err[0] and "download failed" in err[0]

    for name, raw in real_raw.items():  # all present, one damaged: no download, the file is named
        (tmp_path / name).write_bytes(flip_last_byte(raw) if name == NAMES[0] else raw)
    assert main(["data", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and NAMES[0] in err[0] and "SHA-256" in err[0]
