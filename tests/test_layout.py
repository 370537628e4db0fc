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
