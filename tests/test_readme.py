"""The README's Quickstart is what users paste: CI must run exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_second_verbatim():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert "run.py" in commands[0] and commands[1].endswith("pytest")
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "cd "))]
    assert ci_commands == [commands[1]]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", outside_code(path.read_text()), re.M)}


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_local_link_in_readme_and_docs_resolves():
    assert broken_links([ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]) == []


def test_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    assert slug("GenSLM's numbers") == "genslms-numbers"
    assert slug("CSX: weight streaming at scale") == "csx-weight-streaming-at-scale"
    (tmp_path / "a.md").write_text("# Top\n```\n# not a heading\n```\n[ok](#top) [x](b.md) [y](a.md#not-a-heading)"
                                   " [web](https://example.org/none)\n")
    assert broken_links([tmp_path / "a.md"]) == ["a.md: b.md (no such file)", "a.md: a.md#not-a-heading (no such heading)"]
