"""The training loop's bookkeeping, checked against numbers computed here independently:
a wrong number there goes straight into the report's tables.

Each test names the mistake it is there to catch (a mutation of the library that the
rest of the suite let through).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from xpmlp import build_model, get_backend
from xpmlp.config import TrainConfig
from xpmlp.data import Mnist
from xpmlp.rundir import load_checkpoint
from xpmlp.training.train import Trainer, evaluate

TRAIN_N, TEST_N, BATCH = 1000, 2500, 100  # 2,500 test rows: chunks of 1,000 leave a partial one


@pytest.fixture(scope="module")
def data():
    """Learnable synthetic data whose train and test sets differ (another teacher noise)."""
    rng = np.random.default_rng(7)
    teacher = rng.standard_normal((784, 10))
    x = (rng.standard_normal((TRAIN_N + TEST_N, 784)) * 0.3).astype(np.float32)
    y = np.argmax(x @ teacher + rng.standard_normal((TRAIN_N + TEST_N, 10)), axis=1).astype(np.int64)
    return Mnist(x[:TRAIN_N], y[:TRAIN_N], x[TRAIN_N:], y[TRAIN_N:])


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """Three epochs of mlp1-relu-sce, every iteration logged, the test set evaluated each epoch."""
    run_dir = tmp_path_factory.mktemp("bookkeeping") / "run"
    run_dir.mkdir()
    cfg = TrainConfig(model="mlp1-relu-sce", epochs=3, batch_size=BATCH, lr=0.05, device="numpy").validate()
    t = Trainer(cfg, run_dir, data, progress=False, log=lambda line: None)
    t.write_config()
    t.run()
    return run_dir, cfg


def test_each_epochs_train_metrics_are_the_mean_of_its_own_iterations(run):
    """Catches: an epoch's train_acc divided by the cumulative iteration count."""
    run_dir, cfg = run
    recs = records(run_dir)
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    for e in epochs:
        its = [r for r in recs if r["kind"] == "iter" and r["epoch"] == e["epoch"]]
        assert len(its) == TRAIN_N // BATCH
        assert e["train_acc"] == pytest.approx(np.mean([r["acc"] for r in its]), rel=1e-6)
        assert e["train_loss"] == pytest.approx(np.mean([r["loss"] for r in its]), rel=1e-6)


def softmax_cross_entropy(logits, labels):
    """Mean loss and accuracy in float64, written here without the library's loss code."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    return float(-log_p[rows, labels].mean()), float((logits.argmax(axis=1) == labels).mean())


def forward_from_checkpoint(run_dir, x):
    """mlp1-relu-sce's logits from the checkpoint's weights, in float64 NumPy."""
    (W1, b1, W2, b2), *_ = load_checkpoint(run_dir)
    h = np.maximum(x.astype(np.float64) @ W1.astype(np.float64) + b1, 0)
    return h @ W2.astype(np.float64) + b2


def test_final_test_metrics_recomputed_from_the_checkpoint(run, data):
    """Catches: the end-of-epoch test metrics computed on the training set (or any set but
    the test set), by recomputing them from the final weights, independently of the library."""
    run_dir, _ = run
    last = [r for r in records(run_dir) if r["kind"] == "epoch"][-1]
    loss, acc = softmax_cross_entropy(forward_from_checkpoint(run_dir, data.test_x), data.test_y)
    assert last["test_acc"] == pytest.approx(acc, abs=0.5 / TEST_N)  # float32 vs float64: a row may flip
    assert last["test_loss"] == pytest.approx(loss, rel=1e-4)
    train_loss, _ = softmax_cross_entropy(forward_from_checkpoint(run_dir, data.train_x), data.train_y)
    assert abs(train_loss - loss) > 1e-3, "train and test sets must tell apart for this test to mean anything"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["test_loss"], summary["test_acc"]) == (last["test_loss"], last["test_acc"])


@pytest.mark.parametrize("chunk", [1000, 700, 2500, 3000])
def test_evaluate_weights_each_chunk_by_its_rows(data, chunk):
    """Catches: evaluate() weighting its last, partial chunk by the chunk size instead of its
    row count (2,500 rows in chunks of 1,000 or 700 end in a partial chunk)."""
    be = get_backend("numpy")
    model = build_model("mlp1-relu-sce", backend=be, dtype="float64", init_std=0.1, seed=3)
    x, y = data.test_x.astype(np.float64), data.test_y
    W1, b1, W2, b2 = model.state_arrays()
    want_loss, want_acc = softmax_cross_entropy(np.maximum(x @ W1 + b1, 0) @ W2 + b2, y)
    loss, acc = evaluate(model, be.asarray(x), be.asarray(y), chunk=chunk)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert acc == pytest.approx(want_acc, abs=1e-12)
    assert 0.05 < want_acc < 0.95, "a trivial accuracy would hide a mis-weighted chunk"


@pytest.mark.parametrize("init_std", [0.01, 0.1])
def test_initial_weights_have_the_asked_standard_deviation(init_std):
    """N(0, init_std^2) weights and zero biases, checked on the weights themselves."""
    model = build_model("mlp2-relu-sce", backend="numpy", dtype="float64", init_std=init_std, seed=5)
    params = model.state_arrays()
    for W, b in zip(params[0::2], params[1::2]):
        # 784x256 and 256x128 weights: the sample std is within 1% of the true one with
        # overwhelming probability; 256x10 (2,560 weights) within 5%.
        tol = 0.01 if W.size > 10_000 else 0.05
        assert np.std(W) == pytest.approx(init_std, rel=tol), W.shape
        assert abs(np.mean(W)) < 5 * init_std / np.sqrt(W.size), W.shape
        assert not np.any(b), "biases start at zero"
    # another seed, other weights; the same seed, the same weights
    again = build_model("mlp2-relu-sce", backend="numpy", dtype="float64", init_std=init_std, seed=5)
    other = build_model("mlp2-relu-sce", backend="numpy", dtype="float64", init_std=init_std, seed=6)
    np.testing.assert_array_equal(again.state_arrays()[0], params[0])
    assert not np.array_equal(other.state_arrays()[0], params[0])
