"""The results README promises files under experiments/results/: git must not ignore them.

An unanchored `runs/` rule in .gitignore once swallowed every per-run record while the
README said they were committed; this test names the rule if that happens again."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def promised_paths():
    """The record files the results README names in backticks (`runs/<name>/curve.npy`, ...),
    with <name> replaced by each committed run's name, and the other files it names that
    are there (`tables.md`, figures)."""
    text = (RESULTS / "README.md").read_text()
    names = sorted(p.name for p in (RESULTS / "runs").iterdir() if p.is_dir())
    paths = set()
    for token in re.findall(r"`([\w./<>{}-]+\.(?:json|jsonl|npy|md|png))`", text):
        if not (token.startswith("runs/<name>/") or (RESULTS / token).is_file()):
            continue    # a file named only to say it is not kept, or another folder's
        for name in (names if "<name>" in token else [None]):
            paths.add(token.replace("<name>", name) if name else token)
    return sorted(paths)


def test_the_results_readme_promises_records():
    paths = promised_paths()
    for name in ("config.json", "summary.json", "epochs.jsonl", "curve.npy"):
        assert any(p.endswith("/" + name) for p in paths), name
    assert "tables.md" in paths


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="needs a git checkout (CI runs on one)")
def test_no_promised_result_file_is_git_ignored():
    paths = [str(Path("experiments/results") / p) for p in promised_paths()]
    assert paths
    check = subprocess.run(["git", "check-ignore", "-v", "--no-index", *paths], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 1, f"git ignores promised result files:\n{check.stdout}"
    # and a new run's record would not be ignored either
    fresh = "experiments/results/runs/some-new-run/summary.json"
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", fresh], cwd=REPO).returncode == 1


def test_every_committed_record_is_complete():
    for run in sorted((RESULTS / "runs").iterdir()):
        have = {p.name for p in run.iterdir()}
        assert {"config.json", "summary.json", "epochs.jsonl"} <= have, run.name
        assert not {n for n in have if n.endswith(".npz") or n == "metrics.jsonl"}, run.name


def test_results_stay_small():
    total = sum(p.stat().st_size for p in RESULTS.rglob("*") if p.is_file())
    assert total < 15 * 2**20, f"experiments/results is {total / 2**20:.1f} MiB"
