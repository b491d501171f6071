"""Small text helpers shared by the tools: sentence splitting that keeps layout."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (or their CJK/Arabic forms) followed by space, unless the word before
# is a common abbreviation or a single letter (initials, "e.g.").
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "approx", "fig",
           "no", "vol", "inc", "ltd", "co", "u.s", "u.k", "mt", "jan", "feb", "mar", "apr", "jun", "jul",
           "aug", "sep", "sept", "oct", "nov", "dec", "p", "pp", "cf", "al", "ca"}
_END = re.compile(r"([.!?…。！？؟]+[\"'”’»)\]]*)(\s+)")


def split_sentences(text: str) -> list[str]:
    """Split one paragraph into sentences; joining them with single spaces restores it (modulo spaces)."""
    text = text.strip()
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in _END.finditer(text):
        end = m.end(1)
        word = re.findall(r"[\w.]+$", text[start:m.start(1) + 1].rstrip("."))
        last = word[0].lower().rstrip(".") if word else ""
        if m.group(1) == "." and (last in _ABBREV or (len(last) == 1 and last.isalpha())):
            continue
        piece = text[start:end].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def chunk_sentences(sentences: list[str], max_chars: int) -> list[str]:
    """Group sentences into pieces of at most ``max_chars`` (a longer sentence is cut at spaces)."""
    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return pieces


def split_layout(text: str) -> list[tuple[str, str]]:
    """Split text into ``(line, separator)`` pairs so ``"".join(l + s)`` rebuilds it exactly.

    Lines are what gets translated; separators (newlines, blank lines) are kept as they are.
    Leading/trailing spaces of a line go into the separator side as well.
    """
    parts: list[tuple[str, str]] = []
    for m in re.finditer(r"([^\n]*)(\n*)", text):
        if not m.group(0):
            continue
        line = m.group(1)
        lead = line[: len(line) - len(line.lstrip())]
        body = line.strip()
        trail = line[len(lead) + len(body):]
        if lead:
            parts.append(("", lead))
        parts.append((body, trail + m.group(2)))
    return parts
