"""The README and docs/ hold together: every relative link reaches an existing file (and,
with ``#anchor``, an existing heading of it, slugged as GitHub slugs them), the README stays
short, and it still names the command CI runs."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text):
    """Each line outside fenced code blocks with its inline code spans removed (the
    others empty, so line numbers stay)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return lines


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower().replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file, repeated ones numbered as GitHub numbers them."""
    seen, found = {}, set()
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    for line in lines:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path):
    for number, line in enumerate(prose(path.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            yield number, target


def test_slugs_follow_github():
    assert slug("Many models at once: `--seeds` and `sweep --stack`") == "many-models-at-once---seeds-and-sweep---stack"
    assert slug("2026-12-04: `--device torch:cpu` against `--device cpu`") == "2026-12-04---device-torchcpu-against---device-cpu"
    assert slug("Measured on this project's machine (2026-11-28)") == "measured-on-this-projects-machine-2026-11-28"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_heading(doc):
    broken = []
    for number, target in links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{number}: {target} (no heading #{anchor} in {dest.relative_to(REPO)})")
    assert not broken, f"{doc.relative_to(REPO)}:\n" + "\n".join(broken)


def test_every_doc_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for _, target in links(REPO / "README.md")}
    unlinked = [str(doc.relative_to(REPO)) for doc in DOCS[1:] if doc.resolve() not in linked]
    assert not unlinked, f"docs the README does not link: {unlinked}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the detail goes into docs/"


def test_readme_names_the_command_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("make ")]
    assert commands == ["make test"], commands
    assert "make test" in (REPO / "README.md").read_text(encoding="utf-8")
