"""Cutting sections into chunks of at most ``size`` embedding tokens, overlapping by ``overlap`` tokens.

Chunks follow word boundaries, and paragraph boundaries where they can: a chunk ends at the last paragraph break
that keeps it at least half full, else at the last word that fits. Each chunk carries its section's heading path,
which is embedded with it (so "Install" under "Guide > Linux" is found by a question about Linux) and shown
with it when it is cited.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .documents import Section

_WORD = re.compile(r"\S+|\n\s*\n")  # words, and blank-line paragraph breaks as tokens of their own


@dataclass
class Chunk:
    """A piece of a document: its heading path, its text, and the text that is embedded."""

    headings: tuple[str, ...]
    body: str

    @property
    def embedded(self) -> str:
        return (" > ".join(self.headings) + "\n" if self.headings else "") + self.body


def chunk_sections(sections: Sequence[Section], count: Callable[[list[str]], list[int]], *, size: int,
                   overlap: int) -> list[Chunk]:
    """Chunks of ``sections``. ``count(texts)``: the embedding tokenizer's token count of each text."""
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap {overlap} must be >= 0 and smaller than the chunk size {size}")
    chunks: list[Chunk] = []
    for section in sections:
        heading = " > ".join(section.headings)
        room = size - (count([heading])[0] + 1 if heading else 0)
        if room < max(8, 2 * overlap // 3):
            # Headings that fill the chunk: keep only the innermost, so the text still has room.
            section = Section(section.headings[-1:], section.text)
            heading = section.headings[0] if section.headings else ""
            room = size - (count([heading])[0] + 1 if heading else 0)
        words = _WORD.findall(section.text)
        if not words:
            continue
        breaks = [w.strip() == "" for w in words]
        costs = [0 if b else c for b, c in zip(breaks, count([w if b else " " + w for w, b in zip(words, breaks)]))]
        start = 0
        while start < len(words):
            end, used, last_break = start, 0, None
            while end < len(words) and used + costs[end] <= room:
                used += costs[end]
                if breaks[end] and used >= room // 2:
                    last_break = end
                end += 1
            if end == start:  # one "word" longer than a chunk (a URL, a blob): alone; the embedder cuts it
                end = start + 1
            elif end < len(words) and last_break is not None:
                end = last_break
            body = _join(words[start:end])
            if body:
                chunks.append(Chunk(section.headings, body))
            if end >= len(words):
                break
            # Step back by about ``overlap`` tokens, never to or before this chunk's start.
            back, nxt = 0, end
            while nxt - 1 > start and back + costs[nxt - 1] <= overlap:
                nxt -= 1
                back += costs[nxt]
            start = nxt
    return chunks


def _join(words: list[str]) -> str:
    out: list[str] = []
    for word in words:
        if word.strip() == "":
            if out and out[-1] != "\n\n":
                out.append("\n\n")
        else:
            if out and out[-1] != "\n\n":
                out.append(" ")
            out.append(word)
    return "".join(out).strip()
