"""A user's own data (--data: a directory of IDX files or an .npz) and the datasets known by
name (--dataset), from the command line: trained and evaluated end to end, recorded in
config.json, refused when a resume or an eval is given other data, and bad data told in one
line (exit 2) that never calls the user's files corrupt."""
import gzip
import hashlib
import json

import numpy as np
import pytest
from test_data import serve

from xpmlp import data
from xpmlp.cli import main

FAST = ["--hidden", "16", "--activation", "relu", "--loss", "sce", "--batch-size", "10", "--lr", "0.1",
        "--device", "cpu", "--quiet"]


def tiny_images(n, seed, classes=3, side=6):
    """n uint8 images of ``side`` x ``side``, class c a bright band in rows 2c, 2c+1, plus noise:
    a set any MLP learns in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.uint8)
    x = rng.integers(0, 60, (n, side, side)).astype(np.uint8)
    for i, c in enumerate(y):
        x[i, 2 * c:2 * c + 2, :] += 190
    return x, y


def idx_bytes(array):
    """The IDX encoding of a uint8 array of 1 (labels) or 3 (images) dimensions."""
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_idx_dir(path, gz=True, names=("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    path.mkdir(parents=True, exist_ok=True)
    (xt, yt), (xs, ys) = tiny_images(90, 0), tiny_images(30, 1)
    for name, array in zip(names, (xt, yt, xs, ys)):
        body = idx_bytes(array)
        (path / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(body) if gz else body)
    return path


def write_npz(path, **changes):
    (xt, yt), (xs, ys) = tiny_images(90, 0), tiny_images(30, 1)
    arrays = dict(x_train=xt.reshape(90, -1).astype(np.float32) / 255, y_train=yt.astype(np.int64),
                  x_test=xs.reshape(30, -1).astype(np.float32) / 255, y_test=ys.astype(np.int64))
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_trains_and_evaluates_end_to_end(tmp_path, capsys, gz):
    d = write_idx_dir(tmp_path / "tiny", gz=gz)
    code, out, err = run(capsys, "train", "--data", d, "--epochs", "5", "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert (config["in_features"], config["classes"]) == (36, 3)
    info = config["data_info"]
    assert info["name"] == "tiny" and info["train"] == [90, 36] and info["test"] == [30, 36]
    assert info["scaling"] == "(pixel - 128) / 255"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_acc"] > 0.9
    code, out, err = run(capsys, "eval", tmp_path / "run", "--json")  # the run's own data by default
    assert code == 0, err
    assert json.loads(out)["test_acc"] == pytest.approx(summary["test_acc"])


def test_gz_and_raw_copies_are_the_same_data(tmp_path):
    a, b = data.load_user_data(write_idx_dir(tmp_path / "a")), data.load_user_data(write_idx_dir(tmp_path / "b", False))
    assert a.info["sha256"] == b.info["sha256"]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_emnist_style_names_are_found(tmp_path):
    names = [f"emnist-digits-{s}-{k}-idx{i}-ubyte" for s, k, i in
             (("train", "images", 3), ("train", "labels", 1), ("test", "images", 3), ("test", "labels", 1))]
    got = data.load_user_data(write_idx_dir(tmp_path / "emnist", names=names))
    assert got.train_x.shape == (90, 36) and got.test_y.shape == (30,)


def test_npz_trains_with_float_features_as_given(tmp_path, capsys):
    path = write_npz(tmp_path / "mine.npz")
    code, out, err = run(capsys, "train", "--data", path, "--epochs", "5", "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    info = json.loads((tmp_path / "run/config.json").read_text())["data_info"]
    assert info["name"] == "mine" and info["scaling"] == "none" and info["classes"] == 3
    got = data.load_user_data(path)
    with np.load(path) as npz:
        assert np.array_equal(got.train_x, npz["x_train"])  # float data unscaled
    assert json.loads((tmp_path / "run/summary.json").read_text())["test_acc"] > 0.9


def test_resume_and_eval_refuse_other_data(tmp_path, capsys):
    path = write_npz(tmp_path / "mine.npz")
    assert run(capsys, "train", "--data", path, "--epochs", "1", "--out", tmp_path / "run", *FAST)[0] == 0
    other = write_npz(tmp_path / "other.npz", y_test=tiny_images(30, 1)[1][::-1].astype(np.int64))
    for argv in (["train", "--resume", tmp_path / "run", "--epochs", "2", "--data", other, "--quiet"],
                 ["eval", tmp_path / "run", "--data", other]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "the run was trained on mine (90+30 samples of 36 features, sha256" in err and "not on other" in err
    # the same data under another name resumes
    (tmp_path / "moved.npz").write_bytes(path.read_bytes())
    code, out, err = run(capsys, "train", "--resume", tmp_path / "run", "--epochs", "2", "--data",
                         tmp_path / "moved.npz", "--quiet")
    assert code == 0, err


def test_a_run_on_mnist_refuses_own_data_at_eval(tmp_path, capsys):
    """A run from before data was recorded trained on MNIST: other shapes are refused."""
    path = write_npz(tmp_path / "mine.npz")
    assert run(capsys, "train", "--data", path, "--epochs", "1", "--out", tmp_path / "run", *FAST)[0] == 0
    config = json.loads((tmp_path / "run/config.json").read_text())
    del config["data_info"]
    (tmp_path / "run/config.json").write_text(json.dumps(config))
    code, out, err = run(capsys, "eval", tmp_path / "run")
    assert code == 2 and "trained on mnist (60000+10000 samples of 784 features)" in err


def _bad_cases(tmp_path):
    x, y = tiny_images(30, 1)
    d = write_idx_dir(tmp_path / "short")
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y[:20])))
    trunc = write_idx_dir(tmp_path / "trunc", gz=False)
    (trunc / "train-images-idx3-ubyte").write_bytes(idx_bytes(tiny_images(90, 0)[0])[:-5])
    missing = write_idx_dir(tmp_path / "missing")
    (missing / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "notes.txt").write_text("hello")
    nan = np.ones((30, 36), np.float32)
    nan[3, 4] = np.nan
    return {
        "not npz": (tmp_path / "notes.txt", "neither a directory of IDX files nor an .npz"),
        "absent": (tmp_path / "nothing", "no such file or directory"),
        "counts": (d, "30 test samples but 20 test labels"),
        "truncated idx": (trunc, "truncated"),
        "missing file": (missing, "no IDX file of the test images"),
        "float labels": (write_npz(tmp_path / "fl.npz", y_train=np.zeros(90)), "labels are float64"),
        "negative labels": (write_npz(tmp_path / "neg.npz", y_test=-np.ones(30, np.int64)), "labels include -1"),
        "non-finite": (write_npz(tmp_path / "nan.npz", x_test=nan), "non-finite"),
        "missing key": (write_npz(tmp_path / "key.npz", y_test=None), "the .npz has no y_test"),
        "widths": (write_npz(tmp_path / "w.npz", x_test=np.zeros((30, 5), np.float32)),
                   "36 features but test samples 5"),
        "one class": (write_npz(tmp_path / "one.npz", y_train=np.zeros(90, np.int64), y_test=np.zeros(30, np.int64)),
                      "at least 2"),
    }


def test_bad_data_is_one_line_exit_2_and_never_called_corrupt(tmp_path, capsys):
    for case, (path, words) in _bad_cases(tmp_path).items():
        code, out, err = run(capsys, "train", "--data", path, "--epochs", "1", "--out", tmp_path / "run", *FAST)
        assert code == 2, case
        assert len(err.strip().splitlines()) == 1, (case, err)
        assert words in err, (case, err)
        assert "delete it" not in err and "corrupt" not in err, (case, err)
        assert not (tmp_path / "run").exists(), case


def test_batch_larger_than_own_training_set(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", write_npz(tmp_path / "m.npz"), "--batch-size", "100",
                         "--epochs", "1", "--device", "cpu", "--model", "mlp0-sce", "--out", tmp_path / "run")
    assert code == 2 and "exceeds the 90 training samples" in err


def test_data_with_dataset_is_refused(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", write_npz(tmp_path / "m.npz"), "--dataset", "kmnist", *FAST)
    assert code == 2 and "not both" in err


# ---------------------------------------------------------------- datasets known by name

def test_known_datasets_are_the_configs():
    from xpmlp.config import DATASETS
    assert tuple(data.KNOWN) == DATASETS
    for known in data.KNOWN.values():
        assert set(known.sums) == set(data.FILES.values())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A mirror serving a tiny Fashion-MNIST look-alike, and KNOWN's Fashion-MNIST entry
    given the look-alike's MD5s (the real files' are in data.FASHION_MD5): the download and
    verification are Fashion-MNIST's own code path, MNIST's."""
    mirror = write_idx_dir(tmp_path / "mirror")
    sums = {p.name.removesuffix(".gz"): hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    monkeypatch.setitem(data.KNOWN, "fashion-mnist", data.KNOWN["fashion-mnist"]._replace(sums=sums))
    monkeypatch.setattr(data, "SIZES", {n: len(gzip.decompress((mirror / f"{n}.gz").read_bytes())) for n in sums})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XPMLP_DATA_DIR", str(tmp_path / "mnist-only"))  # MNIST's, not Fashion-MNIST's
    return mirror


def test_dataset_downloads_and_verifies_through_mnists_path(tmp_path, capsys, fake_fashion, monkeypatch):
    with serve(fake_fashion) as (url, log):
        monkeypatch.setitem(data.KNOWN, "fashion-mnist", data.KNOWN["fashion-mnist"]._replace(mirrors=[url]))
        code, out, err = run(capsys, "train", "--dataset", "fashion-mnist", "--epochs", "2",
                             "--out", tmp_path / "run", *FAST)
    assert code == 0, err
    assert sorted(log) == sorted(f"{n}.gz" for n in data.FILES.values())
    cache = tmp_path / "xdg/xpmlp/fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in data.FILES.values())
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["dataset"] == "fashion-mnist" and config["data_info"]["name"] == "fashion-mnist"
    # eval finds it in the cache (the mirror is gone) and it verifies again
    assert run(capsys, "eval", tmp_path / "run")[0] == 0


def test_known_dataset_with_wrong_sum_is_corrupt(tmp_path, fake_fashion):
    cache = tmp_path / "xdg/xpmlp/fashion-mnist"
    cache.mkdir(parents=True)
    for p in fake_fashion.iterdir():
        (cache / p.name).write_bytes(p.read_bytes())
    images = cache / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-1] + b"\x07"))
    with pytest.raises(data.DataError, match="fails its MD5 check .*Fashion-MNIST train-images"):
        data.load_data(dataset="fashion-mnist", download=False)


def test_known_dataset_raw_copy_cannot_be_verified(tmp_path, fake_fashion):
    cache = tmp_path / "xdg/xpmlp/fashion-mnist"
    cache.mkdir(parents=True)
    for p in fake_fashion.iterdir():
        (cache / p.name.removesuffix(".gz")).write_bytes(gzip.decompress(p.read_bytes()))
    with pytest.raises(data.DataError, match="published sums are of its .gz files.*--data"):
        data.load_data(dataset="fashion-mnist", download=False)


def test_corrupt_mirror_of_known_dataset_lands_nothing(tmp_path, fake_fashion, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in fake_fashion.iterdir():
        (bad / p.name).write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-1] + b"\x07"))
    with serve(bad) as (url, log):
        with pytest.raises(data.DataError, match=r"Fashion-MNIST files missing.*MD5 mismatch"):
            data.load_mnist(dataset="fashion-mnist", mirrors=[url])
    assert not list((tmp_path / "xdg/xpmlp/fashion-mnist").iterdir())


# ---------------------------------------------------------------- using a run: xpmlp.load, xpmlp export

def test_load_predicts_on_arrays_as_eval_does(tmp_path, capsys):
    import xpmlp
    d = write_idx_dir(tmp_path / "tiny")
    assert run(capsys, "train", "--data", d, "--epochs", "5", "--out", tmp_path / "run", *FAST)[0] == 0
    model = xpmlp.load(tmp_path / "run")
    x, y = tiny_images(30, 1)  # the test images as the files hold them: uint8, scaled as in training
    pred = model.predict(x)
    assert type(pred) is np.ndarray and pred.shape == (30,)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert np.mean(pred == y) == pytest.approx(summary["test_acc"])
    with pytest.raises(ValueError, match="5 features per sample; the network takes 36"):
        model.predict(np.zeros((2, 5), np.float32))


def test_export_is_readable_with_numpy_alone(tmp_path, capsys):
    import xpmlp
    path = write_npz(tmp_path / "mine.npz")
    assert run(capsys, "train", "--data", path, "--epochs", "5", "--out", tmp_path / "run", *FAST)[0] == 0
    code, out, err = run(capsys, "export", tmp_path / "run", tmp_path / "w.npz")
    assert code == 0 and "W0 36x16, b0 16, W1 16x3, b1 3" in out, err
    with np.load(tmp_path / "w.npz", allow_pickle=False) as w:  # the forward pass by hand
        assert (str(w["activation"]), str(w["output"]), str(w["input_scaling"]), int(w["classes"])) == \
            ("relu", "softmax", "none", 3)
        with np.load(path) as npz:
            x = npz["x_test"]
        h = np.maximum(x @ w["W0"] + w["b0"], 0)
        logits = h @ w["W1"] + w["b1"]
    expected = xpmlp.load(tmp_path / "run").predict_proba(x)
    got = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(got / got.sum(1, keepdims=True), expected, rtol=1e-5, atol=1e-6)
    assert run(capsys, "export", tmp_path / "run", tmp_path / "w.txt")[0] == 2


def test_data_command_fetches_a_known_dataset(tmp_path, capsys, fake_fashion, monkeypatch):
    with serve(fake_fashion) as (url, log):
        monkeypatch.setitem(data.KNOWN, "fashion-mnist", data.KNOWN["fashion-mnist"]._replace(mirrors=[url]))
        code, out, err = run(capsys, "data", "--dataset", "fashion-mnist")
    assert code == 0, err
    assert out.splitlines()[0] == f"Fashion-MNIST is in {tmp_path / 'xdg/xpmlp/fashion-mnist'} (4 files, MD5 verified):"
