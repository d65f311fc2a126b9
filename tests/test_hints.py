"""Every hint to the documentation in a message or docstring, "(README: Section)" or
"(docs/name.md: Section)", names a section that exists."""

from __future__ import annotations

import re

from conftest import REPO

HINT = re.compile(r"\((README|docs/[\w.-]+\.md): ([^)]+?)\)")


def headings(path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return {m.group(1).strip() for m in re.finditer(r"(?m)^#+ (.+)$", text)}


def test_every_documentation_hint_names_an_existing_section():
    hints = []
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "workflow").rglob("*.py")]:
        for match in HINT.finditer(path.read_text(encoding="utf-8")):
            hints.append((path, match.group(1), match.group(2)))
    assert len(hints) >= 3
    broken = []
    for path, document, section in hints:
        file = REPO / ("README.md" if document == "README" else document)
        if not file.is_file() or section not in headings(file):
            broken.append(f"{path.relative_to(REPO)}: ({document}: {section})")
    assert broken == []
