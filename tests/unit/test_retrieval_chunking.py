"""Chunking: exact spans, token limits, overlap, paragraph and page boundaries."""

from __future__ import annotations

import pytest

from retrieval import ChunkingConfig, ConfigError, Document, HashEmbedder, chunk_document

pytestmark = pytest.mark.unit


@pytest.fixture
def emb():
    return HashEmbedder(64)


def doc(text, pages=None):
    return Document(doc_id="d1", source="mem", title="t", text=text, content_hash="h", origin="mem",
                    kind="text", pages=pages or [])


def sentence(i, words=9):
    return " ".join(f"w{i}x{j}" for j in range(words)) + "."


def test_spans_point_at_exact_text_and_respect_the_token_limit(emb):
    paras = ["\n".join(sentence(p * 10 + s) for s in range(4)) for p in range(6)]
    d = doc("\n\n".join(paras))
    cfg = ChunkingConfig(chunk_tokens=30, overlap_tokens=10)
    chunks = chunk_document(d, emb.token_spans, cfg)
    assert len(chunks) > 3
    for i, c in enumerate(chunks):
        assert c.text == d.text[c.start:c.end]
        assert c.position == i and c.doc_id == "d1"
        assert len(emb.token_spans(c.text)) <= 30
    # Every sentence is in some chunk, whole.
    for p in range(6):
        for s in range(4):
            assert any(sentence(p * 10 + s) in c.text for c in chunks)


def test_overlap_repeats_whole_trailing_sentences(emb):
    d = doc(" ".join(sentence(i) for i in range(12)))  # one paragraph, 10 tokens per sentence
    chunks = chunk_document(d, emb.token_spans, ChunkingConfig(chunk_tokens=30, overlap_tokens=10))
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks should overlap"
        assert d.text[b.start:a.end].strip().endswith(".")
    no_overlap = chunk_document(d, emb.token_spans, ChunkingConfig(chunk_tokens=30, overlap_tokens=0))
    for a, b in zip(no_overlap, no_overlap[1:]):
        assert b.start >= a.end


def test_prefers_paragraph_breaks(emb):
    # Paragraph 1: 20 tokens; paragraph 2: 20 tokens. A 30-token chunk ends after paragraph 1
    # instead of cutting paragraph 2 in the middle.
    p1 = sentence(1) + " " + sentence(2)
    p2 = sentence(3) + " " + sentence(4)
    d = doc(p1 + "\n\n" + p2)
    chunks = chunk_document(d, emb.token_spans, ChunkingConfig(chunk_tokens=30, overlap_tokens=0))
    assert [c.text for c in chunks] == [p1, p2]


def test_long_sentence_is_split_by_tokens(emb):
    d = doc(" ".join(f"tok{i}" for i in range(100)))  # no sentence boundary at all
    chunks = chunk_document(d, emb.token_spans, ChunkingConfig(chunk_tokens=25, overlap_tokens=5))
    assert len(chunks) >= 4
    for c in chunks:
        assert c.text == d.text[c.start:c.end]
        assert len(emb.token_spans(c.text)) <= 25
    assert chunks[0].text.startswith("tok0 ") and chunks[-1].text.endswith("tok99")


def test_pages_are_hard_boundaries(emb):
    text = "alpha beta gamma.\n\ndelta epsilon."
    d = doc(text, pages=[(1, 0, 17), (2, 19, len(text))])
    chunks = chunk_document(d, emb.token_spans, ChunkingConfig(chunk_tokens=100, overlap_tokens=0))
    assert [(c.page, c.text) for c in chunks] == [(1, "alpha beta gamma."), (2, "delta epsilon.")]


def test_whitespace_only_document_has_no_chunks(emb):
    assert chunk_document(doc(" \n\n \n"), emb.token_spans, ChunkingConfig()) == []


def test_invalid_settings_report_every_problem():
    with pytest.raises(ConfigError) as err:
        ChunkingConfig(chunk_tokens=4, overlap_tokens=-1)
    assert "chunk_tokens" in str(err.value) and "overlap_tokens" in str(err.value)
    with pytest.raises(ConfigError, match="under half"):
        ChunkingConfig(chunk_tokens=100, overlap_tokens=60)
