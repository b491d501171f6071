"""Citations a person can check: ``[n]`` in a reply links to a card of source n.

Pure functions for the chat tab (and anything else that shows a reply with its sources):

* ``cited_numbers(reply)``: the source numbers a reply cites, in order of first mention.
* ``render_reply(reply, sources)``: the reply with each ``[n]`` that names a given source turned
  into a link to that source's card (and a tooltip with its title and page).
* ``render_sources(reply, sources)``: the cards: title, page, score, file and collection, and the
  passage with the sentence(s) the reply cites highlighted (those sharing the most words with the
  citing sentence). Cited sources come first; the others follow as "also given to the model".
  When the reply cites nothing, every passage is listed and labelled so: the person still sees
  what the model was given.

A source is a dict: {"n", "title", "source", "page", "text", "start", "end", "score", "doc_id",
"collection"} (what the search tool returns).

Passages are untrusted. Everything from a document is HTML-escaped, and the characters markdown,
autolinks and LaTeX react to (``[ ] ( ) ! * _ ` ~ | $ : \\ #``) become character references, so no
tag, link, image or script can come from a passage; outside images are replaced by their alt text
first. The output is one HTML block without blank lines (a markdown renderer never switches back to
markdown inside it), made only of tags that ``gr.Chatbot(sanitize_html=True)`` keeps: div, p,
strong, code, blockquote, mark, a href="#...", span.
"""

from __future__ import annotations

import hashlib
import html
import re
from typing import Any, Sequence

from bot.tools.safety import strip_external_images

# [1] [1, 2] [1,2; 4] [1-3] [1–3]; not a markdown link target "[1](...)" nor a reference "[1]: url".
_MARKER = re.compile(r"\[(\d{1,3}(?:\s*(?:,|;|-|–|and)\s*\d{1,3})*)\](?!\(|:)")
_RANGE_MAX = 20
_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]*`", re.DOTALL)
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"')\]]*|\n|$)")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP = frozenset("""a an and are as at be been but by can could did do does for from had has have he her his how
i if in into is it its itself may might more most my no not of on or our she so such than that the their them
then there these they this those to too very was we were what when where which while who why will with would
you your yes also about above after again all am any because before being below between both during each few
further here just now only other own same should some through under until up""".split())
_INERT = str.maketrans({c: f"&#{ord(c)};" for c in "&\"'<>[]()!*_`~|$:\\#{}+-="})


def _numbers(group: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"\s*(?:,|;|and)\s*", group):
        bounds = re.split(r"\s*[-–]\s*", part)
        if len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit():
            lo, hi = int(bounds[0]), int(bounds[1])
            if lo <= hi and hi - lo <= _RANGE_MAX:
                out.extend(range(lo, hi + 1))
                continue
        out.extend(int(b) for b in bounds if b.isdigit())
    return out


def _outside_code(reply: str):
    """(is_code, piece) runs of the reply: markers in code spans and fences are not citations."""
    pos = 0
    for m in _CODE.finditer(reply):
        if m.start() > pos:
            yield False, reply[pos:m.start()]
        yield True, m.group(0)
        pos = m.end()
    if pos < len(reply):
        yield False, reply[pos:]


def cited_numbers(reply: str) -> list[int]:
    """Source numbers the reply cites, each once, in the order they first appear."""
    seen: dict[int, None] = {}
    for is_code, piece in _outside_code(reply or ""):
        if is_code:
            continue
        for m in _MARKER.finditer(piece):
            for n in _numbers(m.group(1)):
                seen.setdefault(n, None)
    return list(seen)


def _key(sources: Sequence[dict[str, Any]]) -> str:
    """A short id shared by a reply and its cards, different for another turn's sources."""
    raw = "|".join(f"{s.get('n')}:{s.get('doc_id')}:{s.get('start')}:{s.get('end')}" for s in sources)
    return hashlib.sha1(raw.encode()).hexdigest()[:8]


def _anchor(key: str, n: int) -> str:
    return f"parley-src-{key}-{n}"


def _attr(text: Any) -> str:
    return html.escape(" ".join(str(text or "").split()), quote=True)


def _text(text: Any) -> str:
    """Untrusted text as inert HTML: escaped, markdown characters as references, newlines as <br>."""
    text = strip_external_images(str(text or "")).translate(_INERT)  # one pass: nothing is escaped twice
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\s*\n\s*", "<br>", text.strip())


def _label(source: dict[str, Any]) -> str:
    page = source.get("page")
    title = source.get("title") or source.get("source") or "source"
    return f"{title}, p. {page}" if page not in (None, "") else str(title)


def render_reply(reply: str, sources: Sequence[dict[str, Any]]) -> str:
    """The reply with each [n] of a given source linked to its card; other text is left as it is.

    Pass the reply already sanitized for display (bot.tools.safety.sanitize_markdown); markers of
    numbers that no source has stay plain text.
    """
    by_n = {int(s["n"]): s for s in sources if str(s.get("n", "")).isdigit()}
    if not reply or not by_n:
        return reply or ""
    key = _key(sources)

    def link(m: re.Match) -> str:
        numbers = _numbers(m.group(1))
        if not numbers or not all(n in by_n for n in numbers):
            return m.group(0)
        return "".join(f'<a class="parley-cite" href="#{_anchor(key, n)}" title="{_attr(_label(by_n[n]))}">[{n}]</a>'
                       for n in dict.fromkeys(numbers))

    return "".join(piece if is_code else _MARKER.sub(link, piece) for is_code, piece in _outside_code(reply))


def _words(text: str) -> set[str]:
    return {w for w in (t.lower() for t in _WORD.findall(text)) if w not in _STOP and (len(w) > 2 or w.isdigit())}


def _citing_text(reply: str, n: int) -> str:
    """The sentences of the reply that cite source n (markers removed)."""
    out = []
    for is_code, piece in _outside_code(reply):
        if is_code:
            continue
        for m in _SENTENCE.finditer(piece):
            sentence = m.group(0)
            if any(n in _numbers(c.group(1)) for c in _MARKER.finditer(sentence)):
                out.append(_MARKER.sub(" ", sentence))
    return " ".join(out)


def highlight_spans(passage: str, citing: str, limit: int = 2) -> list[tuple[int, int]]:
    """Character spans of the passage's sentences that share the most words with `citing`
    (at most `limit`, in passage order); [] when no sentence shares a word."""
    target = _words(citing)
    if not target:
        return []
    scored = []
    for m in _SENTENCE.finditer(passage):
        a, b = m.span()
        while a < b and passage[a].isspace():
            a += 1
        while b > a and passage[b - 1].isspace():
            b -= 1
        if a < b:
            scored.append((len(_words(passage[a:b]) & target), a, b))
    best = max((s for s, _a, _b in scored), default=0)
    if best == 0:
        return []
    chosen = sorted(sorted(scored, key=lambda t: -t[0])[:limit], key=lambda t: t[1])
    return [(a, b) for s, a, b in chosen if s >= max(1, 0.6 * best)]


def _passage_html(text: str, spans: list[tuple[int, int]]) -> str:
    out, pos = [], 0
    for a, b in spans:
        out.append(_text(text[pos:a]) if a > pos else "")
        out.append(f"<mark>{_text(text[a:b])}</mark>")
        pos = b
    out.append(_text(text[pos:]))
    joined = " ".join(p for p in out if p)
    return joined or "<em>(empty passage)</em>"


def _card(source: dict[str, Any], key: str, reply: str, cited: bool) -> str:
    n = int(source["n"])
    text = str(source.get("text") or "")
    spans = highlight_spans(text, _citing_text(reply, n)) if cited else []
    meta = []
    if source.get("page") not in (None, ""):
        meta.append(f"p. {_text(source['page'])}")
    if source.get("score") is not None:
        try:
            meta.append(f"score {float(source['score']):.4f}")
        except (TypeError, ValueError):
            pass
    where = [f"<code>{_text(source.get('source'))}</code>"] if source.get("source") else []
    if source.get("collection"):
        where.append(f"in {_text(source['collection'])}")
    title = _text(source.get("title") or source.get("source") or "source")
    head = (f'<p><strong>[{n}] {title}</strong>' + (" · " + " · ".join(meta) if meta else "")
            + ("<br>" + " ".join(where) if where else "") + "</p>")
    return (f'<div class="parley-source{" parley-cited" if cited else ""}" id="{_anchor(key, n)}">{head}'
            f"<blockquote>{_passage_html(text, spans)}</blockquote></div>")


def render_sources(reply: str, sources: Sequence[dict[str, Any]], *, heading: str | None = None) -> str:
    """Source cards for a reply (see the module docstring); "" when there are no sources.

    heading: the line above the cards when the reply cites nothing (e.g. for search results
    shown without a reply); plain text, HTML-escaped here."""
    usable = [s for s in sources if str(s.get("n", "")).isdigit()]
    if not usable:
        return ""
    key = _key(sources)
    by_n = {int(s["n"]): s for s in usable}
    cited = [n for n in cited_numbers(reply or "") if n in by_n]
    rest = [s for s in usable if int(s["n"]) not in cited]
    parts = ['<div class="parley-sources">']
    if cited:
        parts.append(f"<p><strong>Cited in the reply ({len(cited)})</strong></p>")
        parts += [_card(by_n[n], key, reply, True) for n in cited]
        if rest:
            parts.append(f"<p><strong>Also given to the model, not cited ({len(rest)})</strong></p>")
    else:
        label = heading if heading is not None else (f"The reply cites no source. The model was given these "
                                                     f"passages ({len(rest)}):")
        parts.append(f"<p><strong>{html.escape(label)}</strong></p>")
    parts += [_card(s, key, reply, False) for s in rest]
    parts.append("</div>")
    return "\n".join(parts)
