"""The BLAS thread policy of train, sweep and bench (xpmlp/threads.py)."""
import os

import pytest
from test_cli import assert_user_error, xpmlp
from threadpoolctl import threadpool_info

from xpmlp.training.threads import (
    DEFAULT_THREADS,
    blas_threads,
    limit_blas_threads,
    step_threads,
)


def _blas_threads_now():
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_one_blas_thread_by_default_unless_asked(monkeypatch):
    monkeypatch.delenv("XPMLP_THREADS", raising=False)
    assert blas_threads() == DEFAULT_THREADS == 1
    assert blas_threads(3) == 3
    monkeypatch.setenv("XPMLP_THREADS", "2")
    assert blas_threads() == 2 and blas_threads(1) == 1


def test_the_compiled_step_takes_a_thread_a_free_core_unless_asked(monkeypatch):
    monkeypatch.delenv("XPMLP_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert step_threads() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # e.g. bench --pin
    assert step_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert step_threads() == 2 and step_threads(1) == 1 and step_threads(4) == 4
    monkeypatch.setenv("XPMLP_THREADS", "1")  # e.g. each run of a sweep of two jobs on two cores
    assert step_threads() == 1


def test_the_limit_holds_numpys_blas_inside_the_block_only(monkeypatch):
    monkeypatch.delenv("XPMLP_THREADS", raising=False)
    before = _blas_threads_now()
    with limit_blas_threads():
        assert _blas_threads_now() == {1}
    assert _blas_threads_now() == before


@pytest.mark.parametrize("value", ["0", "two", "-1", ""])
def test_a_bad_xpmlp_threads_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, value):
    monkeypatch.setenv("XPMLP_THREADS", value)
    result = xpmlp("train", "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_user_error(result, "XPMLP_THREADS")
    assert not (tmp_path / "run").exists()
