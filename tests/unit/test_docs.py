"""The documentation holds together: the README stays short and names the two
set-up commands, and every relative link in the README and the guides under
docs/ reaches a file that exists and, with an anchor, a heading in it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`+[^`]*`+")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lowercase; every character that is
    not a letter, digit, space, hyphen or underscore dropped; spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated one gets -1, -2, ..."""
    seen: Counter[str] = Counter()
    out = set()
    for line in _prose(path.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        out.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return out


def links(path: Path) -> list[str]:
    """The targets of the markdown links in ``path``'s prose."""
    prose = "\n".join(_prose(path.read_text()))
    # a code span's brackets are not links; a link's text may hold code
    prose = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), prose)
    return LINK.findall(prose)


def test_slug_follows_githubs_rules() -> None:
    assert slug("What DP costs (measured)") == "what-dp-costs-measured"
    assert (
        slug("Settings (`[tool.flwr.app.config]`, overridable with `--run-config`)")
        == "settings-toolflwrappconfig-overridable-with---run-config"
    )
    assert slug("3.1 DP on the heads") == "31-dp-on-the-heads"
    assert slug("nnU-Net's feature_cache") == "nnu-nets-feature_cache"


def test_repeated_headings_get_numbered(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A\n\n## Notes\n\n```\n# Notes\n```\n\n## Notes\n\n### Notes\n")
    assert anchors(page) == {"a", "notes", "notes-1", "notes-2"}


def test_the_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200"


def test_the_readme_names_the_two_set_up_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    # the first command block is the set-up: exactly those two commands
    block = re.search(r"```[^\n]*\n(.*?)```", text, re.S)
    assert block is not None
    commands = [
        line.split("#")[0].strip()
        for line in block.group(1).splitlines()
        if line.split("#")[0].strip()
    ]
    assert commands == ["make demo", "make test"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
