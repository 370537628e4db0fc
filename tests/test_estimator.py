"""xpmlp.MLPClassifier: scikit-learn's own estimator checks, load_digits as the docs show it,
NumPy in and out, partial_fit, pickling."""
import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import xpmlp  # noqa: E402

# The checks that fail, each with why (passed to parametrize_with_checks, which marks them xfail).
EXPECTED_FAILURES = {}


@parametrize_with_checks([xpmlp.MLPClassifier()],
                         expected_failed_checks=lambda est: EXPECTED_FAILURES)
def test_sklearn_checks(estimator, check):
    check(estimator)


def test_load_digits_as_the_docs_show_it():
    # The lines of docs/own-data.md, as they are there.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, test_size=0.25, random_state=0)
    clf = xpmlp.MLPClassifier(hidden=(256, 128), epochs=50, device="cpu").fit(X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.95


def _blobs(n=120, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    return rng.normal(size=(n, 5)) + 3 * np.eye(3, 5)[y], np.array(["ant", "bee", "cat"])[y]


def test_numpy_in_and_out_with_any_labels():
    import numpy as np
    X, y = _blobs()
    clf = xpmlp.MLPClassifier(epochs=10).fit(X.tolist(), list(y))  # lists are arrays too
    proba, pred = clf.predict_proba(X), clf.predict(X)
    assert type(proba) is np.ndarray and proba.shape == (120, 3) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-6)
    assert type(pred) is np.ndarray and set(pred) <= {"ant", "bee", "cat"}
    assert clf.score(X, y) > 0.9 and len(clf.loss_curve_) == clf.n_iter_ == 10


def test_partial_fit_is_fit_an_epoch_at_a_time():
    """Both run the same loop: k calls of partial_fit train exactly what fit with epochs=k does."""
    import numpy as np
    X, y = _blobs()
    whole = xpmlp.MLPClassifier(epochs=4).fit(X, y)
    parts = xpmlp.MLPClassifier(epochs=4)
    parts.partial_fit(X, y, classes=["ant", "bee", "cat"])
    for _ in range(3):
        parts.partial_fit(X, y)
    assert parts.n_iter_ == 4 and parts.loss_curve_ == whole.loss_curve_
    np.testing.assert_array_equal(parts.predict_proba(X), whole.predict_proba(X))
    with pytest.raises(ValueError, match="differ from the first call"):
        parts.partial_fit(X, y, classes=["ant", "bee"])


def test_pickled_estimator_predicts_and_trains_on_as_before():
    import pickle

    import numpy as np
    X, y = _blobs()
    clf = xpmlp.MLPClassifier(epochs=2).fit(X, y)
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    clf.partial_fit(X, y)
    copy.partial_fit(X, y)  # the momenta and the shuffle went with it
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))


def test_bad_settings_are_value_errors():
    X, y = _blobs()
    for bad in (dict(activation="tanh"), dict(lr=-1.0), dict(hidden=(0,)), dict(device="tpu")):
        with pytest.raises(Exception, match="MLPClassifier|device"):
            xpmlp.MLPClassifier(**bad).fit(X, y)


@pytest.mark.gpu
def test_on_the_gpu_numpy_in_and_out():
    import numpy as np
    X, y = _blobs()
    try:
        clf = xpmlp.MLPClassifier(epochs=10, device="cuda").fit(X, y)
    except xpmlp.BackendUnavailable as exc:
        pytest.skip(str(exc))
    cpu = xpmlp.MLPClassifier(epochs=10, device="cpu").fit(X, y)
    proba = clf.predict_proba(X)
    assert type(proba) is np.ndarray and type(clf.predict(X)) is np.ndarray
    np.testing.assert_allclose(proba, cpu.predict_proba(X), atol=1e-4)
