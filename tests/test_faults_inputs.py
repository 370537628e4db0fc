"""Fault injection, inputs: crafted images, TOML, records, compressed bombs, unwritable
places and received runs get one line and exit 2 within bounded memory and time; nothing
xpmlp starts outlives it, and nothing it reads makes it write outside the intended place.

Bombs are crafted headers that claim huge sizes (or a few MiB of zeros that compress to
kilobytes): no test here allocates more than some tens of MiB, even before the fixes.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import weakref
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_faults import ARGS, assert_one_line_error, synthetic, xpmlp_main  # noqa: F401 (fixture)

import xpmlp.data
import xpmlp.digits
import xpmlp.inspect
from xpmlp.config import TrainError
from xpmlp.data import DataError, load_verified, read_idx
from xpmlp.digits import ImageError, mnist_digit, read_digit, read_gray

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path, synthetic, capsys):  # noqa: F811
    """A finished 1-epoch run (mlp1-relu-sce, synthetic MNIST)."""
    run = tmp_path / "run"
    assert xpmlp_main(capsys, "train", *ARGS, "--epochs", 1, "--out", run)[0] == 0
    return run


def files_under(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


# ---------------------------------------------------------------- predict: images

def _digit_image(size):
    """A white ring on black, ``size`` (w, h) pixels: something mnist_digit finds ink in."""
    w, h = size
    yy, xx = np.ogrid[:h, :w]
    r = np.hypot((yy - h / 2) / (h / 3), (xx - w / 2) / (w / 5))
    return Image.fromarray(np.where((r > 0.7) & (r < 1), 255, 0).astype(np.uint8))


def _png_header_only(width, height):
    """A PNG whose header claims width x height grey pixels, with one tiny IDAT: what
    Pillow checks on open, with no pixel data to decode."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "EPS-text"])
def test_predict_reads_png_and_jpeg_only(tmp_path, fmt):
    path = tmp_path / "digit.png"  # the name says PNG; the bytes decide
    if fmt == "EPS-text":  # Pillow would hand this to Ghostscript where it is installed
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    else:
        _digit_image((40, 40)).save(path, format=fmt)
    with pytest.raises(ImageError, match="PNG or JPEG only"):
        read_digit(path)


@pytest.mark.parametrize("size", [(60000, 60000), (12000, 12000), (9000, 9000)],
                         ids=["over-pillow-limit", "pillow-warning", "over-our-limit"])
def test_predict_refuses_oversized_images_in_one_line(run, tmp_path, capsys, size):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(*size))  # ~70 bytes
    assert_one_line_error(xpmlp_main(capsys, "predict", run, bomb), "bomb.png", "too large")


def test_big_images_are_decoded_at_reduced_size(tmp_path):
    """A JPEG is decoded at a fraction of its size (draft), a PNG box-averaged (reduce): at
    most WORK_SIDE pixels on the longer side, and the digit made is the one the full image
    gives (up to its centring, rounded to whole pixels as MNIST's was)."""
    h, w = 2800, 4200
    yy, xx = np.ogrid[:h, :w]
    ring = np.hypot((yy - h / 2) / (h / 3), (xx - w / 2) / (w / 5))
    image = Image.fromarray((255 * np.exp(-((ring - 0.85) / 0.15) ** 2)).astype(np.uint8))
    image.save(tmp_path / "big.png")
    image.crop((0, 0, 4096, 2730)).save(tmp_path / "big.jpg", quality=95)
    assert read_gray(tmp_path / "big.png").shape == (934, 1400)  # 1/3: box-averaged
    assert read_gray(tmp_path / "big.jpg").shape == (1365, 2048)  # 1/2: the JPEG decoder's scale
    for name, full in (("big.png", image), ("big.jpg", image.crop((0, 0, 4096, 2730)))):
        want = mnist_digit(np.asarray(full, dtype=np.float32)).astype(int)
        got = read_digit(tmp_path / name)[1].astype(int)
        closest = min(np.abs(np.roll(want, (dy, dx), (0, 1)) - got).max() for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        assert closest <= 8, name


@pytest.mark.parametrize("show", [False, True])
def test_predict_keeps_no_decoded_image_while_it_reads_the_next(run, tmp_path, capsys, monkeypatch, show):
    for i in range(3):
        _digit_image((600, 400)).save(tmp_path / f"d{i}.png")
    alive, original_read, original_probs = [], xpmlp.digits.read_digit, xpmlp.inspect.class_probabilities

    def read(path):
        gray, digit = original_read(path)
        alive.append(weakref.ref(gray))
        return gray, digit

    def probabilities(model, x):  # called once every file is read
        alive[:] = [ref for ref in alive if ref() is not None]
        return original_probs(model, x)

    monkeypatch.setattr(xpmlp.digits, "read_digit", read)
    monkeypatch.setattr(xpmlp.inspect, "class_probabilities", probabilities)
    files = [tmp_path / f"d{i}.png" for i in range(3)]
    code, out, err = xpmlp_main(capsys, "predict", run, *files, *(["--show", tmp_path / "seen"] if show else []))
    assert code == 0, err
    assert len(out.splitlines()) == 3
    assert alive == [], "the decoded images were kept until every file was read"


# ---------------------------------------------------------------- report: reference TOML, records

def _record(directory, **files):
    """A results record as `report --copy-runs` writes it: config, summary, and ``files``."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model": "mlp0-sce", "seed": 0, "epochs": 1}))
    (directory / "summary.json").write_text(json.dumps({"status": "completed", "test_acc": 0.9}))
    for name, write in files.items():
        write(directory / name.replace("_", "."))
    return directory


GOOD_TABLE = '[defaults]\nmodel = "mlp0-sce"\n[tables.t]\ntitle = "T"\n'
ROW = '[[tables.t.rows]]\nlabel = "a"\ntest_acc = 0.9\n'
BAD_PUBLISHED = {
    # name: (the file's bytes, words of the one-line error)
    "malformed": (b"[tables\nx = ", "not valid TOML"),
    "not-utf8": (b"title = \"\xff\xfe\"\n", "UTF-8"),
    "no-tables": (b'title = "x"\n', "tables"),
    "tables-not-tables": (b"tables = 3\n", "tables"),
    "row-without-label": ((GOOD_TABLE + "[[tables.t.rows]]\ntest_acc = 0.9\n").encode(), "label"),
    "metric-not-number": ((GOOD_TABLE + '[[tables.t.rows]]\nlabel = "a"\ntest_acc = "high"\n').encode(),
                          "test_acc must be a number"),
    "plot-unknown": ((GOOD_TABLE + 'plot = "bars"\n' + ROW).encode(), "plot must be"),
    "figure-missing": ((GOOD_TABLE + 'plot = "epochs"\n' + ROW).encode(), "figure"),
    "figure-outside-out": ((GOOD_TABLE + 'plot = "epochs"\nfigure = "../../escaped.png"\nfigure_title = "x"\n'
                            + ROW).encode(), "without a directory"),
    "figure-absolute": ((GOOD_TABLE + 'plot = "epochs"\nfigure = "/dev/null/escaped.png"\nfigure_title = "x"\n'
                         + ROW).encode(), "without a directory"),
    "run-figure-unknown-key": ((GOOD_TABLE + 'plot = "runs"\nfigure = "a.png"\nfigure_title = "x"\n'
                                'run_figure = "{nope}.png"\nrun_figure_title = "x"\n' + ROW).encode(), "run_figure"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLISHED))
def test_report_refuses_a_bad_reference_file_in_one_line(tmp_path, capsys, case):
    data, words = BAD_PUBLISHED[case]
    record = _record(tmp_path / "runs" / "r")
    (tmp_path / "published.toml").write_bytes(data)
    result = xpmlp_main(capsys, "report", record, "--published", tmp_path / "published.toml",
                        "--out", tmp_path / "out" / "deep")
    assert_one_line_error(result, "published.toml", words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.png").exists()


def _npy_claiming(shape):
    """The header of an .npy file of float32 ``shape``, and no data."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


BAD_CURVES = {
    "object-array": lambda p: np.save(p, np.array([{"iter": 1}, None], dtype=object), allow_pickle=True),
    "one-dimensional": lambda p: np.save(p, np.arange(6, dtype=np.float32)),
    "strings": lambda p: np.save(p, np.array([["a", "b", "c"]])),
    "truncated": lambda p: p.write_bytes(_npy_bytes(np.ones((10, 3), np.float32))[:-7]),
    "claims-120-GB": lambda p: p.write_bytes(_npy_claiming((10**10, 3))),
    "not-npy": lambda p: p.write_text("iter,loss,acc\n1,2,3\n"),
}


def _npy_bytes(array):
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(BAD_CURVES))
def test_report_refuses_a_bad_curve_record_in_one_line(tmp_path, capsys, case):
    record = _record(tmp_path / "runs" / "r", curve_npy=BAD_CURVES[case])
    tracemalloc.start()
    try:
        result = xpmlp_main(capsys, "report", record, "--published", REPO / "experiments/published.toml",
                            "--out", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(result, "curve.npy", "not a curve record")
    assert peak < 2**25, f"{peak / 2**20:.0f} MiB allocated"


def test_report_summary_json_that_is_a_directory(tmp_path, capsys):
    record = _record(tmp_path / "runs" / "r")
    (record / "summary.json").unlink()
    (record / "summary.json").mkdir()
    result = xpmlp_main(capsys, "report", record, "--published", REPO / "experiments/published.toml",
                        "--out", tmp_path / "out")
    assert_one_line_error(result, "summary.json", "cannot read it")


SWEEP = 'out = "{out}"\n[defaults]\nmodel = "mlp0-sce"\nepochs = 1\ndevice = "numpy"\n[grid]\nlr = [0.1, 0.2]\n'


def _sweep_config(tmp_path, out):
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP.replace("{out}", Path(out).as_posix()))
    return path


def test_sweep_summary_json_that_is_a_directory(tmp_path, capsys):
    from xpmlp.sweep import load_grid
    config = _sweep_config(tmp_path, tmp_path / "runs")
    run_dir = tmp_path / "runs" / load_grid(config)[0][0][0]
    (run_dir / "summary.json").mkdir(parents=True)
    (run_dir / "checkpoint.npz").write_bytes(b"")  # a run past its first checkpoint: its summary is read
    assert_one_line_error(xpmlp_main(capsys, "sweep", config, "--dry-run"), "summary.json", "cannot read it")


# ---------------------------------------------------------------- unwritable --out

@pytest.mark.parametrize("command", ["report", "sweep-jobs", "sweep-stack"])
@pytest.mark.parametrize("place", ["under-a-file", "read-only"])
def test_unwritable_out_is_one_line(tmp_path, capsys, synthetic, command, place):  # noqa: F811
    if place == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "locked").mkdir(mode=0o500)
        out = tmp_path / "locked" / "out"
    else:
        (tmp_path / "afile").write_text("a file, not a directory\n")
        out = tmp_path / "afile" / "out"
    before = files_under(tmp_path)
    if command == "report":
        record = _record(tmp_path / "runs" / "r")
        before = files_under(tmp_path)
        result = xpmlp_main(capsys, "report", record, "--published", REPO / "experiments/published.toml",
                            "--out", out)
        assert_one_line_error(result, "--out", "cannot write")
    else:
        config = _sweep_config(tmp_path, tmp_path / "elsewhere")
        before = files_under(tmp_path)
        result = xpmlp_main(capsys, "sweep", config, "--out", out, *(["--stack"] if command == "sweep-stack" else []))
        assert_one_line_error(result, str(out.parent), "cannot write")
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------- compressed bombs

def _gz_of(header, zeros):
    """gzip bytes of ``header`` then ``zeros`` zero bytes, compressed a MiB at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts, block = [packer.compress(header)], bytes(2**20)
    for start in range(0, zeros, len(block)):
        parts.append(packer.compress(block[:min(len(block), zeros - start)]))
    return b"".join(parts) + packer.flush()


@pytest.mark.parametrize("header", [struct.pack(">II", 0x801, 10000), struct.pack(">II", 0x801, 2**31)],
                         ids=["true-header", "header-claims-2G"])
def test_a_gz_bomb_is_refused_without_inflating_it(tmp_path, header):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(_gz_of(header, 64 * 2**20))  # 64 MiB of zeros in ~64 KiB
    for read in (lambda: read_idx(path), lambda: load_verified({"test_labels": path})):
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match="trailing bytes") as err:
                read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert peak < 2**22, f"{peak / 2**20:.0f} MiB inflated"


def test_a_gz_still_reads_across_members(tmp_path):
    labels = np.arange(10000, dtype=np.uint8) % 10
    raw = struct.pack(">II", 0x801, 10000) + labels.tobytes()
    path = tmp_path / "labels.gz"
    path.write_bytes(_gz_of(raw[:5000], 0) + _gz_of(raw[5000:], 0))  # two gzip members, as `cat` makes
    np.testing.assert_array_equal(read_idx(path), labels)


def _bomb_checkpoint(run, elements):
    """The run's checkpoint with param_0 replaced by ``elements`` float32 zeros (compressed)."""
    path = run / "checkpoint.npz"
    with zipfile.ZipFile(path) as old:
        members = {info.filename: old.read(info) for info in old.infolist() if info.filename != "param_0.npy"}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as new:
        with new.open("param_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (elements,)})
            block = bytes(2**20)
            for start in range(0, 4 * elements, len(block)):
                f.write(block[:min(len(block), 4 * elements - start)])
        for name, data in members.items():
            new.writestr(name, data)


def test_a_checkpoint_bomb_is_refused_before_its_data_is_read(run, capsys):
    _bomb_checkpoint(run, 16 * 2**20)  # 64 MiB of zeros for a 784x256 weight (0.8 MiB)
    tracemalloc.start()
    try:
        result = xpmlp_main(capsys, "eval", run, "--device", "numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(result, "checkpoint.npz", "param_0")
    assert peak < 2**24, f"{peak / 2**20:.0f} MiB read"


def test_checkpoint_size_check_passes_a_real_checkpoint(run):
    from xpmlp import get_backend, rundir
    model = rundir.load_config(run)[0].build(get_backend("numpy"))
    rundir.check_checkpoint_sizes(run / "checkpoint.npz", model)  # the run's own, partial records included
    params, velocity, state, _ = rundir.load_checkpoint(run, model)
    assert [p.shape for p in params] == [(784, 256), (256,), (256, 10), (10,)]


# ---------------------------------------------------------------- eval of a received run

@pytest.mark.parametrize("how", ["env", "flag", "neither"])
def test_eval_of_a_received_run_never_uses_its_data_dir(run, tmp_path, capsys, monkeypatch, synthetic, how):  # noqa: F811
    theirs = tmp_path / "their-machine" / "mnist"
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, data_dir=str(theirs))))
    ours = tmp_path / "ours"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("XPMLP_DATA_DIR", raising=False)
    if how == "env":
        monkeypatch.setenv("XPMLP_DATA_DIR", str(ours))
    searched = []

    def load_mnist(data_dir=None, **kwargs):  # where the real one would look (and download)
        searched.append(xpmlp.data.find_data_dir(data_dir)[0])
        return synthetic

    monkeypatch.setattr(xpmlp.data, "load_mnist", load_mnist)
    code, out, err = xpmlp_main(capsys, "eval", run, "--device", "numpy", *(["--data-dir", ours] if how == "flag" else []))
    assert code == 0, err
    want = tmp_path / "cache" / "xpmlp" / "mnist" if how == "neither" else ours
    assert searched == [want]
    assert not (tmp_path / "their-machine").exists()


# ---------------------------------------------------------------- bench --busy

def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to see the processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_bench_busy_processes_die_with_the_bench(tmp_path, sig):
    script = tmp_path / "busy.py"
    script.write_text(textwrap.dedent("""
        import time
        from xpmlp.bench import busy_processes
        with busy_processes(2) as pids:
            print(*pids, flush=True)
            time.sleep(120)
    """))
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in bench.stdout.readline().split()]
    try:
        assert len(pids) == 2 and all(map(_alive, pids))
        bench.send_signal(sig)
        bench.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, pids)), "the load processes outlived the bench"
    finally:
        bench.kill()
        for pid in pids:  # only those this test started
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the Ray executor's work folder

@pytest.fixture
def tmpdir_here(tmp_path, monkeypatch):
    """tempfile's directory is tmp_path/tmp for the test."""
    import tempfile
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp"


def test_ray_work_folder_is_private_to_the_user(tmpdir_here):
    from xpmlp.sweep.ray_executor import work_dir
    work = work_dir(Path("/somewhere/runs/r"))
    root = work.parent
    assert root.parent == tmpdir_here and root.is_dir() and not root.is_symlink()
    assert root.stat().st_uid == os.getuid() and root.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("squat", ["symlink", "open-mode", "other-owner"])
def test_ray_work_folder_made_by_someone_else_is_refused(tmpdir_here, tmp_path, squat):
    from xpmlp.sweep import ray_executor as sweep_ray
    root = tmpdir_here / f"xpmlp-ray-{os.getuid()}"
    if squat == "symlink":
        (tmp_path / "target").mkdir(mode=0o700)
        root.symlink_to(tmp_path / "target")
    else:
        root.mkdir()
        os.chmod(root, 0o777 if squat == "open-mode" else 0o700)
        if squat == "other-owner":
            if os.geteuid() != 0:
                pytest.skip("only root can give a directory to another user")
            os.chown(root, 54321, -1)
    with pytest.raises(TrainError, match="not a private directory"):
        sweep_ray.work_dir(Path("/somewhere/runs/r"))


def test_a_killed_sweeps_copies_are_removed_by_the_next_task(tmpdir_here, tmp_path):
    fcntl = pytest.importorskip("fcntl", reason="the Ray executor's locks are POSIX file locks")
    from xpmlp import rundir
    from xpmlp.sweep import ray_executor as sweep_ray
    stale, busy_task, busy_run, mine = (sweep_ray.work_dir(Path(f"/driver/runs/{n}"))
                                        for n in ("stale", "task", "run", "mine"))
    for work in (stale, busy_task, busy_run, mine):
        work.mkdir()
        (work / "checkpoint.npz").write_bytes(b"copy")
    # busy_task: a live task holds it; busy_run: its task is dead, its xpmlp train still writes
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        a = open({str(busy_task) + '.lock'!r}, "a"); fcntl.flock(a, fcntl.LOCK_EX)
        b = open({str(busy_run / rundir.LOCK)!r}, "a"); fcntl.flock(b, fcntl.LOCK_EX)
        print("held", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with sweep_ray.claimed(mine) as work:
            assert work == mine
            assert not stale.exists() and not Path(f"{stale}.lock").exists()
            assert busy_task.is_dir() and busy_run.is_dir()
            with open(f"{mine}.lock") as f, pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while inside
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- collection without Ray or MNIST

def test_collection_needs_neither_ray_nor_mnist(tmp_path):
    """`pytest --collect-only` where Ray is not installed (hidden here by a sitecustomize)
    and MNIST is nowhere: no collection error, test_sweep_ray skipped with its reason."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class HideRay:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {name!r} (hidden for this test)", name=name)
        sys.meta_path.insert(0, HideRay())
    """))
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, PYTHONPATH=str(hide), XPMLP_DATA_DIR=str(tmp_path / "empty"),
               XDG_CACHE_HOME=str(tmp_path / "empty"), HOME=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider",
                             "tests"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "error" not in out.lower().splitlines()[-1], out[-3000:]
    assert "test_sweep_ray.py" in out and "Ray is not installed" in out, out[-3000:]
