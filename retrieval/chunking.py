"""Token-based chunking that keeps paragraphs and sentences whole where it can.

Counts are in tokens of the embedder's own tokenizer, so a chunk never exceeds what the model
reads. Every chunk records its document, its position within it and its character span
`[start, end)` in `Document.text`: `doc.text[start:end] == chunk.text`, which is what a citation
points back to. PDF pages are hard boundaries, so every chunk lies on one page.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ConfigError
from .loaders import Document

# A tokenizer as chunking sees it: text -> character spans `(start, end)` of its tokens.
TokenSpans = Callable[[str], Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut into chunks.

    chunk_tokens: the most tokens of the embedder's tokenizer in one chunk (special tokens
        excluded); must fit the embedder's input.
    overlap_tokens: up to this many tokens of whole trailing sentences of a chunk are repeated
        at the start of the next one, so a passage cut at a boundary is still found whole.
    min_fill: when a chunk is at least this full, it ends at the last paragraph break rather
        than in the middle of a paragraph.
    """

    chunk_tokens: int = 240
    overlap_tokens: int = 40
    min_fill: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 8:
            problems.append(f"chunk_tokens must be an integer >= 8, got {self.chunk_tokens!r}")
        if not isinstance(self.overlap_tokens, int) or self.overlap_tokens < 0:
            problems.append(f"overlap_tokens must be an integer >= 0, got {self.overlap_tokens!r}")
        elif isinstance(self.chunk_tokens, int) and self.overlap_tokens >= self.chunk_tokens // 2:
            problems.append(
                f"overlap_tokens ({self.overlap_tokens}) must be under half of chunk_tokens ({self.chunk_tokens})"
            )
        if not 0.0 <= float(self.min_fill) <= 1.0:
            problems.append(f"min_fill must lie in [0, 1], got {self.min_fill!r}")
        if problems:
            raise ConfigError("invalid chunking settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"chunk_tokens": self.chunk_tokens, "overlap_tokens": self.overlap_tokens, "min_fill": self.min_fill}


@dataclass
class Chunk:
    """A passage of one document. `page` is the 1-based PDF page, else None."""

    doc_id: str
    position: int
    start: int
    end: int
    text: str
    n_tokens: int
    page: int | None = None


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int
    para_start: bool


_PARA_SPLIT = re.compile(r"\n[ \t]*\n\s*")
# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before whitespace.
_SENT_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")


def _spans(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Split `text[start:end]` at `pattern`, returning stripped non-empty spans."""
    out = []
    pos = start
    for m in pattern.finditer(text, start, end):
        cut = m.end() if pattern is _SENT_END else m.start()
        out.append((pos, cut))
        pos = m.end()
    out.append((pos, end))
    result = []
    for a, b in out:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            result.append((a, b))
    return result


def chunk_document(doc: Document, token_spans: TokenSpans, config: ChunkingConfig) -> list[Chunk]:
    """Cut one document into chunks (see the module docstring for the guarantees)."""
    text = doc.text
    spans = list(token_spans(text))
    starts = [s for s, _ in spans]

    def count(a: int, b: int) -> int:
        return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

    sections = [(p, a, b) for p, a, b in doc.pages] if doc.pages else [(None, 0, len(text))]
    chunks: list[Chunk] = []
    for page, s_start, s_end in sections:
        units: list[_Unit] = []
        for pa, pb in _spans(text, s_start, s_end, _PARA_SPLIT):
            first = True
            for sa, sb in _spans(text, pa, pb, _SENT_END):
                n = count(sa, sb)
                if n <= config.chunk_tokens:
                    units.append(_Unit(sa, sb, n, first))
                else:
                    units.extend(_split_long(sa, sb, spans, starts, config, first))
                first = False
        for a, b, n in _pack(units, config):
            chunks.append(Chunk(doc.doc_id, len(chunks), a, b, text[a:b], n, page))
    return chunks


def _split_long(a: int, b: int, spans, starts, config: ChunkingConfig, para_start: bool) -> list[_Unit]:
    """Cut a sentence longer than a chunk into token windows with overlap."""
    i0 = bisect.bisect_left(starts, a)
    i1 = bisect.bisect_left(starts, b)
    size = config.chunk_tokens
    step = max(1, size - config.overlap_tokens)
    units = []
    i = i0
    while i < i1:
        j = min(i + size, i1)
        ua = a if i == i0 else spans[i][0]
        ub = b if j == i1 else spans[j - 1][1]
        units.append(_Unit(ua, ub, j - i, para_start and i == i0))
        if j == i1:
            break
        i += step
    # Windows overlap already; mark them so packing never merges two of them.
    for u in units:
        u.tokens = max(u.tokens, size)
    return units


def _pack(units: list[_Unit], config: ChunkingConfig) -> list[tuple[int, int, int]]:
    """Greedily group units into chunks of at most `chunk_tokens` tokens, with overlap."""
    out: list[tuple[int, int, int]] = []
    size = config.chunk_tokens
    i = 0
    n = len(units)
    while i < n:
        total = 0
        j = i
        while j < n and (j == i or total + units[j].tokens <= size):
            total += units[j].tokens
            j += 1
        if j < n:
            # Prefer to end at a paragraph break if the chunk is full enough there.
            run = 0
            best = None
            for m in range(i, j):
                if m > i and units[m].para_start and run >= config.min_fill * size:
                    best = m
                run += units[m].tokens
            if best is not None:
                j = best
                total = sum(u.tokens for u in units[i:j])
        out.append((units[i].start, units[j - 1].end, min(total, size)))
        if j >= n:
            break
        # Overlap: restart on whole trailing sentences worth at most overlap_tokens.
        back = j
        carried = 0
        while back - 1 > i and carried + units[back - 1].tokens <= config.overlap_tokens:
            back -= 1
            carried += units[back].tokens
        i = back if back < j else j
    return out
