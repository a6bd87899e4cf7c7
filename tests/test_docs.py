"""The README front page and the docs/ pages: links resolve, the front page stays short, its commands
are the tested ones, and the Hugging Face Space front matter still parses."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

# Every command line the README's code blocks may hold, each one run elsewhere on every CI run:
# `python app.py --tiny` by tests/test_app.py::test_readme_demo_command_serves_offline, `python -m pytest`
# by .ci/run (its last line), `pip install -r requirements-dev.txt` by .ci/run's install step. The venv
# line is Python's own `venv` module; .ci/run installs into the interpreter it is given instead.
README_COMMANDS = {
    "python3 -m venv .venv && . .venv/bin/activate",
    "pip install -r requirements-dev.txt",
    "python app.py --tiny",
    "python -m pytest",
}
MAX_README_BODY_LINES = 100

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def front_matter_and_body(text: str) -> tuple[str, str]:
    assert text.startswith("---\n"), "README.md must start with the Space's YAML front matter"
    _, matter, body = text.split("---\n", 2)
    return matter, body


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (and outside the README's front matter)."""
    if text.startswith("---\n"):
        text = front_matter_and_body(text)[1]
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def code_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, every character that is not a
    letter, mark, digit, connector (`_`), space or `-` dropped, spaces turned into `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading renders as its text
    kept = "".join(c for c in text.lower()
                   if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, repeated headings suffixed -1, -2, … as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if match := HEADING.match(line):
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    links = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # text in inline code is never a link
        links += [target for target in LINK.findall(line) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]
    return links


def test_slug_rule_matches_github():
    assert github_slug("Try the demo") == "try-the-demo"
    assert github_slug("Memory plan before a run (`--plan`, `training/plan.py`)") == \
        "memory-plan-before-a-run---plan-trainingplanpy"
    assert github_slug("The authors' own model: Qwen-VL-Chat + CLoT-cn, natively") == \
        "the-authors-own-model-qwen-vl-chat--clot-cn-natively"
    assert github_slug("Évaluation 評価 snake_case") == "évaluation-評価-snake_case"


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n## Setup\n\n```bash\n# Setup\n```\n\n## Setup\n\n## Setup\n", encoding="utf-8")
    assert anchors(page) == {"notes", "setup", "setup-1", "setup-2"}  # the comment in the code block is no heading


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_front_page_is_short():
    _, body = front_matter_and_body(README.read_text(encoding="utf-8"))
    assert len(body.strip("\n").splitlines()) <= MAX_README_BODY_LINES


def test_readme_commands_are_the_tested_ones():
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    commands = [line.split("  #")[0].strip() for block in blocks for line in block if line.strip()]
    assert "python app.py --tiny" in commands and "python -m pytest" in commands
    assert set(commands) <= README_COMMANDS, f"untested commands in README.md: {set(commands) - README_COMMANDS}"


def test_every_docs_page_is_linked_from_the_front_page_and_the_index():
    pages = {page.name for page in DOCS.glob("*.md")} - {"README.md"}
    from_readme = {Path(link.partition("#")[0]).name for link in relative_links(README) if link.startswith("docs/")}
    from_index = {Path(link.partition("#")[0]).name for link in relative_links(DOCS / "README.md")}
    assert pages <= from_readme and pages <= from_index


def test_space_front_matter_parses_with_its_keys():
    matter, _ = front_matter_and_body(README.read_text(encoding="utf-8"))
    card = yaml.safe_load(matter)
    assert card["license"] == "mit" and card["app_file"] == "app.py" and (ROOT / card["app_file"]).is_file()
    assert card["models"] and card["datasets"] and card["preload_from_hub"]
    assert set(card["preload_from_hub"]) <= set(card["models"])
    assert card["suggested_hardware"]
