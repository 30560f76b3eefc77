"""Reading the user's files into sections of plain text, each under its heading path.

Text (.txt), Markdown (.md, .markdown), reStructuredText (.rst), HTML (.html, .htm; BeautifulSoup) and PDF
(.pdf; pypdf, one section per page). Headings are kept as context for the chunks below them ("Guide > Install").
A file that cannot be read is a ``DocumentError`` naming it; the indexer reports it and goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import Llama3Error

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


class DocumentError(Llama3Error):
    """A file that cannot be read as a document."""


@dataclass
class Section:
    """Text under one heading path (outermost first; empty before the first heading)."""

    headings: tuple[str, ...]
    text: str


def _markdown(text: str) -> list[Section]:
    sections, path, lines = [], [], []
    in_fence = False

    def close() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(tuple(h for _, h in path), body))
        lines.clear()

    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        match = None if in_fence else _MD_HEADING.match(line)
        if match is None:
            lines.append(line)
            continue
        close()
        level = len(match.group(1))
        path = [(lv, h) for lv, h in path if lv < level] + [(level, match.group(2))]
    close()
    return sections


def _html(raw: bytes) -> list[Section]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(raw, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = soup.body or soup
    sections, path, parts = [], [(0, title)] if title else [], []

    def close() -> None:
        text = "\n".join(p for p in parts if p).strip()
        if text:
            sections.append(Section(tuple(h for _, h in path if h), text))
        parts.clear()

    for element in body.find_all(["h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "td", "th", "dt", "dd",
                                  "blockquote"]):
        if element.find_parent(["p", "li", "pre", "td", "th", "dd", "blockquote"]) is not None:
            continue  # its text is part of the enclosing block's
        text = element.get_text(" ", strip=True) if element.name != "pre" else element.get_text()
        if element.name.startswith("h") and len(element.name) == 2:
            close()
            level = int(element.name[1])
            path = [(lv, h) for lv, h in path if lv < level] + [(level, text)]
        else:
            parts.append(text)
    close()
    return sections


def _pdf(path: Path) -> list[Section]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    sections = []
    for number, page in enumerate(reader.pages, 1):
        text = (page.extract_text() or "").strip()
        if text:
            sections.append(Section((f"page {number}",), text))
    return sections


def read_document(path: Path) -> list[Section]:
    """The sections of ``path`` (by its suffix); ``DocumentError`` for unreadable or unsupported files."""
    suffix = path.suffix.lower()
    try:
        if suffix in PDF_SUFFIXES:
            return _pdf(path)
        raw = path.read_bytes()
        if suffix in HTML_SUFFIXES:
            return _html(raw)
        if suffix in TEXT_SUFFIXES:
            text = raw.decode("utf-8", errors="replace")
            return _markdown(text) if suffix in (".md", ".markdown") else [Section((), text.strip())] if text.strip() else []
    except OSError as exc:
        raise DocumentError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged PDF or HTML: name the file, whatever the parser raised
        raise DocumentError(f"cannot read {path} as {suffix[1:].upper()}: {type(exc).__name__}: {exc}") from None
    raise DocumentError(f"{path}: unsupported file type {suffix or '(none)'} (supported: {', '.join(sorted(SUFFIXES))})")
