"""xpmlp.MLPClassifier: scikit-learn's own estimator checks, load_digits as the docs show it,
NumPy in and out, partial_fit, pickling."""
import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import xpmlp  # noqa: E402

# The checks that fail, each with why (passed to parametrize_with_checks, which marks them xfail).
EXPECTED_FAILURES = {}


@parametrize_with_checks([xpmlp.MLPClassifier(epochs=20)],
                         expected_failed_checks=lambda est: EXPECTED_FAILURES)
def test_sklearn_checks(estimator, check):
    check(estimator)
