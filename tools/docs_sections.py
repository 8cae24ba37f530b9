"""Rewrite the "Sections:" line of docs/models.md from its level-2 headings (run after adding a model)."""
import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.lower())
    return text.replace(" ", "-")


def main() -> int:
    text = DOC.read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    links = " · ".join(f"[{h.split(' (')[0]}](#{anchor(h)})" for h in headings)
    line = f"Sections: {links}"
    text = re.sub(r"^(Sections: .*|SECTIONS-PLACEHOLDER)$", line, text, count=1, flags=re.M)
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
