"""The real command line, in subprocesses: what a user sees on success and on each mistake.

Every mistake must exit with status 2, print exactly one line on stderr (no traceback)
and leave nothing behind that looks like a result.
"""
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import real_mnist_dir

RESULT_FILES = ("config.json", "summary.json", "checkpoint.npz", "metrics.jsonl")
FAST = ["--model", "mlp0-sce", "--batch-size", "600", "--device", "cpu"]  # an epoch in well under a second


def env():
    return dict(os.environ, XPMLP_DATA_DIR=str(real_mnist_dir()), OPENBLAS_NUM_THREADS="1",
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def xpmlp(*args, cwd, stderr_tty=False, timeout=120):
    """Run ``python -m xpmlp ARGS`` in ``cwd`` (never the repository root, whose xpmlp/
    would shadow the installed package).  Returns (returncode, stdout, stderr)."""
    cmd = [sys.executable, "-m", "xpmlp", *map(str, args)]
    if not stderr_tty:
        p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    # stderr on a terminal, where a progress bar would be drawn: POSIX only (the module
    # imports them here, so that it still collects on Windows)
    pty = pytest.importorskip("pty", reason="a pseudo-terminal needs POSIX")
    import fcntl
    import termios
    master, slave = pty.openpty()
    # a terminal of 24 x 80: a fresh pty reports 0 columns, where tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        err = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            err += chunk
        out = p.stdout.read().decode()
        p.wait(timeout=timeout)
    finally:
        os.close(master)
    return p.returncode, out, err.decode(errors="replace")


def snapshot(directory):
    """Name -> (size, mtime, sha256) of every file below ``directory`` but the lock file,
    which any would-be writer touches (it holds the last writer's pid)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_user_error(result, *needles):
    rc, out, err = result
    assert rc == 2, f"exit status {rc}, expected 2\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("xpmlp: error: "), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_no_result(out_dir, cwd):
    out_dir = Path(out_dir)
    found = [name for name in RESULT_FILES if (out_dir / name).exists()]
    assert not found, f"an error left {found} in {out_dir}"
    assert not (Path(cwd) / "runs").exists(), "an error created the default runs/ directory"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run made by the CLI with --quiet and --tensorboard, stderr on a terminal."""
    cwd = tmp_path_factory.mktemp("finished")
    result = xpmlp("train", *FAST, "--epochs", "2", "--quiet", "--tensorboard", "--out", "run",
                   cwd=cwd, stderr_tty=True)
    rc, out, err = result
    assert rc == 0, f"training failed:\n{out}\n{err}"
    return cwd / "run", result


# ---------------------------------------------------------------- success

def test_train_writes_a_run_and_quiet_prints_one_line_per_epoch(finished):
    run, (rc, out, err) = finished
    for name in RESULT_FILES:
        assert (run / name).is_file(), f"{name} missing"
    assert list(run.glob("events.out.tfevents.*")), "--tensorboard wrote no event file"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, out
    assert epoch_lines[0].startswith("epoch   1/2") and epoch_lines[1].startswith("epoch   2/2")
    assert "test loss" in epoch_lines[1]
    assert out.splitlines()[-1].startswith("completed: test accuracy"), out
    # --quiet: no progress bar even on a terminal
    assert "\r" not in err and "it/s" not in err and "it]" not in err, repr(err)
    assert "Traceback" not in out + err


def test_progress_bar_without_quiet(tmp_path):
    """The contrast to --quiet: the same run, not quiet, on a terminal, draws a bar."""
    rc, out, err = xpmlp("train", *FAST, "--epochs", "1", "--out", "run", cwd=tmp_path, stderr_tty=True)
    assert rc == 0, out + err
    assert "it/s" in err or "it]" in err, f"no progress bar on a terminal: {err!r}"


def test_eval_prints_test_accuracy_and_changes_nothing(finished):
    run, _ = finished
    summary = json.loads((run / "summary.json").read_text())
    before = snapshot(run)
    rc, out, err = xpmlp("eval", "run", "--device", "cpu", cwd=run.parent)
    assert rc == 0, out + err
    assert f"test accuracy {100 * summary['test_acc']:.2f}%" in out, out
    assert "epoch 2" in out

    rc, out, err = xpmlp("eval", "run", "--device", "cpu", "--json", cwd=run.parent)
    assert rc == 0, out + err
    result = json.loads(out)
    assert (result["epoch"], result["iters_into_next_epoch"]) == (2, 0)
    assert result["test_acc"] == pytest.approx(summary["test_acc"], abs=1e-4)
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert snapshot(run) == before, "eval modified the run directory"


def test_eval_of_a_checkpoint_taken_inside_an_epoch_says_how_far_in(tmp_path, monkeypatch):
    """Ctrl-C in epoch 2 after 4 of its 10 steps: eval names that position, not epoch 1."""
    from test_train import ITERS, config, interrupt_after, trainer

    from xpmlp.data import Mnist
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1300, 784)).astype(np.float32)
    y = rng.integers(0, 10, 1300)
    t = trainer(config(epochs=3, device="cpu"), tmp_path / "run", Mnist(x[:1000], y[:1000], x[1000:], y[1000:]))
    interrupt_after(monkeypatch, t, ITERS + 4)
    t.run()
    rc, out, err = xpmlp("eval", "run", "--json", cwd=tmp_path)
    assert rc == 0, out + err
    result = json.loads(out)
    assert (result["epoch"], result["iters_into_next_epoch"], result["iter"]) == (1, 4, ITERS + 4)
    rc, out, err = xpmlp("eval", "run", cwd=tmp_path)
    assert rc == 0 and "epoch 1 + 4 iterations" in out, out + err


def test_help_shows_defaults(tmp_path):
    rc, out, err = xpmlp("train", "--help", cwd=tmp_path)
    assert rc == 0 and err == ""
    for text in ("--model", "(default: mlp2-relu-sce)", "--epochs", "(default: 100)", "(default: 0.01)",
                 "(default: 0.9)", "--resume", "--device"):
        assert text in " ".join(out.split()), f"{text!r} missing from --help"
    rc, out, _ = xpmlp("--help", cwd=tmp_path)
    assert rc == 0 and all(cmd in out for cmd in ("train", "eval", "sweep", "report"))


def cuda_unavailable_reason():
    import xpmlp
    try:
        xpmlp.get_backend("cuda")
    except xpmlp.BackendUnavailable as exc:
        return str(exc)
    return None


def test_device_auto_falls_back_with_a_notice(tmp_path):
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA GPU works here: auto picks it, there is no fallback")
    rc, out, err = xpmlp("train", "--model", "mlp0-sce", "--batch-size", "600", "--epochs", "1",
                         "--device", "auto", "--quiet", "--out", "run", cwd=tmp_path)
    assert rc == 0, out + err
    notices = [line for line in err.splitlines() if line.strip()]
    assert len(notices) == 1 and "no usable CUDA GPU" in notices[0] and "NumPy" in notices[0], err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["device"] == "auto" and config["device_used"]["backend"] == "numpy"


# ---------------------------------------------------------------- mistakes

BAD_SETTINGS = [
    (["--model", "mlp9-nope"], ["unknown model", "mlp2-relu-sce"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--batch-size", "60001"], ["--batch-size"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--lr", "nan"], ["--lr"]),
    (["--momentum", "1.5"], ["--momentum"]),
    (["--momentum", "-0.1"], ["--momentum"]),
    (["--epochs", "abc"], ["--epochs", "abc"]),
    (["--lr", "abc"], ["--lr", "abc"]),
    (["--dtype", "float16"], ["--dtype"]),
    (["--device", "tpu"], ["unknown device"]),
    (["--bogus-flag"], ["--bogus-flag"]),
]


@pytest.mark.parametrize("args, needles", BAD_SETTINGS, ids=[" ".join(a) for a, _ in BAD_SETTINGS])
def test_bad_settings(tmp_path, args, needles):
    base = {"--model": "mlp0-sce", "--device": "cpu", "--epochs": "1"}
    for flag in args:
        base.pop(flag, None)
    cmd = ["train", *[x for kv in base.items() for x in kv], *args, "--out", "out"]
    assert_user_error(xpmlp(*cmd, cwd=tmp_path), *needles)
    assert_no_result(tmp_path / "out", tmp_path)


def test_device_cuda_without_a_gpu(tmp_path):
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a CUDA GPU works here")
    line = assert_user_error(xpmlp("train", "--model", "mlp0-sce", "--device", "cuda", "--out", "out", cwd=tmp_path))
    try:
        import cupy  # noqa: F401
    except Exception:
        assert "not installed" in line or "failed to import" in line, line
    else:  # CuPy present, no GPU: the message must say what is missing
        assert "driver" in line or "no CUDA device" in line, line
    assert "--device cpu" in line, "the error should name the way out"
    assert_no_result(tmp_path / "out", tmp_path)


def test_out_that_cannot_be_written(tmp_path):
    (tmp_path / "afile").write_text("a regular file, not a directory\n")
    assert_user_error(xpmlp("train", *FAST, "--epochs", "1", "--out", "afile/run", cwd=tmp_path), "--out", "afile")
    assert (tmp_path / "afile").read_text() == "a regular file, not a directory\n"
    assert_no_result(tmp_path, tmp_path)


def test_out_of_an_existing_run(finished):
    run, _ = finished
    before = snapshot(run)
    assert_user_error(xpmlp("train", *FAST, "--epochs", "1", "--out", "run", cwd=run.parent),
                      "already holds a run", "--resume")
    assert snapshot(run) == before, "the existing run was touched"


def test_resume_with_contradicting_lr(finished):
    run, _ = finished
    before = snapshot(run)
    assert_user_error(xpmlp("train", "--resume", "run", "--lr", "0.5", "--epochs", "3", "--device", "cpu",
                            cwd=run.parent), "--lr", "contradicts")
    assert snapshot(run) == before, "the run was touched"


def test_resume_of_a_directory_without_checkpoint_starts_it_again(tmp_path, finished):
    run, _ = finished
    target = tmp_path / "half"
    target.mkdir()
    assert_user_error(xpmlp("train", "--resume", "half", "--device", "cpu", cwd=tmp_path),
                      "not a run directory")
    (target / "config.json").write_text((run / "config.json").read_text())  # started, never checkpointed
    (target / "metrics.jsonl").write_text('{"kind": "iter", "epoch": 1, "iter": 1, "loss": 9.0, "acc": 0.0}\n')
    rc, out, err = xpmlp("train", "--resume", "half", "--epochs", "1", "--device", "cpu", cwd=tmp_path)
    assert rc == 0, out + err
    assert "half: no checkpoint yet (stopped before its first one); starting it again from scratch" in out
    records = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] != 9.0 and [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]
    assert json.loads((target / "summary.json").read_text())["status"] == "completed"


def test_resume_of_a_corrupt_checkpoint(tmp_path, finished):
    run, _ = finished
    target = tmp_path / "broken"
    target.mkdir()
    for name in ("config.json", "summary.json", "metrics.jsonl"):
        (target / name).write_bytes((run / name).read_bytes())
    data = (run / "checkpoint.npz").read_bytes()
    (target / "checkpoint.npz").write_bytes(data[: len(data) // 3])
    before = snapshot(target)
    assert_user_error(xpmlp("train", "--resume", "broken", "--epochs", "3", "--device", "cpu", cwd=tmp_path),
                      "unreadable checkpoint")
    assert snapshot(target) == before


@pytest.mark.parametrize("damage", ["truncated-gzip", "truncated-idx", "wrong-magic"])
def test_corrupt_data_is_reported_without_downloading(tmp_path, damage):
    """Three good files and one damaged: an error naming the file, no download attempt."""
    data = tmp_path / "mnist"
    data.mkdir()
    real = real_mnist_dir()
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data / f"{name}.gz").symlink_to(real / f"{name}.gz")
    good = (real / "train-images-idx3-ubyte.gz").read_bytes()
    bad = {"truncated-gzip": lambda: good[: len(good) // 2],
           "truncated-idx": lambda: gzip.compress(gzip.decompress(good)[:100_000]),
           "wrong-magic": lambda: gzip.compress(b"\x00\x00\x08\x99" + gzip.decompress(good)[4:100_000])}[damage]()
    (data / "train-images-idx3-ubyte.gz").write_bytes(bad)
    # --device auto: the CPU-fallback notice must not come on top of the error line
    line = assert_user_error(xpmlp("train", *FAST, "--device", "auto", "--epochs", "1", "--data-dir", data,
                                   "--out", "out", cwd=tmp_path), "train-images-idx3-ubyte")
    assert "download failed" not in line
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"]), "the loader wrote into the data directory"
    assert (data / "train-images-idx3-ubyte.gz").read_bytes() == bad
    assert_no_result(tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_eval_of_a_directory_without_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(xpmlp("eval", "empty", cwd=tmp_path), "holds no run")
    assert_user_error(xpmlp("eval", "missing", cwd=tmp_path), "holds no run")
    assert list((tmp_path / "empty").iterdir()) == []


def test_no_command(tmp_path):
    assert_user_error(xpmlp(cwd=tmp_path))
