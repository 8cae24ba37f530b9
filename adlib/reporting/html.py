"""Small Markdown and HTML renderers for the reports (no template engine needed)."""
from __future__ import annotations

import base64
import html as _html
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, missing values as 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(frame: pd.DataFrame, columns: Iterable[str] | None = None, digits: int = 4) -> str:
    """A GitHub-style pipe table of ``frame`` (selected ``columns``)."""
    columns = list(columns) if columns is not None else list(frame.columns)
    if frame.empty:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt(row[c], digits).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def markdown_to_html(text: str) -> str:
    """Render the subset of Markdown the reports write: headings, paragraphs, bullets, pipe tables,
    inline code, bold and images."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", lines[i].strip())[1:-1]])
                i += 1
            body = [r for r in rows[1:] if not all(set(c) <= {"-", ":"} for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
        elif line.lstrip().startswith(("- ", "* ")):
            items = []
            while i < len(lines) and lines[i].lstrip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "* ")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def demote_headings(text: str, levels: int = 1) -> str:
    """Markdown with every heading ``levels`` deeper (to embed one report in another)."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", text, flags=re.M)


def _inline(text: str) -> str:
    text = _html.escape(text, quote=False)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![\w*])_([^_]+)_(?![\w*])", r"<em>\1</em>", text)


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1600px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.8em;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:2px 5px;text-align:right}th{background:#eee;white-space:normal;max-width:7em}
td:first-child,th:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4}"""


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page."""
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def markdown_to_html_embedded(text: str, base_dir: str | os.PathLike) -> str:
    """Like :func:`markdown_to_html`, with ``![alt](file.png)`` images (relative to ``base_dir``)
    embedded in the page."""
    html = markdown_to_html(text)

    def embed(match: re.Match) -> str:
        path = Path(base_dir) / match.group(2)
        return embed_png(path, match.group(1)) if path.is_file() else match.group(0)

    return re.sub(r'<img alt="([^"]*)" src="([^":]+\.png)">', embed, html)


def embed_png(path: str | os.PathLike, alt: str = "") -> str:
    """An <img> tag carrying the PNG itself (the page stays readable when moved)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_html.escape(alt)}" src="data:image/png;base64,{data}">'
