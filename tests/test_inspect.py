"""What a network learned: class probabilities, confusion matrices, confident mistakes,
first-layer weights (xpmlp.inspect), their pictures (xpmlp.plots), digits read from image
files (xpmlp.digits), and the `eval --plots` and `predict` commands."""
import json
import shutil

import numpy as np
import pytest
from helpers import real_mnist_dir
from PIL import Image
from test_cli import FAST, assert_user_error, snapshot, xpmlp

from xpmlp import build_mlp
from xpmlp.data import FILES, read_idx, to_inputs
from xpmlp.digits import ImageError, mnist_digit, read_digit
from xpmlp.inspect import (
    class_probabilities,
    confident_mistakes,
    confusion_matrix,
    first_layer_images,
    hidden_layers,
    load_model,
    precision_recall,
)
from xpmlp.plots import CONFUSION_PNG, MISTAKES_PNG, WEIGHTS_PNG, write_confusion_grid

PLOTS = (CONFUSION_PNG, MISTAKES_PNG, WEIGHTS_PNG)


@pytest.fixture(scope="module")
def test_digits():
    """The real MNIST test images (uint8, 28x28) and labels."""
    d = real_mnist_dir()
    return (read_idx(next(d.glob(FILES["test_images"] + "*"))),
            read_idx(next(d.glob(FILES["test_labels"] + "*"))).astype(np.int64))


def assert_png(path, min_side=200, max_side=2500):
    """A valid PNG of sensible size that is not one flat colour."""
    assert path.is_file(), f"{path} missing"
    with Image.open(path) as img:
        assert img.format == "PNG", path
        w, h = img.size
        assert min_side <= w <= max_side and min_side <= h <= max_side, (path, img.size)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5, f"{path} is (nearly) blank"


# ---------------------------------------------------------------- the numbers

def test_confusion_matrix_counts_every_pair_and_precision_recall_follow():
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    predicted[:200] = labels[:200]  # some right answers
    predicted[labels == 3] = 5      # class 3 never predicted right, 3 never predicted at all...
    predicted[predicted == 3] = 4   # ...so its precision is undefined
    cm = confusion_matrix(labels, predicted)
    for t in range(10):
        for p in range(10):
            assert cm[t, p] == np.sum((labels == t) & (predicted == p))
    assert cm.sum() == 500
    precision, recall = precision_recall(cm)
    for d in range(10):
        if d == 3:
            assert np.isnan(precision[d]) and recall[d] == 0
            continue
        right = np.sum((labels == d) & (predicted == d))
        assert precision[d] == pytest.approx(right / np.sum(predicted == d))
        assert recall[d] == pytest.approx(right / np.sum(labels == d))


def test_confident_mistakes_are_wrong_and_most_confident_first():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(10), size=300)
    labels = rng.integers(0, 10, 300)
    labels[:100] = probs[:100].argmax(axis=1)  # a third right
    worst = confident_mistakes(probs, labels, count=20)
    predicted = probs.argmax(axis=1)
    assert len(worst) == 20 and np.all(predicted[worst] != labels[worst])
    confidence = probs[worst, predicted[worst]]
    assert np.all(np.diff(confidence) <= 0)
    others = np.setdiff1d(np.flatnonzero(predicted != labels), worst)
    assert probs[others, predicted[others]].max() <= confidence[-1]
    assert len(confident_mistakes(probs, labels, count=10_000)) == np.sum(predicted != labels)


def test_softmax_probabilities_are_the_softmax_of_the_logits():
    model = build_mlp((), None, "sce", backend="numpy", dtype="float64", init_std=0.5, ops="plain")
    x = np.random.default_rng(3).normal(size=(7, 784))
    logits = model.forward(x)
    want = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(model, x), want, rtol=1e-12)


@pytest.mark.parametrize("hidden, units", [((), 10), ((256, 128), 64), ((32,), 32)])
def test_first_layer_images_are_the_columns_of_the_first_weight_matrix(hidden, units):
    model = build_mlp(hidden, "relu", "sce", backend="numpy", seed=4)
    images = first_layer_images(model)
    assert hidden_layers(model) == len(hidden)
    W = model.layers[0].W
    assert images.shape == (units, 28, 28)
    for unit in (0, units - 1):
        np.testing.assert_array_equal(images[unit], W[:, unit].reshape(28, 28))


# ---------------------------------------------------------------- digits from files

def _roundtrip_cases(image):
    """The same MNIST digit as a user might hand it over: (name, PIL image)."""
    big = Image.fromarray(image).resize((280, 280), Image.Resampling.NEAREST)
    canvas = Image.new("L", (500, 400), 255)  # small, dark, off-centre on a light page
    canvas.paste(Image.fromarray(255 - image).resize((84, 84), Image.Resampling.NEAREST), (400, 20))
    transparent = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    transparent.putalpha(Image.fromarray(image))  # black ink whose opacity is the digit
    sixteen_bit = Image.fromarray((255 - image).astype(np.uint16) * 257)
    return {"as-is": Image.fromarray(image), "inverted": Image.fromarray(255 - image),
            "280x280": big, "corner-of-page": canvas, "transparent": transparent, "16-bit": sixteen_bit}


def test_mnist_digits_survive_being_written_out_and_read_back(tmp_path, test_digits):
    """MNIST's own digits go through the pipeline unchanged, within one grey level."""
    images, _ = test_digits
    for i in range(0, 10_000, 97):
        for name, img in _roundtrip_cases(images[i]).items():
            path = tmp_path / f"{i}-{name}.png"
            img.save(path)
            gray, digit = read_digit(path)
            diff = np.abs(digit.astype(int) - images[i].astype(int)).max()
            assert diff <= 1, f"test digit {i} {name}: differs by {diff} grey levels"


def test_a_faint_digit_is_stretched_to_full_contrast(test_digits):
    image = test_digits[0][5].astype(np.float32)
    faint = 255 - 0.4 * image  # light grey pencil on white
    assert np.abs(mnist_digit(faint).astype(int) - image.astype(int)).max() <= 2


def test_a_small_digit_is_scaled_up_to_twenty_pixels_and_centred():
    gray = np.full((60, 40), 255, np.float32)
    gray[10:18, 25:29] = 0  # an 8x4 bar far from the centre
    digit = mnist_digit(gray)
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20 and cols[-1] - cols[0] + 1 == 10
    mass = digit.astype(float)
    cy = (mass.sum(axis=1) @ np.arange(28)) / mass.sum()
    cx = (mass.sum(axis=0) @ np.arange(28)) / mass.sum()
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_unreadable_files_say_why(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image\n")
    Image.new("L", (30, 30), 255).save(tmp_path / "blank.png")
    for name, words in [("empty.png", "empty"), ("notes.png", "not an image"), ("blank.png", "blank"),
                        ("missing.png", "no such file")]:
        with pytest.raises(ImageError, match=words):
            read_digit(tmp_path / name)


# ---------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Quick runs made by the CLI: a report network and a custom one with two hidden layers."""
    cwd = tmp_path_factory.mktemp("inspect")
    for name, args in [("mlp0", [*FAST, "--epochs", "2"]),
                       ("custom", ["--hidden", "24,12", "--activation", "sigmoid", "--loss", "mse",
                                   "--batch-size", "600", "--lr", "0.5", "--epochs", "1", "--device", "cpu"])]:
        rc, out, err = xpmlp("train", *args, "--quiet", "--out", name, cwd=cwd)
        assert rc == 0, out + err
    return cwd


def _eval_plots(cwd, *args):
    rc, out, err = xpmlp("eval", *args, "--json", cwd=cwd)
    assert rc == 0, out + err
    return json.loads(out)


def _check_plots(result, cwd, plots_dir):
    assert [cwd / p for p in result["plots"]] == [plots_dir / name for name in PLOTS]
    for name in PLOTS:
        assert_png(plots_dir / name)
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 10_000
    assert np.trace(cm) / 10_000 == pytest.approx(result["test_acc"], abs=1e-6)
    per_class = result["per_class"]
    assert per_class["count"] == cm.sum(axis=1).tolist()
    with np.errstate(invalid="ignore"):  # a digit never predicted has no precision: null
        precision = np.diag(cm) / cm.sum(axis=0)
    np.testing.assert_allclose(per_class["recall"], np.diag(cm) / cm.sum(axis=1))
    np.testing.assert_allclose(np.array(per_class["precision"], dtype=float), precision)


def test_a_digit_never_predicted_reads_n_a_not_nan():
    from xpmlp.cli import _per_class_lines
    lines = _per_class_lines({"precision": [0.5, None], "recall": [1.0, 0.0], "count": [3, 2]})
    assert lines[2].split() == ["1", "n/a", "0.00%", "2"] and "nan" not in "\n".join(lines)
    assert lines[-1].startswith("(n/a: a digit the model never predicted has no precision")
    assert len(_per_class_lines({"precision": [0.5], "recall": [1.0], "count": [3]})) == 2  # no footnote


def test_eval_plots_into_the_run_directory(runs):
    run = runs / "mlp0"
    rc, out, err = xpmlp("eval", "mlp0", "--device", "cpu", "--plots", cwd=runs)
    assert rc == 0, out + err
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    result = _eval_plots(runs, "mlp0", "--device", "cpu", "--plots")
    _check_plots(result, runs, run)
    cm = np.array(result["confusion_matrix"])
    assert 100 * np.trace(cm) / 10_000 == pytest.approx(accuracy, abs=0.005)
    lines = out.splitlines()
    assert lines[1].split() == ["digit", "precision", "recall", "images"]
    for digit in range(10):
        fields = lines[2 + digit].split()
        assert int(fields[0]) == digit and int(fields[3]) == cm[digit].sum()
        assert float(fields[2].rstrip("%")) == pytest.approx(100 * cm[digit, digit] / cm[digit].sum(), abs=0.005)
    assert [line for line in lines if line.startswith("wrote ")] == [f"wrote mlp0/{n}" for n in PLOTS]


def test_eval_plots_of_a_custom_network_on_array_api_strict(runs):
    result = _eval_plots(runs, "custom", "--device", "array-api-strict", "--plots", "pictures")
    _check_plots(result, runs, runs / "pictures")
    # its first layer has 24 units, all shown; the CPU gives the same confusions
    cpu = _eval_plots(runs, "custom", "--device", "cpu", "--plots", "pictures-cpu")
    assert cpu["confusion_matrix"] == result["confusion_matrix"]


def test_eval_plots_of_a_run_made_on_a_gpu(runs):
    """A GPU run's directory differs only in its config (checkpoints hold host arrays):
    --device cpu evaluates it anywhere."""
    gpu_run = runs / "gpu-made"
    shutil.copytree(runs / "mlp0", gpu_run)
    config = json.loads((gpu_run / "config.json").read_text())
    config.update(device="cuda", device_used="cupy (cuda:0, NVIDIA H100 80GB HBM3)")
    (gpu_run / "config.json").write_text(json.dumps(config))
    result = _eval_plots(runs, "gpu-made", "--device", "cpu", "--plots")
    _check_plots(result, runs, gpu_run)


def test_predict_reads_mnist_digits_written_as_files_like_the_library_does(runs, test_digits, tmp_path):
    images, _ = test_digits
    picks = list(range(0, 10_000, 331))
    files = []
    for i in picks:
        cases = _roundtrip_cases(images[i])
        for name in ("as-is", "inverted", "280x280"):
            files.append(tmp_path / f"{i}-{name}.png")
            cases[name].save(files[-1])
    rc, out, err = xpmlp("predict", runs / "mlp0", *files, "--json", cwd=tmp_path)
    assert rc == 0, out + err
    got = json.loads(out)["predictions"]

    model = load_model(runs / "mlp0", "cpu")
    want = class_probabilities(model, to_inputs(images[picks]))
    assert [p["file"] for p in got] == list(map(str, files))
    for k, p in enumerate(got):
        probs = want[k // 3]
        assert p["digit"] == probs.argmax(), p["file"]
        assert [t["digit"] for t in p["top3"]] == list(np.argsort(-probs, kind="stable")[:3]), p["file"]
        assert p["top3"][0]["probability"] == pytest.approx(probs.max(), abs=0.02)

    rc, out, err = xpmlp("predict", runs / "mlp0", files[0], files[2], "--show", "seen", cwd=tmp_path)
    assert rc == 0, out + err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{files[0]}: {want[0].argmax()}  (")
    assert_png(tmp_path / "seen" / f"{files[0].stem}.seen.png")
    assert_png(tmp_path / "seen" / f"{files[2].stem}.seen.png")


def test_confusion_grid_of_several_runs(runs, tmp_path):
    path = write_confusion_grid([runs / "mlp0", runs / "custom"], tmp_path / "grid.png",
                                titles=["0-layer + SCE", "custom"], title="two networks",
                                data_dir=real_mnist_dir())
    assert_png(path)


# ---------------------------------------------------------------- mistakes

def test_bad_input(runs, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(read_idx(next(real_mnist_dir().glob(FILES["test_images"] + "*")))[0]).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (40, 40), 0).save(tmp_path / "blank.png")
    (tmp_path / "text.jpg").write_text("hello\n")
    (tmp_path / "norun").mkdir()
    (tmp_path / "afile").write_text("a file, not a directory\n")
    run = runs / "mlp0"
    cases = [
        (("predict", run, good, "missing.png"), ("missing.png", "no such file")),
        (("predict", run, good, "text.jpg"), ("text.jpg", "not an image")),
        (("predict", run, "empty.png"), ("empty.png", "empty")),
        (("predict", run, "blank.png"), ("blank.png", "blank")),
        (("predict", run, "norun"), ("norun", "directory")),
        (("predict", "norun", good), ("norun", "holds no run")),
        (("predict", run, good, "--show", "afile/seen"), ("--show", "cannot write")),
        (("eval", "norun", "--plots"), ("norun", "holds no run")),
        (("eval", run, "--plots", "afile/plots"), ("--plots", "cannot write")),
        (("data", "--dir", "afile"), ("afile",)),
    ]
    before = snapshot(tmp_path), snapshot(run)
    for args, needles in cases:
        assert_user_error(xpmlp(*args, "--device", "cpu", cwd=tmp_path) if args[0] != "data"
                          else xpmlp(*args, cwd=tmp_path), *needles)
    assert (snapshot(tmp_path), snapshot(run)) == before, "a mistake left files behind"
