"""The layering rule: xpmlp/ and backends/ never read anything under experiments/."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_library_never_reaches_up_into_experiments():
    offenders = []
    for path in sorted([*(REPO / "xpmlp").rglob("*.py"), *(REPO / "backends").rglob("*.py")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            # a path built to experiments/: `ROOT / "experiments"`, `open("experiments/...")`,
            # `Path(__file__).parents[1]` (help texts that merely name the folder are fine)
            if (re.search(r"""/\s*["']experiments|(open|Path|load\w*)\(\s*["'][^"']*experiments""", code)
                    or re.search(r"parents\[\d\]", code)):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_no_run_directory_is_committed_outside_the_results():
    """Run files belong under experiments/results/runs (light records) or a test's tmp_path;
    one a test once left at the repository root was committed with the code."""
    import subprocess
    run_files = {"config.json", "metrics.jsonl", "summary.json", "checkpoint.npz", "stack.json", ".lock",
                 "stack-checkpoint.npz", "epochs.jsonl"}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    if not tracked:  # not a git checkout (an unpacked sdist): nothing to check
        return
    stray = [p for p in tracked if Path(p).name in run_files and not p.startswith("experiments/results/runs/")
             and not p.startswith("tests/fixtures/")]
    assert stray == []
